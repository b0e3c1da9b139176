// The engine's internal ("padded") parameter layout and its conversion from and to the
// user's flat nn.Linear layout.
//
// Every weight row is padded with zeros to a whole number of vectors, and every tensor
// starts on a vector boundary, so the kernels run on full, aligned vectors only. The
// zeros stay zeros through the inner loop: the gradient of a padding entry is a sum of
// products with padding entries of the activations, which are zero too.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>

#include "mlp_spec.h"
#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

struct LayerLayout {
  int64_t in, out;          // true widths
  int64_t in_pad, out_pad;  // row strides of the layer's input and output activations
  int64_t weight, bias;     // offsets in the padded parameter vector (bias < 0: no bias)
  Activation act;
  // How the products reading W along its input dimension (y = x W^T) run. The dot form
  // (small_gemm.h) reduces every output across the vector lanes, which costs about as much
  // as four vectors of depth; a shallow layer is better served by the axpy form over W^T
  // ([in, out_pad]), which needs a transposed copy of W. Layers with weight_t >= 0 have
  // one for theta (made once per meta-step, shared by every task), and get one for any
  // other weights (phi_k, the sweep's direction) by a transposition into scratch memory
  // when a product has at least transpose_rows rows to amortise it over.
  //   narrow  in is a small fraction of a vector: always the axpy form (the copy is only
  //           in * out elements), and weight gradients are formed as G^T and scattered,
  //           since G's rows would be mostly padding.
  bool narrow = false;
  int64_t weight_t = -1;        // offset of theta's W^T in the transposed vector
  int64_t transpose_rows = -1;  // products of this many rows transpose other weights

  bool axpy_form(int64_t rows) const { return weight_t >= 0 && rows >= transpose_rows; }
};

// Layer l's tensors inside a vector that may hold only the adapted suffix of the layers:
// `origin` is the padded offset of the vector's first element. `t_base`, when set, holds
// the W^T of the layers that have one (theta only; see LayerLayout::weight_t). `first`,
// when set, holds the offsets [0, first_end) (the first layer's weight and bias) apart
// from `base`: the engine's second-order history keeps that layer of phi_k in one buffer
// (mlp_engine.cpp, ThreadWorkspace).
template <typename Scalar>
struct ParamView {
  Scalar* base;
  int64_t origin;
  Scalar* t_base = nullptr;
  Scalar* first = nullptr;
  int64_t first_end = 0;
  Scalar* at(int64_t offset) const {
    return offset < first_end ? first + offset : base + (offset - origin);
  }
  Scalar* weight(const LayerLayout& layer) const { return at(layer.weight); }
  Scalar* bias(const LayerLayout& layer) const {
    return layer.bias < 0 ? nullptr : at(layer.bias);
  }
  Scalar* weight_t(const LayerLayout& layer) const {
    return t_base && layer.weight_t >= 0 ? t_base + layer.weight_t : nullptr;
  }
};

// wt[i, o] = w[o, i]: a layer's [out, in_pad] weight as [in, out_pad], padding columns
// zeroed (wt may be scratch memory that held something else). Whole kLanes x kLanes
// blocks are transposed in registers; a layer less than half a vector wide is copied
// element by element (a block would be mostly padding).
template <typename Scalar>
void transpose_weight(const LayerLayout& layer, const Scalar* w, Scalar* wt) {
  using S = Simd<Scalar>;
  if (2 * layer.in < S::kLanes) {
    for (int64_t i = 0; i < layer.in; ++i) {
      Scalar* row = wt + i * layer.out_pad;
      for (int64_t o = 0; o < layer.out; ++o) row[o] = w[o * layer.in_pad + i];
      for (int64_t o = layer.out; o < layer.out_pad; ++o) row[o] = Scalar(0);
    }
    return;
  }
  typename S::Vec block[S::kLanes];
  for (int64_t o0 = 0; o0 < layer.out_pad; o0 += S::kLanes) {
    for (int64_t i0 = 0; i0 < layer.in; i0 += S::kLanes) {
      for (int r = 0; r < S::kLanes; ++r)  // rows past `out` are padding: zeros
        block[r] = o0 + r < layer.out ? S::load(w + (o0 + r) * layer.in_pad + i0) : S::zero();
      S::transpose(block);
      for (int r = 0; r < S::kLanes && i0 + r < layer.in; ++r)
        S::store(wt + (i0 + r) * layer.out_pad + o0, block[r]);
    }
  }
}

// Copies `rows` rows of `cols` elements between row strides ld_src and ld_dst. Rows are
// often short (one input feature, a 40-wide layer): a loop beats a memcpy call per row.
template <typename Scalar>
void copy_rows(int64_t rows, int64_t cols, const Scalar* src, int64_t ld_src, Scalar* dst,
               int64_t ld_dst) {
  if (ld_src == cols && ld_dst == cols) {
    std::memcpy(dst, src, sizeof(Scalar) * rows * cols);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) dst[r * ld_dst + j] = src[r * ld_src + j];
}

