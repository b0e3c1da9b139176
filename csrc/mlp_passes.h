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
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "mlp_layout.h"
#include "small_gemm.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// Everything one pass keeps per layer for a set of `rows` rows. Rows are padded to the
// layer's vector width; padding columns hold zeros, and whatever a pass writes to them is
// zero again (products against zero padding, sigma'(0) * 0), so whole padded rows can be
// processed as flat arrays.
template <typename Scalar>
struct PassBuffers {
  int64_t rows = 0;
  const Scalar* input = nullptr;  // the layer-0 input: the caller's rows, or input_copy
  Scalar* input_copy = nullptr;   // [rows, width(0)]: when the input rows need padding
  std::vector<Scalar*> act;       // act[l]: input of layer l (l >= 1), act[L]: the output
  std::vector<Scalar*> dact;      // dL/d act[l]
  std::vector<Scalar*> dpre;      // dpre[l]: dL/d y of layer l
  std::vector<Scalar*> ract, rpre, rdact, rdpre;  // R{.} of the above (second order only)
  Scalar* scratch = nullptr;  // transposed weights and G^T: 2 * max in * out_pad

  const Scalar* in(int64_t l) const { return l == 0 ? input : act[l]; }

  // Points the layer-0 input at task rows x [rows, in], copying them when padding is needed.
  template <typename Layout>
  void set_input(const Layout& layout, const Scalar* x) {
    const LayerLayout& first = layout.layers[0];
    if (first.in == first.in_pad) {
      input = x;
      return;
    }
    copy_rows(rows, first.in, x, first.in, input_copy, first.in_pad);
    input = input_copy;
  }
};

// W^T for an axpy-form product: theta's precomputed copy, or a transposition into
// `scratch` (see LayerLayout::axpy_form).
template <typename Scalar>
const Scalar* transposed_weight(const LayerLayout& layer, ParamView<const Scalar> params,
                                Scalar* scratch) {
  if (const Scalar* wt = params.weight_t(layer)) return wt;
  transpose_weight(layer, params.weight(layer), scratch);
  return scratch;
}

// act[l + 1] = sigma(act[l] W^T + b) for l in [from, to).
template <typename Scalar>
void forward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
             PassBuffers<Scalar>& buf, int64_t from, int64_t to) {
  for (int64_t l = from; l < to; ++l) {
    const LayerLayout& layer = layout.layers[l];
    if (params.weight_t(layer) || layer.axpy_form(buf.rows)) {
      const Scalar* wt = transposed_weight(layer, params, buf.scratch);
      const AxpyOperand<Scalar> op{buf.in(l), layer.in_pad, 1, wt, layer.out_pad};
      const bool relu = layer.act == Activation::relu;
      gemm_axpy(buf.rows, layer.out_pad, layer.in, &op, 1, Scalar(1), params.bias(layer), 0,
                buf.act[l + 1], layer.out_pad, relu);
      if (!relu) apply_activation(layer.act, buf.rows, layer.out, buf.act[l + 1], layer.out_pad);
    } else {
      const DotOperand<Scalar> op{buf.in(l), layer.in_pad, params.weight(layer), layer.in_pad};
      gemm_dot(buf.rows, layer.out, layer.in, layer.in_pad, &op, 1, params.bias(layer),
               buf.act[l + 1], layer.out_pad);
      apply_activation(layer.act, buf.rows, layer.out, buf.act[l + 1], layer.out_pad);
    }
  }
}

// Where a pass puts a parameter-shaped result g (a gradient, or H u):
//   out = addend + scale * g
// addend.base null: nothing added; addend == out: accumulate; addend = phi_k and scale =
// -lr: the SGD step phi_{k+1} = phi_k - lr g, fused into the product's last write.
template <typename Scalar>
struct ParamSink {
  ParamView<Scalar> out;
  Scalar scale = Scalar(1);
  ParamView<const Scalar> addend{nullptr, 0};
};

