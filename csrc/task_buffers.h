// Checked views of a meta-batch's per-task buffers (inputs, targets, per-task outputs) for
// the engines' bindings. The Python layer validates first; these checks are the last guard
// before raw pointers reach an engine.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>

#include "buffer.h"
#include "mlp_spec.h"

namespace fastmeta {

namespace py = pybind11;

// The meta-step's algorithm from its Python name; `who` prefixes the error.
inline Algorithm parse_algorithm(const std::string& name, const char* who) {
  if (name == "second_order") return Algorithm::second_order;
  if (name == "first_order") return Algorithm::first_order;
  if (name == "reptile") return Algorithm::reptile;
  throw py::value_error(std::string(who) + ": unknown algorithm '" + name +
                        "' (second_order, first_order or reptile)");
}

// A [T, ...] buffer whose tasks are each C-contiguous but may lie any number of elements
// apart: a slice of a larger batch (support and query cut from one tensor) is read in place.
template <typename Element>
struct TaskBuffer {
  const Element* data = nullptr;
  int64_t tasks = 0, task_numel = 1;
  int64_t rows = 0, features = 0;  // shape[1], shape[2] (when the buffer has them)
  int64_t task_stride = 0;         // elements from one task to the next
};

template <typename Element>
TaskBuffer<Element> view_tasks(py::handle obj, const char* name, int64_t ndim) {
  const Buffer b(obj, false);
  b.check_type<Element>(name);
  if (ndim > 0 ? b.ndim() != ndim : b.ndim() < 1)
    throw py::value_error(std::string(name) + ": expected " +
                          (ndim > 0 ? std::to_string(ndim) : std::string("at least 1")) +
                          " dimensions, got " + std::to_string(b.ndim()));
  if (!b.contiguous_from(1))
    throw py::value_error(std::string(name) + ": each task's rows must be C-contiguous");
  TaskBuffer<Element> view;
  view.data = static_cast<const Element*>(b.data());
  view.tasks = b.shape(0);
  for (int64_t d = 1; d < b.ndim(); ++d) view.task_numel *= b.shape(d);
  view.rows = b.ndim() > 1 ? b.shape(1) : 0;
  view.features = b.ndim() > 2 ? b.shape(2) : 0;
  const int64_t item = static_cast<int64_t>(sizeof(Element));
  if (view.tasks > 1) {
    if (b.stride(0) < 0 || b.stride(0) % item != 0)
      throw py::value_error(std::string(name) + ": tasks must lie a whole, non-negative "
                            "number of elements apart");
    view.task_stride = b.stride(0) / item;
  }
  return view;
}

inline std::string shape_of(py::handle obj) {
  return shape_string(Buffer(obj, false).shape_vector());
}

// Targets: [T, N * out] values (mse, any shape [T, ...] with N * out values per task) or
// [T, N] labels in [0, out) (cross-entropy). Returns the data; `stride` gets the task stride.
template <typename Scalar>
const void* target_pointer(Loss loss, int64_t out, py::handle y, const char* name,
                           int64_t tasks, int64_t rows, int64_t& stride) {
  if (loss == Loss::mse) {
    const TaskBuffer<Scalar> values = view_tasks<Scalar>(y, name, 0);
    if (values.tasks != tasks || values.task_numel != rows * out)
      throw py::value_error(std::string(name) + ": expected " + std::to_string(tasks) +
                            " tasks of " + std::to_string(rows * out) + " values, got shape " +
                            shape_of(y));
    stride = values.task_stride;
    return values.data;
  }
  const TaskBuffer<int64_t> labels = view_tasks<int64_t>(y, name, 2);
  if (labels.tasks != tasks || labels.rows != rows)
    throw py::value_error(std::string(name) + ": expected shape " +
                          shape_string({tasks, rows}) + ", got " + shape_of(y));
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
                        std::initializer_list<int64_t> shape) {
  if (obj.is_none()) return nullptr;
  return view_shaped<Scalar>(obj, name, shape, true);
}

}  // namespace fastmeta
