// Typed, checked views of Python buffer-protocol objects (numpy arrays, torch CPU
// tensors through .numpy()). The Python layer validates first; these checks are the
// last guard, so a bad pointer never reaches a kernel.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fastmeta {

namespace py = pybind11;

template <typename Scalar>
struct BufferView {
  Scalar* data = nullptr;
  std::vector<int64_t> shape;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    return n;
  }
};

namespace detail {

// Checks the element type and C-contiguity of a requested buffer.
template <typename Scalar>
BufferView<Scalar> checked_view(const py::buffer_info& info, const char* name) {
  // item_type_is_equivalent_to: numpy's int64 is 'l' on some platforms and 'q' on others.
  if (!info.item_type_is_equivalent_to<Scalar>()) {
    throw py::type_error(std::string(name) + ": expected element format '" +
                         py::format_descriptor<Scalar>::format() + "', got '" + info.format +
                         "'");
  }
  int64_t expected_stride = static_cast<int64_t>(sizeof(Scalar));
  for (int64_t d = info.ndim - 1; d >= 0; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected_stride) {
      throw py::value_error(std::string(name) + ": buffer must be C-contiguous");
    }
    expected_stride *= info.shape[d];
  }
  BufferView<Scalar> view;
  view.data = static_cast<Scalar*>(info.ptr);
  view.shape.assign(info.shape.begin(), info.shape.end());
  return view;
}

inline std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace detail

// Requests a C-contiguous buffer of the given rank and element type; raises
// ValueError/TypeError (never copies) when the object does not match.
template <typename Scalar>
BufferView<Scalar> view_buffer(const py::buffer& obj, const char* name, int64_t ndim,
                               bool writable) {
  py::buffer_info info = obj.request(writable);
  if (info.ndim != ndim) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions, got " + std::to_string(info.ndim));
  }
  return detail::checked_view<Scalar>(info, name);
}

// The same, for an exact shape.
template <typename Scalar>
BufferView<Scalar> view_shaped(const py::buffer& obj, const char* name,
                               const std::vector<int64_t>& shape, bool writable) {
  BufferView<Scalar> view =
      view_buffer<Scalar>(obj, name, static_cast<int64_t>(shape.size()), writable);
  if (view.shape != shape) {
    throw py::value_error(std::string(name) + ": expected shape " + detail::shape_string(shape) +
                          ", got " + detail::shape_string(view.shape));
  }
  return view;
}

// A C-contiguous buffer of exactly `numel` elements, of any shape (read flat).
template <typename Scalar>
BufferView<Scalar> view_flat(const py::buffer& obj, const char* name, int64_t numel,
                             bool writable) {
  BufferView<Scalar> view = detail::checked_view<Scalar>(obj.request(writable), name);
  if (view.numel() != numel) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(numel) +
                          " elements, got " + std::to_string(view.numel()));
  }
  return view;
}

}  // namespace fastmeta
