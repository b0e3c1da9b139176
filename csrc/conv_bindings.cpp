// Python bindings of the conv engine: fastmeta._core.ConvEngine.
//
// The Python layer (fastmeta/engine_conv.py) validates everything first; the checks here
// (shapes, element types, layout, label range) are the last guard before raw pointers
// reach the engine. The GIL is released while the engine runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "buffer.h"
#include "conv_engine.h"
#include "task_buffers.h"

namespace py = pybind11;

namespace fastmeta {
namespace {

std::unique_ptr<ConvEngine> make_engine(int64_t in_channels, int64_t height, int64_t width,
                                        std::vector<int64_t> channels,
                                        std::vector<bool> conv_bias, std::vector<double> eps,
                                        int64_t outputs, bool head_bias, const std::string& loss,
                                        bool head_only) {
  ConvSpec spec;
  spec.in_channels = in_channels;
  spec.height = height;
  spec.width = width;
  spec.channels = std::move(channels);
  spec.conv_bias = std::move(conv_bias);
  spec.eps = std::move(eps);
  spec.outputs = outputs;
  spec.head_bias = head_bias;
  spec.head_only = head_only;
  if (loss == "mse") spec.loss = Loss::mse;
  else if (loss == "cross_entropy") spec.loss = Loss::cross_entropy;
  else throw py::value_error("ConvEngine: unknown loss '" + loss + "' (mse or cross_entropy)");
  try {
    return std::make_unique<ConvEngine>(std::move(spec));
  } catch (const std::invalid_argument& error) {
    throw py::value_error(error.what());
  }
}

// Images [T, N, C, H, W], each task C-contiguous; returns the view, checked against the spec.
template <typename Scalar>
TaskBuffer<Scalar> images(const ConvSpec& spec, py::handle x, const char* name, int64_t tasks) {
  TaskBuffer<Scalar> view = view_tasks<Scalar>(x, name, 5);
  const Buffer b(x, false);
  if ((tasks >= 0 && view.tasks != tasks) || view.tasks < 1 || view.rows < 1 ||
      b.shape(2) != spec.in_channels || b.shape(3) != spec.height || b.shape(4) != spec.width)
    throw py::value_error(std::string(name) + ": expected shape [" +
                          (tasks >= 0 ? std::to_string(tasks) : std::string("T >= 1")) +
                          ", N >= 1, " + std::to_string(spec.in_channels) + ", " +
                          std::to_string(spec.height) + ", " + std::to_string(spec.width) +
                          "], got " + shape_of(x));
  return view;
}

bool meta_step(ConvEngine& engine, const py::list& params, const py::object& lr,
               const std::string& algorithm, int64_t inner_steps, const py::buffer& support_x,
               const py::buffer& support_y, const py::object& query_x, const py::object& query_y,
               bool need_grad, const py::buffer& support_loss, const py::object& query_loss,
               const py::object& query_accuracy, const py::object& grad,
               const py::object& lr_grad, const py::object& adapted) {
  const MetaStepCall call{params, lr, algorithm, inner_steps, support_x, support_y,
                          query_x, query_y, need_grad, support_loss, query_loss,
                          query_accuracy, grad, lr_grad, adapted};
  const ConvSpec& spec = engine.spec();
  const ModelShape model{spec.tensor_sizes(), spec.num_params(), spec.outputs, spec.loss};
  return bound_meta_step(engine, call, model, "ConvEngine.meta_step",
                         [&](auto zero, py::handle x, const char* name, int64_t tasks) {
                           return images<decltype(zero)>(spec, x, name, tasks);
                         });
}

}  // namespace

void bind_conv_engine(py::module_& m) {
  py::class_<ConvEngine>(m, "ConvEngine",
                         "Batched per-task meta-steps (MAML, first-order MAML, Meta-SGD, ANIL, "
                         "Reptile) for conv "
                         "blocks (conv3x3, BatchNorm2d with batch statistics, ReLU, maxpool 2x2) "
                         "and a Linear head, over plain buffers")
      .def(py::init(&make_engine), py::arg("in_channels"), py::arg("height"), py::arg("width"),
           py::arg("channels"), py::arg("conv_bias"), py::arg("eps"), py::arg("outputs"),
           py::arg("head_bias"), py::arg("loss"), py::arg("head_only") = false,
           "channels, conv_bias, eps: one entry per block; loss: mse or cross_entropy; "
           "head_only: only the Linear head adapts (ANIL)")
      .def("meta_step", &meta_step, py::arg("params"), py::arg("lr"), py::arg("algorithm"),
           py::arg("inner_steps"), py::arg("support_x"), py::arg("support_y"),
           py::arg("query_x"), py::arg("query_y"), py::arg("need_grad"),
           py::arg("support_loss"), py::arg("query_loss"), py::arg("query_accuracy"),
           py::arg("grad"), py::arg("lr_grad"), py::arg("adapted"),
           "Runs one meta-step for every task (images [T, N, C, H, W]) and writes the given "
           "output buffers (grad and lr_grad: one buffer per parameter tensor, torch order; "
           "adapted: [T, P]). lr: a float, or one rate tensor per parameter (Meta-SGD). "
           "Returns whether every support and query loss is finite.")
      .def_property_readonly("num_params", [](const ConvEngine& e) { return e.spec().num_params(); })
      .def_property_readonly("workspace_bytes", &ConvEngine::workspace_bytes);
}

}  // namespace fastmeta
