// The four passes of one task's MLP over a set of rows (its support or its query set):
// forward, backward, and their directional derivatives along a parameter direction u
// (Pearlmutter's R-operator, forward-over-reverse; see design/ENGINE.md):
//
//   forward     y = x W^T + b,  a = sigma(y)
//   backward    d = sigma'(y) delta_a,  grad W = d^T x,  grad b = sum_rows d,  delta_x = d W
//   R-forward   R{y} = R{x} W^T + x U^T + u_b,  R{a} = sigma'(y) R{y}
//   R-backward  R{d} = sigma''(y) R{y} delta_a + sigma'(y) R{delta_a}
//               (H u)_W = R{d}^T x + d^T R{x},  (H u)_b = sum_rows R{d},
//               R{delta_x} = R{d} W + d U
//
// Each pass runs over a range of layers [from, to): the adapted layers of ANIL's head, or
// its body, or all of them. R{x} of the range's input is zero: inputs and ANIL's
// features do not depend on the adapted weights.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "activation.h"
#include "mlp_layout.h"
#include "small_gemm.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// Everything one pass keeps per layer for a set of `rows` rows. Rows are padded to the
// layer's vector width; padding columns hold zeros and no pass writes them (except the
// delta_x products, whose padding columns nothing reads).
template <typename Scalar>
struct PassBuffers {
  int64_t rows = 0;
  const Scalar* input = nullptr;  // the layer-0 input: the caller's rows, or input_copy
  Scalar* input_copy = nullptr;   // [rows, width(0)]: when the input rows need padding
  std::vector<Scalar*> act;       // act[l]: input of layer l (l >= 1), act[L]: the output
  std::vector<Scalar*> dact;      // dL/d act[l]
  std::vector<Scalar*> dpre;      // dpre[l]: dL/d y of layer l
  std::vector<Scalar*> ract, rpre, rdact, rdpre;  // R{.} of the above (second order only)

  const Scalar* in(int64_t l) const { return l == 0 ? input : act[l]; }

  // Points the layer-0 input at task rows x [rows, in], copying them when padding is needed.
  template <typename Layout>
  void set_input(const Layout& layout, const Scalar* x) {
    const LayerLayout& first = layout.layers[0];
    if (first.in == first.in_pad) {
      input = x;
      return;
    }
    for (int64_t r = 0; r < rows; ++r)
      std::memcpy(input_copy + r * first.in_pad, x + r * first.in, sizeof(Scalar) * first.in);
    input = input_copy;
  }
};

// act[l + 1] = sigma(act[l] W^T + b) for l in [from, to).
template <typename Scalar>
void forward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
             PassBuffers<Scalar>& buf, int64_t from, int64_t to) {
  for (int64_t l = from; l < to; ++l) {
    const LayerLayout& layer = layout.layers[l];
    const DotOperand<Scalar> op{buf.in(l), layer.in_pad, params.weight(layer), layer.in_pad};
    gemm_dot(buf.rows, layer.out, layer.in, layer.in_pad, &op, 1, params.bias(layer),
             buf.act[l + 1], layer.out_pad);
    apply_activation(layer.act, buf.rows, layer.out, buf.act[l + 1], layer.out_pad);
  }
}

// sum over rows of d [rows, cols] (row stride ld), times scale, into (or onto) out.
template <typename Scalar>
void sum_rows(int64_t rows, int64_t cols, const Scalar* d, int64_t ld, Scalar scale,
              bool accumulate, Scalar* out) {
  if (!accumulate) std::memset(out, 0, sizeof(Scalar) * cols);
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) out[j] += scale * d[r * ld + j];
  }
}

