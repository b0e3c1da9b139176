// Python bindings of the MLP engine: fastmeta._core.MlpEngine.
//
// The Python layer (fastmeta/engine_cpu.py) validates everything first; the checks here
// (shapes, element types, layout, label range) are the last guard before raw
// pointers reach the engine. The GIL is released while the engine runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "buffer.h"
#include "mlp_engine.h"
#include "task_buffers.h"

namespace py = pybind11;

namespace fastmeta {
namespace {

Activation parse_activation(const std::string& name) {
  if (name == "identity") return Activation::identity;
  if (name == "relu") return Activation::relu;
  if (name == "tanh") return Activation::tanh;
  if (name == "sigmoid") return Activation::sigmoid;
  throw py::value_error("MlpEngine: unknown activation '" + name +
                        "' (identity, relu, tanh or sigmoid)");
}

std::unique_ptr<MlpEngine> make_engine(std::vector<int64_t> widths,
                                       const std::vector<std::string>& activations,
                                       std::vector<bool> has_bias, int64_t head,
                                       const std::string& loss) {
  MlpSpec spec;
  spec.widths = std::move(widths);
  for (const std::string& a : activations) spec.activations.push_back(parse_activation(a));
  spec.has_bias = std::move(has_bias);
  spec.head = head;
  if (loss == "mse") spec.loss = Loss::mse;
  else if (loss == "cross_entropy") spec.loss = Loss::cross_entropy;
  else throw py::value_error("MlpEngine: unknown loss '" + loss + "' (mse or cross_entropy)");
  return std::make_unique<MlpEngine>(std::move(spec));
}

// One pointer per parameter tensor (nn.Linear order), each checked against the spec.
template <typename Scalar>
std::vector<Scalar*> tensor_pointers(const MlpSpec& spec, const py::list& tensors,
                                     const char* what, bool writable) {
  if (static_cast<int64_t>(tensors.size()) != spec.num_tensors())
    throw py::value_error(std::string(what) + ": expected " + std::to_string(spec.num_tensors()) +
                          " tensors, got " + std::to_string(tensors.size()));
  std::vector<Scalar*> pointers;
  pointers.reserve(tensors.size());
  const auto add = [&](int64_t numel) {
    const int64_t i = static_cast<int64_t>(pointers.size());
    pointers.push_back(view_flat<Scalar>(tensors[i], {what, i}, numel, writable));
  };
  for (int64_t l = 0; l < spec.num_layers(); ++l) {
    add(spec.widths[l + 1] * spec.widths[l]);
    if (spec.has_bias[l]) add(spec.widths[l + 1]);
  }
  return pointers;
}

template <typename Scalar>
std::vector<const Scalar*> input_pointers(const MlpSpec& spec, const py::list& tensors,
                                          const char* what) {
  std::vector<Scalar*> pointers = tensor_pointers<Scalar>(spec, tensors, what, false);
  return std::vector<const Scalar*>(pointers.begin(), pointers.end());
}

template <typename Scalar>
bool meta_step_typed(MlpEngine& engine, const py::list& params, const py::object& lr,
                     const std::string& algorithm, int64_t inner_steps,
                     const py::buffer& support_x, const py::buffer& support_y,
                     const py::object& query_x, const py::object& query_y, bool need_grad,
                     const py::buffer& support_loss, const py::object& query_loss,
                     const py::object& query_accuracy, const py::object& grad,
                     const py::object& lr_grad, const py::object& adapted) {
  const MlpSpec& spec = engine.spec();
  MetaStepArgs<Scalar> args;
  args.algorithm = parse_algorithm(algorithm, "MlpEngine");
  if (inner_steps < 1) throw py::value_error("meta_step: inner_steps must be at least 1");
  args.inner_steps = inner_steps;
  args.need_grad = need_grad;
  args.params = input_pointers<Scalar>(spec, params, "params");
  if (py::isinstance<py::list>(lr)) {
    if (args.algorithm == Algorithm::reptile)
      throw py::value_error("meta_step: reptile takes a scalar inner learning rate");
    args.lrs = input_pointers<Scalar>(spec, lr.cast<py::list>(), "lr");
  } else {
    args.lr = lr.cast<Scalar>();
  }

  const TaskBuffer<Scalar> sx = view_tasks<Scalar>(support_x, "support_x", 3);
  args.tasks = sx.tasks;
  args.support = sx.rows;
  if (args.tasks < 1 || args.support < 1 || sx.features != spec.widths[0])
    throw py::value_error("support_x: expected shape [T >= 1, S >= 1, " +
                          std::to_string(spec.widths[0]) + "], got " +
                          shape_of(support_x));
  args.support_x = sx.data;
  args.support_x_stride = sx.task_stride;
  args.support_y = target_pointer<Scalar>(spec.loss, spec.widths.back(), support_y, "support_y",
                                          args.tasks, args.support,
                                          args.support_y_stride);
  args.support_loss =
      view_shaped<Scalar>(support_loss, "support_loss", {args.tasks, inner_steps}, true);

  if (args.algorithm != Algorithm::reptile) {
    if (query_x.is_none() || query_y.is_none() || query_loss.is_none())
      throw py::value_error("meta_step: MAML-type algorithms need query_x, query_y and query_loss");
    const TaskBuffer<Scalar> qx = view_tasks<Scalar>(query_x, "query_x", 3);
    args.query = qx.rows;
    if (qx.tasks != args.tasks || args.query < 1 || qx.features != spec.widths[0])
      throw py::value_error("query_x: expected shape [" + std::to_string(args.tasks) +
                            ", Q >= 1, " + std::to_string(spec.widths[0]) + "], got " +
                            shape_of(query_x));
    args.query_x = qx.data;
    args.query_x_stride = qx.task_stride;
    args.query_y = target_pointer<Scalar>(spec.loss, spec.widths.back(), query_y, "query_y",
                                          args.tasks, args.query,
                                          args.query_y_stride);
    args.query_loss = optional_output<Scalar>(query_loss, "query_loss", {args.tasks});
    if (spec.loss == Loss::cross_entropy)
      args.query_accuracy = optional_output<Scalar>(query_accuracy, "query_accuracy", {args.tasks});
  }
  const int64_t num_params = spec.num_params();
  if ((need_grad || args.algorithm == Algorithm::reptile) && grad.is_none())
    throw py::value_error("meta_step: grad is required when need_grad (and for reptile)");
  if (!grad.is_none())
    args.grads = tensor_pointers<Scalar>(spec, grad.cast<py::list>(), "grad", true);
  if (!args.lrs.empty() && !lr_grad.is_none())
    args.lr_grads = tensor_pointers<Scalar>(spec, lr_grad.cast<py::list>(), "lr_grad", true);
  args.adapted = optional_output<Scalar>(adapted, "adapted", {args.tasks, num_params});

  {
    py::gil_scoped_release release;
    engine.meta_step(args);
  }
  return args.all_finite;
}

bool meta_step(MlpEngine& engine, const py::list& params, const py::object& lr,
               const std::string& algorithm, int64_t inner_steps, const py::buffer& support_x,
               const py::buffer& support_y, const py::object& query_x, const py::object& query_y,
               bool need_grad, const py::buffer& support_loss, const py::object& query_loss,
               const py::object& query_accuracy, const py::object& grad,
               const py::object& lr_grad, const py::object& adapted) {
  const std::string format = Buffer(support_x, false).format();
  if (format == FormatOf<float>::name)
    return meta_step_typed<float>(engine, params, lr, algorithm, inner_steps, support_x,
                                  support_y, query_x, query_y, need_grad, support_loss,
                                  query_loss, query_accuracy, grad, lr_grad, adapted);
  if (format == FormatOf<double>::name)
    return meta_step_typed<double>(engine, params, lr, algorithm, inner_steps, support_x,
                                   support_y, query_x, query_y, need_grad, support_loss,
                                   query_loss, query_accuracy, grad, lr_grad, adapted);
  throw py::type_error("meta_step: support_x must be float32 or float64, got '" + format + "'");
}

}  // namespace

void bind_mlp_engine(py::module_& m) {
  py::class_<MlpEngine>(m, "MlpEngine",
                        "Batched per-task MLP meta-steps (MAML, first-order MAML, Meta-SGD, "
                        "ANIL, Reptile) over plain buffers")
      .def(py::init(&make_engine), py::arg("widths"), py::arg("activations"),
           py::arg("has_bias"), py::arg("head"), py::arg("loss"),
           "widths: [in, out_1, ..., out_L]; activations: one of identity/relu/tanh/sigmoid per "
           "Linear layer; head: first adapted layer (ANIL > 0); loss: mse or cross_entropy")
      .def("meta_step", &meta_step, py::arg("params"), py::arg("lr"), py::arg("algorithm"),
           py::arg("inner_steps"), py::arg("support_x"), py::arg("support_y"),
           py::arg("query_x"), py::arg("query_y"), py::arg("need_grad"),
           py::arg("support_loss"), py::arg("query_loss"), py::arg("query_accuracy"),
           py::arg("grad"), py::arg("lr_grad"), py::arg("adapted"),
           "Runs one meta-step for every task and writes the given output buffers (grad and "
           "lr_grad: one buffer per parameter tensor; adapted: [T, P]). Returns whether every "
           "support and query loss is finite; False without computing anything (outputs "
           "left unwritten) when support_x, query_x or mse targets hold a NaN or infinity.")
      .def_property_readonly("num_params", [](const MlpEngine& e) { return e.spec().num_params(); })
      .def_property_readonly("workspace_bytes", &MlpEngine::workspace_bytes);
  m.def("engine_isa", &engine_isa, "The instruction set the MLP engine's kernels use");
}

}  // namespace fastmeta
