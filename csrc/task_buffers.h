// Checked views of a meta-batch's per-task buffers (inputs, targets, per-task outputs) for
// the engines' bindings. The Python layer validates first; these checks are the last guard
// before raw pointers reach an engine.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

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

// One pointer per parameter tensor, tensor i checked to hold sizes[i] elements.
template <typename Scalar>
std::vector<Scalar*> tensor_pointers(const std::vector<int64_t>& sizes, const py::list& tensors,
                                     const char* what, bool writable) {
  if (tensors.size() != sizes.size())
    throw py::value_error(std::string(what) + ": expected " + std::to_string(sizes.size()) +
                          " tensors, got " + std::to_string(tensors.size()));
  std::vector<Scalar*> pointers;
  pointers.reserve(sizes.size());
  for (std::size_t i = 0; i < sizes.size(); ++i)
    pointers.push_back(view_flat<Scalar>(tensors[i], {what, static_cast<int64_t>(i)}, sizes[i],
                                         writable));
  return pointers;
}

// The Python arguments of an engine's meta_step, as both engines' bindings take them.
struct MetaStepCall {
  const py::list& params;
  const py::object& lr;
  const std::string& algorithm;
  int64_t inner_steps;
  const py::buffer &support_x, &support_y;
  const py::object &query_x, &query_y;
  bool need_grad;
  const py::buffer& support_loss;
  const py::object &query_loss, &query_accuracy, &grad, &lr_grad, &adapted;
};

// What an engine's model looks like to the checks below.
struct ModelShape {
  std::vector<int64_t> tensor_sizes;  // elements of each parameter tensor, in torch order
  int64_t num_params = 0;
  int64_t outputs = 0;
  Loss loss = Loss::mse;
};

// The checked MetaStepArgs of a call. `inputs(x, name, tasks)` views an input batch and
// checks its shape against the engine's model (tasks < 0: any number of tasks >= 1).
template <typename Scalar, typename Inputs>
MetaStepArgs<Scalar> meta_step_args(const MetaStepCall& call, const ModelShape& model,
                                    const char* who, Inputs inputs) {
  MetaStepArgs<Scalar> args;
  args.algorithm = parse_algorithm(call.algorithm, who);
  if (call.inner_steps < 1) throw py::value_error("meta_step: inner_steps must be at least 1");
  args.inner_steps = call.inner_steps;
  const auto constant = [&](const py::list& tensors, const char* what) {
    const std::vector<Scalar*> p = tensor_pointers<Scalar>(model.tensor_sizes, tensors, what, false);
    return std::vector<const Scalar*>(p.begin(), p.end());
  };
  args.params = constant(call.params, "params");
  if (py::isinstance<py::list>(call.lr)) {
    if (args.algorithm == Algorithm::reptile)
      throw py::value_error("meta_step: reptile takes a scalar inner learning rate");
    args.lrs = constant(call.lr.cast<py::list>(), "lr");
  } else {
    args.lr = call.lr.cast<Scalar>();
  }

  const TaskBuffer<Scalar> sx = inputs(call.support_x, "support_x", -1);
  args.tasks = sx.tasks;
  args.support = sx.rows;
  args.support_x = sx.data;
  args.support_x_stride = sx.task_stride;
  args.support_y = target_pointer<Scalar>(model.loss, model.outputs, call.support_y, "support_y",
                                          args.tasks, args.support, args.support_y_stride);
  args.support_loss = view_shaped<Scalar>(call.support_loss, "support_loss",
                                          {args.tasks, call.inner_steps}, true);

  if (args.algorithm != Algorithm::reptile) {
    if (call.query_x.is_none() || call.query_y.is_none() || call.query_loss.is_none())
      throw py::value_error("meta_step: MAML-type algorithms need query_x, query_y and query_loss");
    const TaskBuffer<Scalar> qx = inputs(call.query_x, "query_x", args.tasks);
    args.query = qx.rows;
    args.query_x = qx.data;
    args.query_x_stride = qx.task_stride;
    args.query_y = target_pointer<Scalar>(model.loss, model.outputs, call.query_y, "query_y",
                                          args.tasks, args.query, args.query_y_stride);
    args.query_loss = view_shaped<Scalar>(call.query_loss, "query_loss", {args.tasks}, true);
    if (model.loss == Loss::cross_entropy)
      args.query_accuracy =
          optional_output<Scalar>(call.query_accuracy, "query_accuracy", {args.tasks});
  }

  if ((call.need_grad || args.algorithm == Algorithm::reptile) && call.grad.is_none())
    throw py::value_error("meta_step: grad is required when need_grad (and for reptile)");
  args.need_grad = call.need_grad;
  if (!call.grad.is_none())
    args.grads = tensor_pointers<Scalar>(model.tensor_sizes, call.grad.cast<py::list>(), "grad",
                                         true);
  if (!args.lrs.empty() && args.need_grad && !call.lr_grad.is_none())
    args.lr_grads = tensor_pointers<Scalar>(model.tensor_sizes, call.lr_grad.cast<py::list>(),
                                            "lr_grad", true);
  args.adapted = optional_output<Scalar>(call.adapted, "adapted", {args.tasks, model.num_params});
  return args;
}

// run(Scalar()) for support_x's element type, float or double.
template <typename Run>
bool run_typed(const py::buffer& support_x, Run run) {
  bool is_float, is_double;
  std::string format;
  {
    const Buffer b(support_x, false);  // (released before the engine runs)
    is_float = b.holds<float>();
    is_double = b.holds<double>();
    format = b.format();
  }
  if (is_float) return run(float());
  if (is_double) return run(double());
  throw py::type_error("meta_step: support_x must be float32 or float64, got '" + format + "'");
}

// One engine's meta_step binding: checks the call's buffers (inputs(Scalar(), x, name, tasks)
// reads support_x / query_x the engine's way), runs engine.meta_step(args) without the GIL
// and returns whether every loss was finite.
template <typename Engine, typename Inputs>
bool bound_meta_step(Engine& engine, const MetaStepCall& call, const ModelShape& model,
                     const char* who, Inputs inputs) {
  return run_typed(call.support_x, [&](auto zero) {
    using Scalar = decltype(zero);
    MetaStepArgs<Scalar> args = meta_step_args<Scalar>(
        call, model, who, [&](py::handle x, const char* name, int64_t tasks) {
          return inputs(zero, x, name, tasks);
        });
    {
      py::gil_scoped_release release;
      engine.meta_step(args);
    }
    return args.all_finite;
  });
}

}  // namespace fastmeta