// out[j] = addend[j] + scale * sum_r d[r, j] over whole vectors (addend may be null or
// alias out; padding columns read zero and so write zero). The running totals of a few
// vectors stay in registers while the rows stream past.
template <typename Scalar>
void sum_rows(int64_t rows, int64_t cols_padded, const Scalar* d, int64_t ld, Scalar scale,
              const Scalar* addend, Scalar* out) {
  using S = Simd<Scalar>;
  constexpr int64_t kChunk = 4 * S::kLanes;
  const auto columns = [&](int64_t j0, auto width) {
    constexpr int kVectors = decltype(width)::value;
    typename S::Vec total[kVectors];
    for (int v = 0; v < kVectors; ++v) total[v] = S::load(d + j0 + v * S::kLanes);
    for (int64_t r = 1; r < rows; ++r)
      for (int v = 0; v < kVectors; ++v) total[v] += S::load(d + r * ld + j0 + v * S::kLanes);
    const typename S::Vec factor = S::broadcast(scale);
    for (int v = 0; v < kVectors; ++v) {
      typename S::Vec x = total[v] * factor;
      if (addend) x += S::load(addend + j0 + v * S::kLanes);
      S::store(out + j0 + v * S::kLanes, x);
    }
  };
  int64_t j0 = 0;
  for (; j0 + kChunk <= cols_padded; j0 += kChunk) columns(j0, std::integral_constant<int, 4>{});
  for (; j0 < cols_padded; j0 += S::kLanes) columns(j0, std::integral_constant<int, 1>{});
}

// Layer `layer`'s weight and bias results sum_p d_p^T x_p (d_p: [rows, out_pad] deltas,
// x_p: [rows, in_pad] layer inputs; the bias from d_0 alone) into `sink`.
template <typename Scalar>
void write_param_result(const LayerLayout& layer, int64_t rows, const Scalar* const* d,
                        const Scalar* const* x, int num_ops, Scalar* scratch,
                        const ParamSink<Scalar>& sink) {
  const Scalar* addend = sink.addend.base ? sink.addend.weight(layer) : nullptr;
  Scalar* out = sink.out.weight(layer);
  AxpyOperand<Scalar> ops[2];
  if (layer.narrow) {
    // G^T = sum_p x_p^T d_p ([in, out_pad], x read transposed in place), scattered into
    // G's few real columns; G's padding columns stay zero.
    for (int p = 0; p < num_ops; ++p) ops[p] = {x[p], 1, layer.in_pad, d[p], layer.out_pad};
    gemm_axpy<Scalar>(layer.in, layer.out_pad, rows, ops, num_ops, Scalar(1), nullptr, 0,
                      scratch, layer.out_pad);
    for (int64_t o = 0; o < layer.out; ++o)
      for (int64_t i = 0; i < layer.in; ++i) {
        const int64_t at = o * layer.in_pad + i;
        out[at] = (addend ? addend[at] : Scalar(0)) + sink.scale * scratch[i * layer.out_pad + o];
      }
  } else {
    // G[o, :] = sum_n d[n, o] x[n, :]: d read transposed, in place.
    for (int p = 0; p < num_ops; ++p) ops[p] = {d[p], 1, layer.out_pad, x[p], layer.in_pad};
    gemm_axpy(layer.out, layer.in_pad, rows, ops, num_ops, sink.scale, addend, layer.in_pad,
              out, layer.in_pad);
  }
  if (layer.bias >= 0)
    sum_rows(rows, layer.out_pad, d[0], layer.out_pad, sink.scale,
             sink.addend.base ? sink.addend.bias(layer) : nullptr, sink.out.bias(layer));
}

// Back-propagates dact[to] through layers [from, to): dpre[l]; the parameter gradient
// into `sink` (skipped when null); dact[l] for from < l < to, and dact[from] too when
// input_delta.
template <typename Scalar>
void backward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
              PassBuffers<Scalar>& buf, int64_t from, int64_t to, const ParamSink<Scalar>* sink,
              bool input_delta) {
  const int64_t rows = buf.rows;
  for (int64_t l = to - 1; l >= from; --l) {
    const LayerLayout& layer = layout.layers[l];
    multiply_by_slope(layer.act, rows * layer.out_pad, buf.act[l + 1], buf.dact[l + 1],
                      buf.dpre[l]);
    // delta_x = d W first: the sink may overwrite W (an in-place SGD step).
    if (l > from || input_delta) {
      const AxpyOperand<Scalar> op{buf.dpre[l], layer.out_pad, 1, params.weight(layer),
                                   layer.in_pad};
      gemm_axpy<Scalar>(rows, layer.in_pad, layer.out, &op, 1, Scalar(1), nullptr, 0, buf.dact[l],
                        layer.in_pad);
    }
    if (sink) {
      const Scalar* d = buf.dpre[l];
      const Scalar* x = buf.in(l);
      write_param_result(layer, rows, &d, &x, 1, buf.scratch, *sink);
    }
  }
}