template <typename Scalar>
struct MlpLayout {
  std::vector<LayerLayout> layers;
  int64_t padded_size = 0;  // Pp: length of a padded parameter vector
  int64_t user_size = 0;    // P: length of the user's flat parameter vector
  int64_t head = 0;         // first adapted layer
  int64_t head_offset = 0;  // padded offset of its weight: [head_offset, Pp) adapts
  int64_t transposed_size = 0;  // length of theta's transposed copy (0: no layer has one)

  explicit MlpLayout(const MlpSpec& spec) {
    constexpr int64_t lanes = Simd<Scalar>::kLanes;
    layers.reserve(spec.num_layers());
    int64_t offset = 0;
    for (int64_t l = 0; l < spec.num_layers(); ++l) {
      LayerLayout layer;
      layer.in = spec.widths[l];
      layer.out = spec.widths[l + 1];
      layer.in_pad = padded_width<Scalar>(layer.in);
      layer.out_pad = padded_width<Scalar>(layer.out);
      layer.act = spec.activations[l];
      // Costs in vector instructions (calibrated on 10 x 40 x 40 products with AVX-512):
      // per row, the dot form's depth vectors plus ~4 for the reduction of every output,
      // and the axpy form's output vectors times the depth; per transposition, log2(lanes)
      // shuffles and a load and a store per vector of every block.
      const int64_t blocks = (layer.in + lanes - 1) / lanes * (layer.out_pad / lanes);
      int64_t log_lanes = 0;
      while ((int64_t(1) << log_lanes) < lanes) ++log_lanes;
      const int64_t dot_cost = layer.out * (layer.in_pad / lanes + 4);
      const int64_t axpy_cost = layer.out_pad / lanes * layer.in;
      const int64_t transpose_cost = blocks * lanes * (log_lanes + 2);
      layer.narrow = 4 * layer.in <= layer.in_pad;
      if (layer.narrow || 4 * dot_cost > 5 * axpy_cost) {
        layer.weight_t = transposed_size;
        transposed_size += layer.in * layer.out_pad;
        // A transposition must save a quarter more than it costs.
        layer.transpose_rows =
            layer.narrow ? 0 : (5 * transpose_cost) / (4 * (dot_cost - axpy_cost)) + 1;
      }
      layer.weight = offset;
      offset += layer.out * layer.in_pad;
      layer.bias = spec.has_bias[l] ? offset : -1;
      if (spec.has_bias[l]) offset += layer.out_pad;
      if (l == spec.head) head_offset = layer.weight;
      layers.push_back(layer);
    }
    padded_size = offset;
    user_size = spec.num_params();
    head = spec.head;
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers.size()); }
  int64_t head_size() const { return padded_size - head_offset; }

  // Row stride of the activations entering layer l (l == L: the model's output).
  int64_t width(int64_t l) const { return l == 0 ? layers[0].in_pad : layers[l - 1].out_pad; }

  // W^T of every layer that has one, from a padded vector (its padding stays zero).
  void transpose(const Scalar* padded, Scalar* transposed) const {
    for (const LayerLayout& layer : layers)
      if (layer.weight_t >= 0)
        transpose_weight(layer, padded + layer.weight, transposed + layer.weight_t);
  }

  // tensors: one pointer per parameter tensor in nn.Linear order (weight, bias, ...).
  void pack(const std::vector<const Scalar*>& tensors, Scalar* padded) const {
    std::size_t t = 0;
    for (const LayerLayout& layer : layers) {
      copy_rows(layer.out, layer.in, tensors[t++], layer.in, padded + layer.weight, layer.in_pad);
      if (layer.bias >= 0)
        std::memcpy(padded + layer.bias, tensors[t++], sizeof(Scalar) * layer.out);
    }
  }

  // One pointer per tensor (nn.Linear order) from a padded vector.
  void unpack(const Scalar* padded, const std::vector<Scalar*>& tensors) const {
    std::size_t t = 0;
    for (const LayerLayout& layer : layers) {
      copy_rows(layer.out, layer.in, padded + layer.weight, layer.in_pad, tensors[t++], layer.in);
      if (layer.bias >= 0)
        std::memcpy(tensors[t++], padded + layer.bias, sizeof(Scalar) * layer.out);
    }
  }

  // The user's flat layout [P] from a padded vector.
  void unpack(const Scalar* padded, Scalar* flat) const {
    unpack(padded, padded + head_offset, flat);
  }

  // The same from two pieces: the layers before the head from `body` (a full padded
  // vector), the adapted ones from `adapted` (holding [head_offset, Pp) only).
  void unpack(const Scalar* body, const Scalar* adapted, Scalar* flat) const {
    for (int64_t l = 0; l < num_layers(); ++l) {
      const LayerLayout& layer = layers[l];
      const ParamView<const Scalar> src = l < head ? ParamView<const Scalar>{body, 0}
                                                   : ParamView<const Scalar>{adapted, head_offset};
      copy_rows(layer.out, layer.in, src.weight(layer), layer.in_pad, flat, layer.in);
      flat += layer.out * layer.in;
      if (layer.bias >= 0) {
        std::memcpy(flat, src.bias(layer), sizeof(Scalar) * layer.out);
        flat += layer.out;
      }
    }
  }
};


}  // namespace FASTMETA_ISA
}  // namespace fastmeta
