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
};

// Layer l's tensors inside a vector that may hold only the adapted suffix of the layers:
// `origin` is the padded offset of the vector's first element.
template <typename Scalar>
struct ParamView {
  Scalar* base;
  int64_t origin;
  Scalar* weight(const LayerLayout& layer) const { return base + (layer.weight - origin); }
  Scalar* bias(const LayerLayout& layer) const {
    return layer.bias < 0 ? nullptr : base + (layer.bias - origin);
  }
};

template <typename Scalar>
struct MlpLayout {
  std::vector<LayerLayout> layers;
  int64_t padded_size = 0;  // Pp: length of a padded parameter vector
  int64_t user_size = 0;    // P: length of the user's flat parameter vector
  int64_t head = 0;         // first adapted layer
  int64_t head_offset = 0;  // padded offset of its weight: [head_offset, Pp) adapts

  explicit MlpLayout(const MlpSpec& spec) {
    int64_t offset = 0;
    for (int64_t l = 0; l < spec.num_layers(); ++l) {
      LayerLayout layer;
      layer.in = spec.widths[l];
      layer.out = spec.widths[l + 1];
      layer.in_pad = padded_width<Scalar>(layer.in);
      layer.out_pad = padded_width<Scalar>(layer.out);
      layer.act = spec.activations[l];
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

  // tensors: one pointer per parameter tensor in nn.Linear order (weight, bias, ...).
  void pack(const std::vector<const Scalar*>& tensors, Scalar* padded) const {
    std::size_t t = 0;
    for (const LayerLayout& layer : layers) {
      const Scalar* w = tensors[t++];
      for (int64_t o = 0; o < layer.out; ++o)
        std::memcpy(padded + layer.weight + o * layer.in_pad, w + o * layer.in,
                    sizeof(Scalar) * layer.in);
      if (layer.bias >= 0)
        std::memcpy(padded + layer.bias, tensors[t++], sizeof(Scalar) * layer.out);
    }
  }

  void fill(Scalar value, Scalar* padded) const {
    for (const LayerLayout& layer : layers) {
      for (int64_t o = 0; o < layer.out; ++o)
        for (int64_t i = 0; i < layer.in; ++i) padded[layer.weight + o * layer.in_pad + i] = value;
      if (layer.bias >= 0)
        for (int64_t o = 0; o < layer.out; ++o) padded[layer.bias + o] = value;
    }
  }

  // One pointer per tensor (nn.Linear order) from a padded vector.
  void unpack(const Scalar* padded, const std::vector<Scalar*>& tensors) const {
    std::size_t t = 0;
    for (const LayerLayout& layer : layers) {
      Scalar* w = tensors[t++];
      for (int64_t o = 0; o < layer.out; ++o)
        std::memcpy(w + o * layer.in, padded + layer.weight + o * layer.in_pad,
                    sizeof(Scalar) * layer.in);
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
      for (int64_t o = 0; o < layer.out; ++o, flat += layer.in)
        std::memcpy(flat, src.weight(layer) + o * layer.in_pad, sizeof(Scalar) * layer.in);
      if (layer.bias >= 0) {
        std::memcpy(flat, src.bias(layer), sizeof(Scalar) * layer.out);
        flat += layer.out;
      }
    }
  }
};


}  // namespace FASTMETA_ISA
}  // namespace fastmeta
