// The conv engine's internal parameter layout and its conversion from and to torch's.
//
// Activations are channels-last (NHWC), so a convolution is a Linear layer applied to
// im2col rows whose entries run (kh, kw, c_in): the engine keeps each convolution weight
// as [C_out, 9 * C_in] in that order, each row padded with zeros to whole vectors (the
// matrix-product kernels of small_gemm.h read full vectors only). The head reads the last
// pooled map flattened as (h, w, c), so its weight columns are permuted from torch's
// (c, h, w) and padded the same way. Every tensor starts on a vector boundary.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_spec.h"
#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

struct ConvBlockLayout {
  int64_t in_ch, ch;             // input and output channels
  int64_t h, w;                  // the block's input (and convolution output) size
  int64_t ph, pw;                // after pooling
  int64_t k, k_pad;              // im2col row: 9 * in_ch values, padded
  int64_t weight, bias;          // offsets in the padded vector (bias < 0: none)
  int64_t gamma, beta;           // batch norm's affine parameters
  double eps;
};

struct HeadLayout {
  int64_t in, in_pad, out;  // features (h, w, c order), padded; outputs
  int64_t h, w, ch;         // the pooled map it reads
  int64_t weight, bias;     // bias < 0: none
};

template <typename Scalar>
struct ConvLayout {
  std::vector<ConvBlockLayout> blocks;
  HeadLayout head;
  int64_t padded_size = 0;  // Pp: length of a padded parameter vector
  int64_t user_size = 0;    // P: length of torch's flat parameter vector
  std::vector<int64_t> tensor_start;  // each torch tensor's offset in the flat vector

  explicit ConvLayout(const ConvSpec& spec) {
    int64_t offset = 0;
    const auto take = [&offset](int64_t count) {
      const int64_t at = offset;
      offset += padded_width<Scalar>(count);
      return at;
    };
    for (int64_t b = 0; b < spec.num_blocks(); ++b) {
      ConvBlockLayout block;
      block.in_ch = spec.block_in_channels(b);
      block.ch = spec.channels[b];
      block.h = spec.block_height(b);
      block.w = spec.block_width(b);
      block.ph = spec.block_height(b + 1);
      block.pw = spec.block_width(b + 1);
      block.k = 9 * block.in_ch;
      block.k_pad = padded_width<Scalar>(block.k);
      block.weight = take(block.ch * block.k_pad);
      block.bias = spec.conv_bias[b] ? take(block.ch) : -1;
      block.gamma = take(block.ch);
      block.beta = take(block.ch);
      block.eps = spec.eps[b];
      blocks.push_back(block);
    }
    const ConvBlockLayout& last = blocks.back();
    head.h = last.ph;
    head.w = last.pw;
    head.ch = last.ch;
    head.in = spec.features();
    head.in_pad = padded_width<Scalar>(head.in);
    head.out = spec.outputs;
    head.weight = take(head.out * head.in_pad);
    head.bias = spec.head_bias ? take(head.out) : -1;
    padded_size = offset;
    user_size = spec.num_params();
    int64_t start = 0;
    for (int64_t size : spec.tensor_sizes()) {
      tensor_start.push_back(start);
      start += size;
    }
  }

  int64_t num_blocks() const { return static_cast<int64_t>(blocks.size()); }

  // Visits every parameter element as (padded index, index inside its torch tensor), tensor
  // by tensor in torch order: visit(tensor, padded, user).
  template <typename Visit>
  void for_each(Visit&& visit) const {
    int64_t t = 0;
    for (const ConvBlockLayout& b : blocks) {
      // torch [co, ci, kh, kw] -> engine [co, (kh * 3 + kw) * in_ch + ci]
      for (int64_t co = 0; co < b.ch; ++co)
        for (int64_t ci = 0; ci < b.in_ch; ++ci)
          for (int64_t tap = 0; tap < 9; ++tap)
            visit(t, b.weight + co * b.k_pad + tap * b.in_ch + ci, (co * b.in_ch + ci) * 9 + tap);
      ++t;
      if (b.bias >= 0) {
        for (int64_t c = 0; c < b.ch; ++c) visit(t, b.bias + c, c);
        ++t;
      }
      for (int64_t c = 0; c < b.ch; ++c) visit(t, b.gamma + c, c);
      ++t;
      for (int64_t c = 0; c < b.ch; ++c) visit(t, b.beta + c, c);
      ++t;
    }
    // torch [o, c * h * w + s] -> engine [o, s * ch + c] (s = i * w + j)
    const int64_t hw = head.h * head.w;
    for (int64_t o = 0; o < head.out; ++o)
      for (int64_t c = 0; c < head.ch; ++c)
        for (int64_t s = 0; s < hw; ++s)
          visit(t, head.weight + o * head.in_pad + s * head.ch + c, o * head.in + c * hw + s);
    ++t;
    if (head.bias >= 0)
      for (int64_t o = 0; o < head.out; ++o) visit(t, head.bias + o, o);
  }

  // tensors: one pointer per parameter tensor, torch order. Padding is left untouched
  // (the arena hands out zeroed memory and nothing writes it).
  void pack(const std::vector<const Scalar*>& tensors, Scalar* padded) const {
    for_each([&](int64_t t, int64_t p, int64_t u) { padded[p] = tensors[t][u]; });
  }

  void unpack(const Scalar* padded, const std::vector<Scalar*>& tensors) const {
    for_each([&](int64_t t, int64_t p, int64_t u) { tensors[t][u] = padded[p]; });
  }

  // torch's flat layout [P] (the tensors one after another).
  void unpack(const Scalar* padded, Scalar* flat) const {
    for_each([&](int64_t t, int64_t p, int64_t u) { flat[tensor_start[t] + u] = padded[p]; });
  }
};

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