// R{act} through layers [from, to) along the direction u, with R{act[from]} = 0.
template <typename Scalar>
void r_forward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
               ParamView<const Scalar> u, PassBuffers<Scalar>& buf, int64_t from, int64_t to) {
  for (int64_t l = from; l < to; ++l) {
    const LayerLayout& layer = layout.layers[l];
    const int num_ops = l > from ? 2 : 1;
    if (layer.axpy_form(buf.rows)) {  // both products over W^T (u's, and params' if needed)
      const Scalar* ut = transposed_weight(layer, u, buf.scratch);
      Scalar* second = buf.scratch + layer.in * layer.out_pad;
      const Scalar* wt = num_ops > 1 ? transposed_weight(layer, params, second) : nullptr;
      const AxpyOperand<Scalar> ops[2] = {{buf.in(l), layer.in_pad, 1, ut, layer.out_pad},
                                          {buf.ract[l], layer.in_pad, 1, wt, layer.out_pad}};
      gemm_axpy(buf.rows, layer.out_pad, layer.in, ops, num_ops, Scalar(1), u.bias(layer), 0,
                buf.rpre[l], layer.out_pad);
    } else {
      const DotOperand<Scalar> ops[2] = {
          {buf.in(l), layer.in_pad, u.weight(layer), layer.in_pad},
          {buf.ract[l], layer.in_pad, params.weight(layer), layer.in_pad}};
      gemm_dot(buf.rows, layer.out, layer.in, layer.in_pad, ops, num_ops, u.bias(layer),
               buf.rpre[l], layer.out_pad);
    }
    multiply_by_slope(layer.act, buf.rows * layer.out_pad, buf.act[l + 1], buf.rpre[l],
                      buf.ract[l + 1]);
  }
}

// R-backward through layers [from, to) from rdact[to]: writes H u into `hu` (usually
// accumulating: v_k = v_{k+1} - lr H u), and, when input_target is non-null, adds
// input_scale * R{delta} of the range's input to it (ANIL: the derivative of the inner
// gradient with respect to the features). Each layer reads u's weights before `hu` is
// written, so u may alias the accumulator (scalar learning rate: u = v, scale = -lr).
template <typename Scalar>
void r_backward(const MlpLayout<Scalar>& layout, ParamView<const Scalar> params,
                ParamView<const Scalar> u, PassBuffers<Scalar>& buf, int64_t from, int64_t to,
                const ParamSink<Scalar>& hu, Scalar* input_target, Scalar input_scale) {
  const int64_t rows = buf.rows;
  for (int64_t l = to - 1; l >= from; --l) {
    const LayerLayout& layer = layout.layers[l];
    activation_r_backward(layer.act, rows * layer.out_pad, buf.act[l + 1], buf.rpre[l],
                          buf.dact[l + 1], buf.rdact[l + 1], buf.rdpre[l]);
    if (l > from || input_target) {  // R{delta_x} = R{d} W + d U
      const AxpyOperand<Scalar> ops[2] = {
          {buf.rdpre[l], layer.out_pad, 1, params.weight(layer), layer.in_pad},
          {buf.dpre[l], layer.out_pad, 1, u.weight(layer), layer.in_pad}};
      if (l > from)
        gemm_axpy<Scalar>(rows, layer.in_pad, layer.out, ops, 2, Scalar(1), nullptr, 0,
                          buf.rdact[l], layer.in_pad);
      else
        gemm_axpy(rows, layer.in_pad, layer.out, ops, 2, input_scale, input_target,
                  layer.in_pad, input_target, layer.in_pad);
    }
    // (H u)_W = R{d}^T x + d^T R{x}, (H u)_b = sum_rows R{d}
    const Scalar* d[2] = {buf.rdpre[l], buf.dpre[l]};
    const Scalar* x[2] = {buf.in(l), buf.ract[l]};
    write_param_result(layer, rows, d, x, l > from ? 2 : 1, buf.scratch, hu);
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
