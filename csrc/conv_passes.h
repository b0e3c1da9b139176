// The four passes of one task's conv network over a set of samples (its support or its
// query set): forward, backward, and their directional derivatives along a parameter
// direction u (Pearlmutter's R-operator, forward-over-reverse; see design/ENGINE.md).
//
// A convolution is a Linear layer on im2col rows (conv_layout.h), so it takes the MLP's
// formulas with x = col(input):
//   forward     z = col W^T + b
//   backward    grad W = dz^T col,  grad b = sum_rows dz,  d col = dz W -> col2im -> dx
//   R-forward   R{z} = col(R{x}) W^T + col U^T + u_b
//   R-backward  (H u)_W = R{dz}^T col + dz^T col(R{x}),  R{d col} = R{dz} W + dz U
// The head is the same with x = the flattened last map. R{x} of the images is zero.
// im2col rows are rebuilt, a cache-sized piece at a time, whenever a product needs them.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_layers.h"
#include "mlp_passes.h"  // sum_rows
#include "small_gemm.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// One block's activations for `samples` samples (M = samples * h * w rows of ch values).
template <typename Scalar>
struct BlockBuffers {
  const Scalar* x = nullptr;  // input [samples, h, w, in_ch]: the images or the last pooled map
  Scalar* xhat = nullptr;     // [M, ch]: normalised convolution output
  Scalar* s = nullptr;        // [ch]: batch-norm scale sqrt(var + eps)
  uint8_t* arg = nullptr;     // [samples, ph, pw, ch]: pooling arg-max
  Scalar* pooled = nullptr;   // [samples, ph, pw, ch]: the next block's input
  Scalar* routed = nullptr;   // [samples, ph, pw, ch]: the xhat each pooled value came from
  Scalar* dpooled = nullptr;  // dL/d pooled
  Scalar* dy = nullptr;       // dL/dy [M, ch] (kept for the R-backward only)
  Scalar* dz = nullptr;       // dL/dz [M, ch] (without R-passes: xhat's buffer, overwritten)
  // R{.} of the above (second order only); R{x} of block b > 0 is the rpooled of b - 1.
  Scalar *rxhat = nullptr, *rs = nullptr, *ry = nullptr, *rpooled = nullptr;
  Scalar *rdpooled = nullptr, *rdy = nullptr, *rdz = nullptr;
  const Scalar* rx = nullptr;
};

// Everything one pass keeps for one set of samples, and the scratch its products use.
template <typename Scalar>
struct ConvPassBuffers {
  int64_t samples = 0;
  Scalar* images = nullptr;  // [samples, H, W, C]: the task's images, channels last
  std::vector<BlockBuffers<Scalar>> blocks;
  Scalar *feat = nullptr, *out = nullptr, *dout = nullptr, *dfeat = nullptr;  // head [N, *]
  Scalar *rfeat = nullptr, *rout = nullptr, *rdout = nullptr, *rdfeat = nullptr;
};

// Pieces of im2col matrices (kColRows rows each), shared by every pass of one thread.
template <typename Scalar>
struct ConvScratch {
  Scalar* col = nullptr;   // col(x)
  Scalar* rcol = nullptr;  // col(R{x})
  Scalar* dcol = nullptr;  // d col, R{d col}
  Scalar* wt = nullptr;    // the forward's transposed weights (two)
  Scalar* stats = nullptr; // [4, ch]: a piece's moments and the running ones
};

// The convolutions' products are large (tens of thousands of im2col rows). Their im2col
// matrices are built kColRows rows at a time and consumed at once, so they stay in cache
// (never a matrix nine times the map); inside a piece, the forward product runs in row
// blocks of kRowBlock so the kernels of small_gemm.h stream an operand that stays in cache.
// (Splitting the depth of the weight gradients changes the order of the sums, not their
// determinism.)
constexpr int64_t kColRows = 128, kRowBlock = 64;

