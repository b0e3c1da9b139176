// Checked views of a meta-batch's per-task buffers (inputs, targets, per-task outputs) for
// the engines' bindings. The Python layer validates first; these checks are the last guard
// before raw pointers reach an engine.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "buffer.h"
#include "mlp_spec.h"

namespace fastmeta {

namespace py = pybind11;

// A [T, ...] buffer whose tasks are each C-contiguous but may lie any number of elements
// apart: a slice of a larger batch (support and query cut from one tensor) is read in place.
template <typename Element>
struct TaskBuffer {
  const Element* data = nullptr;
  std::vector<int64_t> shape;
  int64_t task_stride = 0;  // elements from one task to the next
  int64_t task_numel() const {
    int64_t n = 1;
    for (std::size_t d = 1; d < shape.size(); ++d) n *= shape[d];
    return n;
  }
};

template <typename Element>
TaskBuffer<Element> view_tasks(const py::buffer& obj, const char* name, int64_t ndim) {
  const py::buffer_info info = obj.request();
  if (!info.item_type_is_equivalent_to<Element>())
    throw py::type_error(std::string(name) + ": expected element format '" +
                         py::format_descriptor<Element>::format() + "', got '" + info.format + "'");
  if (ndim > 0 ? info.ndim != ndim : info.ndim < 1)
    throw py::value_error(std::string(name) + ": expected " +
                          (ndim > 0 ? std::to_string(ndim) : std::string("at least 1")) +
                          " dimensions, got " + std::to_string(info.ndim));
  const int64_t item = static_cast<int64_t>(sizeof(Element));
  int64_t expected = item;
  for (int64_t d = info.ndim - 1; d >= 1; --d) {
    if (info.shape[d] > 1 && info.strides[d] != expected)
      throw py::value_error(std::string(name) + ": each task's rows must be C-contiguous");
    expected *= info.shape[d];
  }
  TaskBuffer<Element> view;
  view.data = static_cast<const Element*>(info.ptr);
  view.shape.assign(info.shape.begin(), info.shape.end());
  if (info.shape[0] > 1) {
    if (info.strides[0] < 0 || info.strides[0] % item != 0)
      throw py::value_error(std::string(name) + ": tasks must lie a whole, non-negative "
                            "number of elements apart");
    view.task_stride = info.strides[0] / item;
  }
  return view;
}

// Targets: [T, N * out] values (mse, any shape [T, ...] with N * out values per task) or
// [T, N] labels in [0, out) (cross-entropy). Returns the data; `stride` gets the task stride.
template <typename Scalar>
const void* target_pointer(Loss loss, int64_t out, const py::buffer& y, const char* name,
                           int64_t tasks, int64_t rows, int64_t& stride) {
  if (loss == Loss::mse) {
    TaskBuffer<Scalar> values = view_tasks<Scalar>(y, name, 0);
    if (values.shape[0] != tasks || values.task_numel() != rows * out)
      throw py::value_error(std::string(name) + ": expected " + std::to_string(tasks) +
                            " tasks of " + std::to_string(rows * out) + " values, got shape " +
                            detail::shape_string(values.shape));
    stride = values.task_stride;
    return values.data;
  }
  TaskBuffer<int64_t> labels = view_tasks<int64_t>(y, name, 2);
  if (labels.shape[0] != tasks || labels.shape[1] != rows)
    throw py::value_error(std::string(name) + ": expected shape " +
                          detail::shape_string({tasks, rows}) + ", got " +
                          detail::shape_string(labels.shape));
  for (int64_t t = 0; t < tasks; ++t)
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t label = labels.data[t * labels.task_stride + i];
      if (label < 0 || label >= out)
        throw py::value_error(std::string(name) + ": label " + std::to_string(label) +
                              " is outside [0, " + std::to_string(out) + ")");
    }
  stride = labels.task_stride;
  return labels.data;
}

template <typename Scalar>
Scalar* optional_output(const py::object& obj, const char* name,
                        const std::vector<int64_t>& shape) {
  if (obj.is_none()) return nullptr;
  return view_shaped<Scalar>(obj.cast<py::buffer>(), name, shape, true).data;
}

}  // namespace fastmeta
