// Typed, checked views of Python buffer-protocol objects (numpy arrays, torch CPU
// tensors through .numpy()). The Python layer validates first; these checks are the
// last guard, so a bad pointer never reaches a kernel.
//
// A view holds the raw Py_buffer only while the arguments are checked (no allocation:
// the engine is called every few tens of microseconds); the memory stays valid after
// that because the object itself lives for the whole call. Error messages are built
// only when a check fails.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <string>
#include <vector>

namespace fastmeta {

namespace py = pybind11;

// A buffer's name in error messages: `what`, or `what[index]` for one of a list.
struct BufferName {
  BufferName(const char* what, int64_t index = -1) : what(what), index(index) {}
  const char* what;
  int64_t index;
  std::string str() const {
    return index < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(index) + "]";
  }
};

// The element format character of a type, and whether a buffer's format names it
// (numpy's int64 is 'l' on some platforms and 'q' on others).
template <typename Element>
struct FormatOf;
template <>
struct FormatOf<float> {
  static constexpr const char* name = "f";
  static bool matches(char c) { return c == 'f'; }
};
template <>
struct FormatOf<double> {
  static constexpr const char* name = "d";
  static bool matches(char c) { return c == 'd'; }
};
template <>
struct FormatOf<int64_t> {
  static constexpr const char* name = "q";
  static bool matches(char c) { return c == 'q' || c == 'l'; }
};

class Buffer {
 public:
  Buffer(py::handle obj, bool writable) {
    const int flags = PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) throw py::error_already_set();
  }
  ~Buffer() { PyBuffer_Release(&view_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  int64_t ndim() const { return view_.ndim; }
  int64_t shape(int64_t d) const { return view_.shape[d]; }
  int64_t stride(int64_t d) const { return view_.strides[d]; }  // in bytes
  void* data() const { return view_.buf; }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d = 0; d < ndim(); ++d) n *= shape(d);
    return n;
  }
  std::vector<int64_t> shape_vector() const {
    return std::vector<int64_t>(view_.shape, view_.shape + view_.ndim);
  }
  // The format without a byte-order prefix that means this machine's ("<f" -> "f").
  const char* format() const {
    const char* f = view_.format ? view_.format : "B";
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (*f == '<') return f + 1;
#endif
    return (*f == '@' || *f == '=') ? f + 1 : f;
  }

  template <typename Element>
  bool holds() const {
    const char* f = format();
    return view_.itemsize == int64_t(sizeof(Element)) && FormatOf<Element>::matches(f[0]) &&
           f[1] == '\0';
  }

  // Raises TypeError unless the elements are `Element`s.
  template <typename Element>
  void check_type(const BufferName& name) const {
    if (!holds<Element>())
      throw py::type_error(name.str() + ": expected element format '" + FormatOf<Element>::name +
                           "', got '" + format() + "'");
  }

  // True when dimensions [from, ndim) are C-contiguous (size-1 dimensions are ignored).
  bool contiguous_from(int64_t from) const {
    int64_t expected = view_.itemsize;
    for (int64_t d = ndim() - 1; d >= from; --d) {
      if (shape(d) > 1 && stride(d) != expected) return false;
      expected *= shape(d);
    }
    return true;
  }

 private:
  Py_buffer view_;
};

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The data of a C-contiguous buffer of `Scalar`s after the type and layout checks
// (TypeError / ValueError; never a copy).
template <typename Scalar>
Scalar* checked_data(const Buffer& b, const BufferName& name) {
  b.check_type<Scalar>(name);
  if (!b.contiguous_from(0)) throw py::value_error(name.str() + ": buffer must be C-contiguous");
  return static_cast<Scalar*>(b.data());
}

// A C-contiguous buffer of exactly the given shape.
template <typename Scalar>
Scalar* view_shaped(py::handle obj, const BufferName& name, std::initializer_list<int64_t> shape,
                    bool writable) {
  const Buffer b(obj, writable);
  Scalar* data = checked_data<Scalar>(b, name);
  bool same = b.ndim() == int64_t(shape.size());
  for (int64_t d = 0; same && d < b.ndim(); ++d) same = b.shape(d) == shape.begin()[d];
  if (!same)
    throw py::value_error(name.str() + ": expected shape " + shape_string(shape) + ", got " +
                          shape_string(b.shape_vector()));
  return data;
}

// A C-contiguous buffer of exactly `numel` elements, of any shape (read flat).
template <typename Scalar>
Scalar* view_flat(py::handle obj, const BufferName& name, int64_t numel, bool writable) {
  const Buffer b(obj, writable);
  Scalar* data = checked_data<Scalar>(b, name);
  if (b.numel() != numel)
    throw py::value_error(name.str() + ": expected " + std::to_string(numel) +
                          " elements, got " + std::to_string(b.numel()));
  return data;
}

// A C-contiguous buffer of the given rank: its data and shape.
template <typename Scalar>
struct BufferView {
  Scalar* data = nullptr;
  std::vector<int64_t> shape;
};

template <typename Scalar>
BufferView<Scalar> view_buffer(py::handle obj, const BufferName& name, int64_t ndim,
                               bool writable) {
  const Buffer b(obj, writable);
  if (b.ndim() != ndim)
    throw py::value_error(name.str() + ": expected " + std::to_string(ndim) +
                          " dimensions, got " + std::to_string(b.ndim()));
  return {checked_data<Scalar>(b, name), b.shape_vector()};
}

}  // namespace fastmeta