// Back-propagates dact[to] through layers [from, to): dpre[l]; the parameter gradient
// into `grad` (skipped when grad.base is null; added to it when accumulate); dact[l]
// for from < l < to, and dact[from] too when input_delta.
template <typename Scalar>
void backward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
              PassBuffers<Scalar>& buf, int64_t from, int64_t to, ParamView<Scalar> grad,
              bool accumulate, bool input_delta) {
  const int64_t rows = buf.rows;
  for (int64_t l = to - 1; l >= from; --l) {
    const LayerLayout& layer = layout.layers[l];
    multiply_by_slope(layer.act, rows, layer.out, buf.act[l + 1], buf.dact[l + 1], buf.dpre[l],
                      layer.out_pad);
    if (grad.base) {
      // grad W[o, :] = sum_n d[n, o] x[n, :]: d read transposed, in place.
      const AxpyOperand<Scalar> op{buf.dpre[l], 1, layer.out_pad, buf.in(l), layer.in_pad};
      gemm_axpy(layer.out, layer.in_pad, rows, &op, 1, Scalar(1), accumulate,
                grad.weight(layer), layer.in_pad);
      if (layer.bias >= 0)
        sum_rows(rows, layer.out, buf.dpre[l], layer.out_pad, Scalar(1), accumulate,
                 grad.bias(layer));
    }
    if (l > from || input_delta) {
      const AxpyOperand<Scalar> op{buf.dpre[l], layer.out_pad, 1, params.weight(layer),
                                   layer.in_pad};
      gemm_axpy(rows, layer.in_pad, layer.out, &op, 1, Scalar(1), false, buf.dact[l],
                layer.in_pad);
    }
  }
}

// R{act} through layers [from, to) along the direction u, with R{act[from]} = 0.
template <typename Scalar>
void r_forward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
               ParamView<const Scalar> u, PassBuffers<Scalar>& buf, int64_t from, int64_t to) {
  for (int64_t l = from; l < to; ++l) {
    const LayerLayout& layer = layout.layers[l];
    const DotOperand<Scalar> ops[2] = {
        {buf.in(l), layer.in_pad, u.weight(layer), layer.in_pad},
        {buf.ract[l], layer.in_pad, params.weight(layer), layer.in_pad}};
    gemm_dot(buf.rows, layer.out, layer.in, layer.in_pad, ops, l > from ? 2 : 1, u.bias(layer),
             buf.rpre[l], layer.out_pad);
    multiply_by_slope(layer.act, buf.rows, layer.out, buf.act[l + 1], buf.rpre[l],
                      buf.ract[l + 1], layer.out_pad);
  }
}

// R-backward through layers [from, to) from rdact[to]: adds scale * (H u) to `hu`, and,
// when input_target is non-null, adds input_scale * R{delta} of the range's input to it
// (ANIL: the derivative of the inner gradient with respect to the features).
template <typename Scalar>
void r_backward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
                ParamView<const Scalar> u, PassBuffers<Scalar>& buf, int64_t from, int64_t to,
                ParamView<Scalar> hu, Scalar scale, Scalar* input_target, Scalar input_scale) {
  const int64_t rows = buf.rows;
  for (int64_t l = to - 1; l >= from; --l) {
    const LayerLayout& layer = layout.layers[l];
    activation_r_backward(layer.act, rows, layer.out, buf.act[l + 1], buf.rpre[l],
                          buf.dact[l + 1], buf.rdact[l + 1], buf.rdpre[l], layer.out_pad);
    const AxpyOperand<Scalar> hu_ops[2] = {
        {buf.rdpre[l], 1, layer.out_pad, buf.in(l), layer.in_pad},
        {buf.dpre[l], 1, layer.out_pad, buf.ract[l], layer.in_pad}};
    gemm_axpy(layer.out, layer.in_pad, rows, hu_ops, l > from ? 2 : 1, scale, true,
              hu.weight(layer), layer.in_pad);
    if (layer.bias >= 0)
      sum_rows(rows, layer.out, buf.rdpre[l], layer.out_pad, scale, true, hu.bias(layer));
    if (l > from || input_target) {
      const AxpyOperand<Scalar> ops[2] = {
          {buf.rdpre[l], layer.out_pad, 1, params.weight(layer), layer.in_pad},
          {buf.dpre[l], layer.out_pad, 1, u.weight(layer), layer.in_pad}};
      if (l > from)
        gemm_axpy(rows, layer.in_pad, layer.out, ops, 2, Scalar(1), false, buf.rdact[l],
                  layer.in_pad);
      else
        gemm_axpy(rows, layer.in_pad, layer.out, ops, 2, input_scale, true, input_target,
                  layer.in_pad);
    }
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