// Register tiles of the convolutions' axpy products (rows x vectors of columns). With
// AVX-512's 32 registers, larger than small_gemm.h's defaults; measured single-threaded at
// Omniglot's block-1 shapes (128 im2col rows, 576 deep, 64 channels): weight gradients
// 8 x 3 ~170 GFLOP/s (4 x 4: ~115), forward 6 x 4 ~180 (4 x 4: ~165).
#if defined(__AVX512F__)
constexpr int kGradTileRows = 8, kGradTileCols = 3, kForwardTileRows = 6, kForwardTileCols = 4;
#else
constexpr int kGradTileCols = kAxpyCols, kGradTileRows = kAxpyAccumulators / kAxpyCols;
constexpr int kForwardTileCols = kAxpyCols, kForwardTileRows = kAxpyAccumulators / kAxpyCols;
#endif

// Wt [k, ch] = W [ch, k_pad]^T (the first k columns).
template <typename Scalar>
void transpose_weight(const ConvBlockLayout& b, const Scalar* w, Scalar* wt) {
  for (int64_t c = 0; c < b.ch; ++c)
    for (int64_t kk = 0; kk < b.k; ++kk) wt[kk * b.ch + c] = w[c * b.k_pad + kk];
}

// The forward products run in axpy form (a broadcast im2col value times a row of W^T, no
// horizontal sums) when the outputs fill whole vectors, over depth chunks of kDepthChunk
// rows of W^T (small enough for L1), accumulated into the output.
constexpr int64_t kDepthChunk = 96;

template <typename Scalar>
bool forward_by_axpy(const ConvBlockLayout& b) {
  return b.ch % Simd<Scalar>::kLanes == 0;
}

// out = col(x) W^T [+ col(x2) W2^T] + bias (x2 may be null), rows of b.ch.
template <typename Scalar>
void conv_apply(const ConvBlockLayout& b, int64_t rows, const Scalar* x, const Scalar* w,
                const Scalar* x2, const Scalar* w2, const Scalar* bias,
                const ConvScratch<Scalar>& scratch, Scalar* out, Moments<Scalar>* moments = nullptr) {
  const bool axpy = forward_by_axpy<Scalar>(b);
  if (axpy) {
    transpose_weight(b, w, scratch.wt);
    if (x2) transpose_weight(b, w2, scratch.wt + b.k * b.ch);
  }
  for (int64_t r0 = 0; r0 < rows; r0 += kColRows) {
    const int64_t m = std::min(kColRows, rows - r0);
    im2col(b, x, r0, r0 + m, scratch.col);
    if (x2) im2col(b, x2, r0, r0 + m, scratch.rcol);
    if (axpy) {
      Scalar* c = out + r0 * b.ch;
      for (int64_t d0 = 0; d0 < b.k; d0 += kDepthChunk) {
        const AxpyOperand<Scalar> ops[2] = {
            {scratch.col + d0, b.k_pad, 1, scratch.wt + d0 * b.ch, b.ch},
            {scratch.rcol + d0, b.k_pad, 1, scratch.wt + (b.k + d0) * b.ch, b.ch}};
        const Scalar* addend = d0 > 0 ? c : bias;
        gemm_axpy<Scalar, kForwardTileRows, kForwardTileCols, kForwardTileRows * kForwardTileCols>(
            m, b.ch, std::min(kDepthChunk, b.k - d0), ops, x2 ? 2 : 1, Scalar(1), addend,
            d0 > 0 ? b.ch : 0, c, b.ch);
      }
      if (moments) moments->add(m, b.ch, c, scratch.stats, scratch.stats + b.ch);
      continue;
    }
    for (int64_t q = 0; q < m; q += kRowBlock) {
      const DotOperand<Scalar> ops[2] = {{scratch.col + q * b.k_pad, b.k_pad, w, b.k_pad},
                                         {scratch.rcol + q * b.k_pad, b.k_pad, w2, b.k_pad}};
      gemm_dot<Scalar>(std::min(kRowBlock, m - q), b.ch, b.k, b.k_pad, ops, x2 ? 2 : 1, bias,
                       out + (r0 + q) * b.ch, b.ch);
    }
    if (moments) moments->add(m, b.ch, out + r0 * b.ch, scratch.stats, scratch.stats + b.ch);
  }
}

