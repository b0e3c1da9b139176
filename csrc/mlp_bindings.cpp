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

// Inputs [T, N, in], each task C-contiguous; returns the view, checked against the spec.
template <typename Scalar>
TaskBuffer<Scalar> rows(const MlpSpec& spec, py::handle x, const char* name, int64_t tasks) {
  const TaskBuffer<Scalar> view = view_tasks<Scalar>(x, name, 3);
  if ((tasks >= 0 && view.tasks != tasks) || view.tasks < 1 || view.rows < 1 ||
      view.features != spec.widths[0])
    throw py::value_error(std::string(name) + ": expected shape [" +
                          (tasks >= 0 ? std::to_string(tasks) : std::string("T >= 1")) +
                          ", N >= 1, " + std::to_string(spec.widths[0]) + "], got " +
                          shape_of(x));
  return view;
}

bool meta_step(MlpEngine& engine, const py::list& params, const py::object& lr,
               const std::string& algorithm, int64_t inner_steps, const py::buffer& support_x,
               const py::buffer& support_y, const py::object& query_x, const py::object& query_y,
               bool need_grad, const py::buffer& support_loss, const py::object& query_loss,
               const py::object& query_accuracy, const py::object& grad,
               const py::object& lr_grad, const py::object& adapted) {
  const MetaStepCall call{params, lr, algorithm, inner_steps, support_x, support_y,
                          query_x, query_y, need_grad, support_loss, query_loss,
                          query_accuracy, grad, lr_grad, adapted};
  const MlpSpec& spec = engine.spec();
  const ModelShape model{spec.tensor_sizes(), spec.num_params(), spec.widths.back(), spec.loss};
  return bound_meta_step(engine, call, model, "MlpEngine",
                         [&](auto zero, py::handle x, const char* name, int64_t tasks) {
                           return rows<decltype(zero)>(spec, x, name, tasks);
                         });
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
