// pybind11 entry point of fastmeta._core. Framework-free: every kernel reads and
// writes plain buffers, so one build serves any PyTorch version.
#include <pybind11/pybind11.h>

#include <string>

#include "buffer.h"
#include "mlp_engine.h"
#include "reptile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace fastmeta;

namespace fastmeta {
void bind_mlp_engine(py::module_& m);   // mlp_bindings.cpp
void bind_conv_engine(py::module_& m);  // conv_bindings.cpp
}

namespace {

template <typename Scalar>
void bind_reptile_direction(const py::buffer& theta, const py::buffer& task_weights,
                            const py::buffer& out) {
  auto t = view_buffer<Scalar>(theta, "theta", 1, false);
  auto w = view_buffer<Scalar>(task_weights, "task_weights", 2, false);
  auto o = view_buffer<Scalar>(out, "out", 1, true);
  if (w.shape[1] != t.shape[0] || o.shape[0] != t.shape[0]) {
    throw py::value_error("reptile_direction: theta [P], task_weights [T, P] and out [P] "
                          "disagree on P");
  }
  if (w.shape[0] < 1) throw py::value_error("reptile_direction: task_weights has no tasks");
  py::gil_scoped_release release;
  reptile_direction<Scalar>(t.data, w.data, w.shape[0], t.shape[0], o.data);
}

void reptile_direction_any(const py::buffer& theta, const py::buffer& task_weights,
                           const py::buffer& out) {
  const std::string format = Buffer(theta, false).format();
  if (format == FormatOf<float>::name) {
    bind_reptile_direction<float>(theta, task_weights, out);
  } else if (format == FormatOf<double>::name) {
    bind_reptile_direction<double>(theta, task_weights, out);
  } else {
    throw py::type_error("reptile_direction: only float32 and float64 are supported, got '" +
                         format + "'");
  }
}

py::dict build_info() {
  py::dict info;
  info["version"] = FASTMETA_VERSION;
  info["compiler"] = FASTMETA_COMPILER;
  info["openmp"] = static_cast<bool>(FASTMETA_OPENMP);
#ifdef _OPENMP
  info["max_threads"] = omp_get_max_threads();
#else
  info["max_threads"] = 1;
#endif
  info["cuda"] = false;
  info["engine_isa"] = engine_isa();
  return info;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fastmeta's compiled core: batched meta-learning kernels over plain buffers";
  m.def("reptile_direction", &reptile_direction_any, py::arg("theta"),
        py::arg("task_weights"), py::arg("out"),
        "out[p] = theta[p] - mean_t task_weights[t, p] (float32 or float64, C-contiguous)");
  m.def("build_info", &build_info, "What this build of the core contains");
  bind_mlp_engine(m);
  bind_conv_engine(m);
}