// grad = d^T col(x) [+ d2^T col(x2)] ([ch, k_pad]; d rows of b.ch), over the rows in
// pieces of kColRows accumulated into grad.
template <typename Scalar>
void conv_weight_grad(const ConvBlockLayout& b, int64_t rows, const Scalar* d, const Scalar* x,
                      const Scalar* d2, const Scalar* x2, const ConvScratch<Scalar>& scratch,
                      Scalar* grad) {
  for (int64_t r0 = 0; r0 < rows; r0 += kColRows) {
    const int64_t m = std::min(kColRows, rows - r0);
    im2col(b, x, r0, r0 + m, scratch.col);
    if (x2) im2col(b, x2, r0, r0 + m, scratch.rcol);
    const AxpyOperand<Scalar> ops[2] = {{d + r0 * b.ch, 1, b.ch, scratch.col, b.k_pad},
                                        {d2 + r0 * b.ch, 1, b.ch, scratch.rcol, b.k_pad}};
    gemm_axpy<Scalar, kGradTileRows, kGradTileCols, kGradTileRows * kGradTileCols>(b.ch, b.k_pad, m, ops, x2 ? 2 : 1, Scalar(1),
                                                    r0 == 0 ? nullptr : grad, b.k_pad, grad,
                                                    b.k_pad);
  }
}

// dx = col2im(d W [+ d2 W2]) (dx: the block's input map, overwritten).
template <typename Scalar>
void conv_input_grad(const ConvBlockLayout& b, int64_t rows, const Scalar* d, const Scalar* w,
                     const Scalar* d2, const Scalar* w2, const ConvScratch<Scalar>& scratch,
                     Scalar* dx) {
  std::memset(dx, 0, sizeof(Scalar) * rows * b.in_ch);
  for (int64_t r0 = 0; r0 < rows; r0 += kColRows) {
    const int64_t m = std::min(kColRows, rows - r0);
    const AxpyOperand<Scalar> ops[2] = {{d + r0 * b.ch, b.ch, 1, w, b.k_pad},
                                        {d2 + r0 * b.ch, b.ch, 1, w2, b.k_pad}};
    gemm_axpy<Scalar>(m, b.k_pad, b.ch, ops, d2 ? 2 : 1, Scalar(1), nullptr, 0, scratch.dcol, b.k_pad);
    col2im(b, scratch.dcol, r0, r0 + m, dx);
  }
}

// The task's images, NCHW as torch gives them, into channels-last rows.
template <typename Scalar>
void load_images(const ConvLayout<Scalar>& layout, const Scalar* x, ConvPassBuffers<Scalar>& buf) {
  const ConvBlockLayout& first = layout.blocks[0];
  const int64_t hw = first.h * first.w, c = first.in_ch;
  for (int64_t n = 0; n < buf.samples; ++n)
    for (int64_t ci = 0; ci < c; ++ci) {
      const Scalar* src = x + (n * c + ci) * hw;
      Scalar* dst = buf.images + n * hw * c + ci;
      for (int64_t p = 0; p < hw; ++p) dst[p * c] = src[p];
    }
}

namespace detail {

// Rows [samples, in] of a map into rows of stride in_pad (zero-padded), and back.
template <typename Scalar>
void to_features(const HeadLayout& head, int64_t samples, const Scalar* map, Scalar* feat) {
  for (int64_t n = 0; n < samples; ++n) {
    std::memcpy(feat + n * head.in_pad, map + n * head.in, sizeof(Scalar) * head.in);
    std::memset(feat + n * head.in_pad + head.in, 0, sizeof(Scalar) * (head.in_pad - head.in));
  }
}

template <typename Scalar>
void from_features(const HeadLayout& head, int64_t samples, const Scalar* feat, Scalar* map) {
  for (int64_t n = 0; n < samples; ++n)
    std::memcpy(map + n * head.in, feat + n * head.in_pad, sizeof(Scalar) * head.in);
}

}  // namespace detail

