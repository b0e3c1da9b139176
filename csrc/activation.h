// The element-wise activations and the derivatives the passes need, written in terms of
// the activation's output a = sigma(y): the engine keeps only a, never y.
//
//   identity  sigma' = 1            sigma'' = 0
//   relu      sigma' = [a > 0]      sigma'' = 0     (torch's relu backward masks on a > 0)
//   tanh      sigma' = 1 - a^2      sigma'' = -2 a (1 - a^2)
//   sigmoid   sigma' = a (1 - a)    sigma'' = a (1 - a) (1 - 2 a)
#pragma once
#include <cmath>
#include <cstdint>

#include "mlp_spec.h"
#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// True when sigma'' vanishes, so the R-backward needs no R{y} term.
inline bool is_piecewise_linear(Activation act) {
  return act == Activation::identity || act == Activation::relu;
}

// a = sigma(a) in place, on the first `cols` columns of each row.
template <typename Scalar>
void apply_activation(Activation act, int64_t rows, int64_t cols, Scalar* a, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    Scalar* row = a + r * ld;
    switch (act) {
      case Activation::identity:
        break;
      case Activation::relu:
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) row[j] = row[j] > Scalar(0) ? row[j] : Scalar(0);
        break;
      case Activation::tanh:
        for (int64_t j = 0; j < cols; ++j) row[j] = std::tanh(row[j]);
        break;
      case Activation::sigmoid:
        for (int64_t j = 0; j < cols; ++j) row[j] = Scalar(1) / (Scalar(1) + std::exp(-row[j]));
        break;
    }
  }
}

template <typename Scalar>
inline Scalar activation_slope(Activation act, Scalar a) {  // sigma'
  switch (act) {
    case Activation::relu:
      return a > Scalar(0) ? Scalar(1) : Scalar(0);
    case Activation::tanh:
      return Scalar(1) - a * a;
    case Activation::sigmoid:
      return a * (Scalar(1) - a);
    default:
      return Scalar(1);
  }
}

template <typename Scalar>
inline Scalar activation_curvature(Activation act, Scalar a) {  // sigma''
  switch (act) {
    case Activation::tanh:
      return Scalar(-2) * a * (Scalar(1) - a * a);
    case Activation::sigmoid:
      return a * (Scalar(1) - a) * (Scalar(1) - Scalar(2) * a);
    default:
      return Scalar(0);
  }
}

// out = sigma'(a) * in, on the first `cols` columns (out may alias in).
template <typename Scalar>
void multiply_by_slope(Activation act, int64_t rows, int64_t cols, const Scalar* a,
                       const Scalar* in, Scalar* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar* ar = a + r * ld;
    const Scalar* ir = in + r * ld;
    Scalar* orow = out + r * ld;
    switch (act) {
      case Activation::identity:
        if (orow != ir)
          for (int64_t j = 0; j < cols; ++j) orow[j] = ir[j];
        break;
      case Activation::relu:
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) orow[j] = ar[j] > Scalar(0) ? ir[j] : Scalar(0);
        break;
      default:
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) orow[j] = activation_slope(act, ar[j]) * ir[j];
        break;
    }
  }
}

// The R-backward through the activation:
//   R{d} = sigma''(y) R{y} delta_a + sigma'(y) R{delta_a}
template <typename Scalar>
void activation_r_backward(Activation act, int64_t rows, int64_t cols, const Scalar* a,
                           const Scalar* r_pre, const Scalar* delta_a,
                           const Scalar* r_delta_a, Scalar* r_delta_pre, int64_t ld) {
  if (is_piecewise_linear(act)) {
    multiply_by_slope(act, rows, cols, a, r_delta_a, r_delta_pre, ld);
    return;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * ld;
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) {
      r_delta_pre[o + j] = activation_curvature(act, a[o + j]) * r_pre[o + j] * delta_a[o + j] +
                           activation_slope(act, a[o + j]) * r_delta_a[o + j];
    }
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
