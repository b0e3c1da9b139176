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

// Requests a C-contiguous buffer of the given rank and element type; raises
// ValueError/TypeError (never copies) when the object does not match.
template <typename Scalar>
BufferView<Scalar> view_buffer(const py::buffer& obj, const char* name, int64_t ndim,
                               bool writable) {
  py::buffer_info info = obj.request(writable);
  if (info.format != py::format_descriptor<Scalar>::format()) {
    throw py::type_error(std::string(name) + ": expected element format '" +
                         py::format_descriptor<Scalar>::format() + "', got '" + info.format +
                         "'");
  }
  if (info.ndim != ndim) {
    throw py::value_error(std::string(name) + ": expected " + std::to_string(ndim) +
                          " dimensions, got " + std::to_string(info.ndim));
  }
  int64_t expected_stride = static_cast<int64_t>(sizeof(Scalar));
  for (int64_t d = ndim - 1; d >= 0; --d) {
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

}  // namespace fastmeta