// Activations of every block and the flattened features the head reads, at parameters p.
template <typename Scalar>
void body_forward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf,
                  const ConvScratch<Scalar>& scratch) {
  const int64_t n = buf.samples;
  for (int64_t i = 0; i < layout.num_blocks(); ++i) {
    const ConvBlockLayout& b = layout.blocks[i];
    BlockBuffers<Scalar>& bb = buf.blocks[i];
    const int64_t rows = n * b.h * b.w;
    Moments<Scalar> moments{0, scratch.stats + 2 * b.ch, scratch.stats + 3 * b.ch};
    conv_apply<Scalar>(b, rows, bb.x, p + b.weight, nullptr, nullptr,
                       b.bias >= 0 ? p + b.bias : nullptr, scratch, bb.xhat, &moments);
    bn_relu_pool_forward(b, n, Scalar(b.eps), moments, bb.xhat, p + b.gamma, p + b.beta, bb.s,
                         bb.arg, bb.pooled, bb.routed);
  }
  detail::to_features(layout.head, n, buf.blocks.back().pooled, buf.feat);
}

// The head's output from the features, at parameters p (only the head's entries are read).
template <typename Scalar>
void head_forward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf) {
  const HeadLayout& h = layout.head;
  const DotOperand<Scalar> op{buf.feat, h.in_pad, p + h.weight, h.in_pad};
  gemm_dot<Scalar>(buf.samples, h.out, h.in, h.in_pad, &op, 1, h.bias >= 0 ? p + h.bias : nullptr,
                   buf.out, h.out);
}

template <typename Scalar>
void conv_forward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf,
                  const ConvScratch<Scalar>& scratch) {
  body_forward(layout, p, buf, scratch);
  head_forward(layout, p, buf);
}

// Back-propagates dout through the head: its parameter gradient into `grad` (when given)
// and, when `to_body`, d features = dout W into the last block's dpooled.
template <typename Scalar>
void head_backward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf,
                   Scalar* grad, bool to_body) {
  const int64_t n = buf.samples;
  const HeadLayout& h = layout.head;
  if (grad) {
    const AxpyOperand<Scalar> op{buf.dout, 1, h.out, buf.feat, h.in_pad};
    gemm_axpy<Scalar>(h.out, h.in_pad, n, &op, 1, Scalar(1), nullptr, 0, grad + h.weight, h.in_pad);
    if (h.bias >= 0) sum_rows<Scalar>(n, h.out, buf.dout, h.out, Scalar(1), nullptr, grad + h.bias);
  }
  if (to_body) {
    const AxpyOperand<Scalar> op{buf.dout, h.out, 1, p + h.weight, h.in_pad};
    gemm_axpy<Scalar>(n, h.in_pad, h.out, &op, 1, Scalar(1), nullptr, 0, buf.dfeat, h.in_pad);
    detail::from_features(h, n, buf.dfeat, buf.blocks.back().dpooled);
  }
}

