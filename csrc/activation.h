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
#include <cstring>

#include "mlp_spec.h"
#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// True when sigma'' vanishes, so the R-backward needs no R{y} term.
inline bool is_piecewise_linear(Activation act) {
  return act == Activation::identity || act == Activation::relu;
}

// a = sigma(a) in place on `rows` rows of stride ld whose first `cols` columns are real
// and the rest hold zeros, which must stay zeros. ReLU keeps a zero a zero, so it runs over
// the whole rows in one vectorised sweep; tanh and sigmoid (sigmoid(0) != 0) over the real
// columns only.
template <typename Scalar>
void apply_activation(Activation act, int64_t rows, int64_t cols, Scalar* a, int64_t ld) {
  switch (act) {
    case Activation::identity:
      break;
    case Activation::relu:
#pragma omp simd
      for (int64_t j = 0; j < rows * ld; ++j)  // (a NaN passes, as in torch)
        a[j] = a[j] < Scalar(0) ? Scalar(0) : a[j];
      break;
    case Activation::tanh:
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) a[r * ld + j] = std::tanh(a[r * ld + j]);
      break;
    case Activation::sigmoid:
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j)
          a[r * ld + j] = Scalar(1) / (Scalar(1) + std::exp(-a[r * ld + j]));
      break;
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

// The two functions below run over `count` elements of whole padded rows: a padding
// column holds a = 0 and a zero in every other operand, and sigma'(0) * 0 = sigma''(0) *
// 0 = 0 for every activation, so the padding stays zero.

// out = sigma'(a) * in (out may alias in).
template <typename Scalar>
void multiply_by_slope(Activation act, int64_t count, const Scalar* a, const Scalar* in,
                       Scalar* out) {
  switch (act) {
    case Activation::identity:
      if (out != in) std::memcpy(out, in, sizeof(Scalar) * count);
      break;
    case Activation::relu:
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) out[j] = a[j] > Scalar(0) ? in[j] : Scalar(0);
      break;
    default:
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) out[j] = activation_slope(act, a[j]) * in[j];
      break;
  }
}

// The R-backward through the activation:
//   R{d} = sigma''(y) R{y} delta_a + sigma'(y) R{delta_a}
template <typename Scalar>
void activation_r_backward(Activation act, int64_t count, const Scalar* a, const Scalar* r_pre,
                           const Scalar* delta_a, const Scalar* r_delta_a, Scalar* r_delta_pre) {
  if (is_piecewise_linear(act)) {
    multiply_by_slope(act, count, a, r_delta_a, r_delta_pre);
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    r_delta_pre[j] = activation_curvature(act, a[j]) * r_pre[j] * delta_a[j] +
                     activation_slope(act, a[j]) * r_delta_a[j];
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
