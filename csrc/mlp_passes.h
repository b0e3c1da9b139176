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

// out[j] = addend[j] + scale * sum_r d[r, j] (addend may be null or alias out). Rows are
// added whole (contiguous, vectorised) into a chunk of running totals.
template <typename Scalar>
void sum_rows(int64_t rows, int64_t cols, const Scalar* d, int64_t ld, Scalar scale,
              const Scalar* addend, Scalar* out) {
  constexpr int64_t kChunk = 256;
  Scalar total[kChunk];
  for (int64_t j0 = 0; j0 < cols; j0 += kChunk) {
    const int64_t n = std::min(kChunk, cols - j0);
    std::memcpy(total, d + j0, sizeof(Scalar) * n);
    for (int64_t r = 1; r < rows; ++r) {
      const Scalar* row = d + r * ld + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) total[j] += row[j];
    }
    for (int64_t j = 0; j < n; ++j)
      out[j0 + j] = (addend ? addend[j0 + j] : Scalar(0)) + scale * total[j];
  }
}

// Layer `layer`'s weight and bias results from the products of the given operand pairs
// (ops: d read transposed against the layer inputs; `rows` samples deep) into `sink`.
template <typename Scalar>
void write_param_result(const LayerLayout& layer, int64_t rows, const AxpyOperand<Scalar>* ops,
                        int num_ops, const Scalar* bias_rows, const ParamSink<Scalar>& sink) {
  const Scalar* addend = sink.addend.base ? sink.addend.weight(layer) : nullptr;
  gemm_axpy(layer.out, layer.in_pad, rows, ops, num_ops, sink.scale, addend, layer.in_pad,
            sink.out.weight(layer), layer.in_pad);
  if (layer.bias >= 0)
    sum_rows(rows, layer.out, bias_rows, layer.out_pad, sink.scale,
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
    multiply_by_slope(layer.act, rows, layer.out, buf.act[l + 1], buf.dact[l + 1], buf.dpre[l],
                      layer.out_pad);
    // delta_x = d W first: the sink may overwrite W (an in-place SGD step).
    if (l > from || input_delta) {
      const AxpyOperand<Scalar> op{buf.dpre[l], layer.out_pad, 1, params.weight(layer),
                                   layer.in_pad};
      gemm_axpy<Scalar>(rows, layer.in_pad, layer.out, &op, 1, Scalar(1), nullptr, 0, buf.dact[l],
                layer.in_pad);
    }
    if (sink) {  // grad W[o, :] = sum_n d[n, o] x[n, :]: d read transposed, in place
      const AxpyOperand<Scalar> op{buf.dpre[l], 1, layer.out_pad, buf.in(l), layer.in_pad};
      write_param_result(layer, rows, &op, 1, buf.dpre[l], *sink);
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
    activation_r_backward(layer.act, rows, layer.out, buf.act[l + 1], buf.rpre[l],
                          buf.dact[l + 1], buf.rdact[l + 1], buf.rdpre[l], layer.out_pad);
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
    const AxpyOperand<Scalar> ops[2] = {
        {buf.rdpre[l], 1, layer.out_pad, buf.in(l), layer.in_pad},
        {buf.dpre[l], 1, layer.out_pad, buf.ract[l], layer.in_pad}};
    write_param_result(layer, rows, ops, l > from ? 2 : 1, buf.rdpre[l], hu);
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