// Back-propagates the last block's dpooled through every block: each block's dy and dz,
// and the blocks' parameter gradient into `grad` (a padded vector; skipped when null).
template <typename Scalar>
void body_backward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf,
                   const ConvScratch<Scalar>& scratch, Scalar* grad) {
  const int64_t n = buf.samples;
  for (int64_t i = layout.num_blocks() - 1; i >= 0; --i) {
    const ConvBlockLayout& b = layout.blocks[i];
    BlockBuffers<Scalar>& bb = buf.blocks[i];
    const int64_t rows = n * b.h * b.w;
    Scalar* grad_gamma = grad ? grad + b.gamma : nullptr;
    Scalar* grad_beta = grad ? grad + b.beta : nullptr;
    // (dz may overwrite xhat: each pixel's dz reads only its own xhat.)
    pool_bn_backward(b, n, bb.pooled, bb.arg, bb.dpooled, bb.routed, bb.xhat, bb.s, p + b.gamma, bb.dz,
                     grad_gamma, grad_beta);
    // The R-backward reads dy itself (when it has its own buffer).
    if (bb.dy != bb.xhat) relu_pool_backward(b, n, bb.pooled, bb.arg, bb.dpooled, bb.dy);
    if (grad) {  // grad W = dz^T col: dz read transposed, in place
      conv_weight_grad<Scalar>(b, rows, bb.dz, bb.x, nullptr, nullptr, scratch, grad + b.weight);
      if (b.bias >= 0) sum_rows<Scalar>(rows, b.ch, bb.dz, b.ch, Scalar(1), nullptr, grad + b.bias);
    }
    if (i > 0)  // dx = col2im(dz W)
      conv_input_grad<Scalar>(b, rows, bb.dz, p + b.weight, nullptr, nullptr, scratch,
                              buf.blocks[i - 1].dpooled);
  }
}

// Back-propagates dout: every block's dy and dz, and the parameter gradient into `grad`
// (a padded vector; skipped when null: the reverse sweep needs only the deltas).
template <typename Scalar>
void conv_backward(const ConvLayout<Scalar>& layout, const Scalar* p, ConvPassBuffers<Scalar>& buf,
                   const ConvScratch<Scalar>& scratch, Scalar* grad) {
  head_backward(layout, p, buf, grad, true);
  body_backward(layout, p, buf, scratch, grad);
}

// R{.} of every activation along u, from R{images} = 0.
template <typename Scalar>
void conv_r_forward(const ConvLayout<Scalar>& layout, const Scalar* p, const Scalar* u,
                    ConvPassBuffers<Scalar>& buf, const ConvScratch<Scalar>& scratch) {
  const int64_t n = buf.samples;
  for (int64_t i = 0; i < layout.num_blocks(); ++i) {
    const ConvBlockLayout& b = layout.blocks[i];
    BlockBuffers<Scalar>& bb = buf.blocks[i];
    const int64_t rows = n * b.h * b.w;
    conv_apply<Scalar>(b, rows, bb.x, u + b.weight, i > 0 ? bb.rx : nullptr, p + b.weight,
                       b.bias >= 0 ? u + b.bias : nullptr, scratch, bb.rxhat);  // R{z}, normalised next
    bn_r_forward(rows, b.ch, bb.xhat, bb.s, p + b.gamma, u + b.gamma, u + b.beta, bb.rxhat, bb.rs,
                 bb.ry);
    relu_pool_r_forward(b, n, bb.pooled, bb.arg, bb.ry, bb.rpooled);
  }
  const HeadLayout& h = layout.head;
  detail::to_features(h, n, buf.blocks.back().rpooled, buf.rfeat);
  const DotOperand<Scalar> ops[2] = {{buf.feat, h.in_pad, u + h.weight, h.in_pad},
                                     {buf.rfeat, h.in_pad, p + h.weight, h.in_pad}};
  gemm_dot<Scalar>(n, h.out, h.in, h.in_pad, ops, 2, h.bias >= 0 ? u + h.bias : nullptr, buf.rout, h.out);
}

// R-backward from rdout (after conv_backward and conv_r_forward at the same p and u):
// writes H u into `hu` (a padded vector, every entry a parameter has).
template <typename Scalar>
void conv_r_backward(const ConvLayout<Scalar>& layout, const Scalar* p, const Scalar* u,
                     ConvPassBuffers<Scalar>& buf, const ConvScratch<Scalar>& scratch,
                     Scalar* hu) {
  const int64_t n = buf.samples;
  const HeadLayout& h = layout.head;
  {
    const AxpyOperand<Scalar> ops[2] = {{buf.rdout, 1, h.out, buf.feat, h.in_pad},
                                        {buf.dout, 1, h.out, buf.rfeat, h.in_pad}};
    gemm_axpy<Scalar>(h.out, h.in_pad, n, ops, 2, Scalar(1), nullptr, 0, hu + h.weight, h.in_pad);
    if (h.bias >= 0) sum_rows<Scalar>(n, h.out, buf.rdout, h.out, Scalar(1), nullptr, hu + h.bias);
  }
  {
    const AxpyOperand<Scalar> ops[2] = {{buf.rdout, h.out, 1, p + h.weight, h.in_pad},
                                        {buf.dout, h.out, 1, u + h.weight, h.in_pad}};
    gemm_axpy<Scalar>(n, h.in_pad, h.out, ops, 2, Scalar(1), nullptr, 0, buf.rdfeat, h.in_pad);
    detail::from_features(h, n, buf.rdfeat, buf.blocks.back().rdpooled);
  }
  for (int64_t i = layout.num_blocks() - 1; i >= 0; --i) {
    const ConvBlockLayout& b = layout.blocks[i];
    BlockBuffers<Scalar>& bb = buf.blocks[i];
    const int64_t rows = n * b.h * b.w;
    relu_pool_backward(b, n, bb.pooled, bb.arg, bb.rdpooled, bb.rdy);
    bn_r_backward(rows, b.ch, bb.dy, bb.rdy, bb.xhat, bb.rxhat, bb.s, bb.rs, p + b.gamma,
                  u + b.gamma, bb.rdz, hu + b.gamma, hu + b.beta);
    conv_weight_grad<Scalar>(b, rows, bb.rdz, bb.x, i > 0 ? bb.dz : nullptr,
                             i > 0 ? bb.rx : nullptr, scratch, hu + b.weight);
    if (b.bias >= 0) sum_rows<Scalar>(rows, b.ch, bb.rdz, b.ch, Scalar(1), nullptr, hu + b.bias);
    if (i > 0)  // R{dx} = col2im(R{dz} W + dz U)
      conv_input_grad<Scalar>(b, rows, bb.rdz, p + b.weight, bb.dz, u + b.weight, scratch,
                              buf.blocks[i - 1].rdpooled);
  }
}

// ANIL: R{.} of the head's output along a direction u of the head alone (the features do
// not move: R{feat} = 0).
template <typename Scalar>
void head_r_forward(const ConvLayout<Scalar>& layout, const Scalar* u, ConvPassBuffers<Scalar>& buf) {
  const HeadLayout& h = layout.head;
  const DotOperand<Scalar> op{buf.feat, h.in_pad, u + h.weight, h.in_pad};
  gemm_dot<Scalar>(buf.samples, h.out, h.in, h.in_pad, &op, 1, h.bias >= 0 ? u + h.bias : nullptr,
                   buf.rout, h.out);
}

// ANIL: the head's R-backward from rdout (R{feat} = 0): H u of the head's entries into
// `hu`, and R{d features} = R{dout} W + dout U into buf.rdfeat (rows of h.in_pad).
template <typename Scalar>
void head_r_backward(const ConvLayout<Scalar>& layout, const Scalar* p, const Scalar* u,
                     ConvPassBuffers<Scalar>& buf, Scalar* hu) {
  const int64_t n = buf.samples;
  const HeadLayout& h = layout.head;
  const AxpyOperand<Scalar> op{buf.rdout, 1, h.out, buf.feat, h.in_pad};
  gemm_axpy<Scalar>(h.out, h.in_pad, n, &op, 1, Scalar(1), nullptr, 0, hu + h.weight, h.in_pad);
  if (h.bias >= 0) sum_rows<Scalar>(n, h.out, buf.rdout, h.out, Scalar(1), nullptr, hu + h.bias);
  const AxpyOperand<Scalar> ops[2] = {{buf.rdout, h.out, 1, p + h.weight, h.in_pad},
                                      {buf.dout, h.out, 1, u + h.weight, h.in_pad}};
  gemm_axpy<Scalar>(n, h.in_pad, h.out, ops, 2, Scalar(1), nullptr, 0, buf.rdfeat, h.in_pad);
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
