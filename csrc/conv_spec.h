// What the conv engine is asked to run: a stack of blocks
//     conv3x3 (stride 1, padding 1) -> BatchNorm2d (batch statistics) -> ReLU -> maxpool 2x2
// then flatten and one Linear head (the MAML paper's conv4 has four blocks). Images are
// NCHW as in torch; one meta-step's arguments are the MLP engine's MetaStepArgs, with
// every sample's C * H * W values as its row.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "mlp_spec.h"

namespace fastmeta {

struct ConvSpec {
  int64_t in_channels = 1, height = 0, width = 0;  // one input image
  std::vector<int64_t> channels;                   // each block's convolution outputs
  std::vector<bool> conv_bias;                     // each block's convolution has a bias
  std::vector<double> eps;                         // each block's batch-norm epsilon
  int64_t outputs = 0;                             // the Linear head's width
  bool head_bias = true;
  Loss loss = Loss::mse;
  bool head_only = false;  // ANIL: only the Linear head adapts in the inner loop

  int64_t num_blocks() const { return static_cast<int64_t>(channels.size()); }

  // Spatial size entering block b (b == num_blocks(): after the last pooling).
  // nn.MaxPool2d(2) floors: a trailing odd row or column is dropped.
  int64_t block_height(int64_t b) const { return height >> b; }
  int64_t block_width(int64_t b) const { return width >> b; }
  int64_t block_in_channels(int64_t b) const { return b == 0 ? in_channels : channels[b - 1]; }

  // The head's input width, in torch's flatten order (C, H, W).
  int64_t features() const {
    const int64_t b = num_blocks();
    return channels.back() * block_height(b) * block_width(b);
  }

  // Parameters in torch order: per block conv weight [C, Cin, 3, 3], conv bias [C],
  // BN weight [C], BN bias [C]; then the head's weight [out, F] and bias [out].
  int64_t num_params() const {
    int64_t total = 0;
    for (int64_t b = 0; b < num_blocks(); ++b)
      total += channels[b] * block_in_channels(b) * 9 + (conv_bias[b] ? channels[b] : 0) +
               2 * channels[b];
    return total + outputs * features() + (head_bias ? outputs : 0);
  }

  // Element counts of the parameter tensors, in torch order.
  std::vector<int64_t> tensor_sizes() const {
    std::vector<int64_t> sizes;
    for (int64_t b = 0; b < num_blocks(); ++b) {
      sizes.push_back(channels[b] * block_in_channels(b) * 9);
      if (conv_bias[b]) sizes.push_back(channels[b]);
      sizes.push_back(channels[b]);
      sizes.push_back(channels[b]);
    }
    sizes.push_back(outputs * features());
    if (head_bias) sizes.push_back(outputs);
    return sizes;
  }

  void validate() const {
    const auto fail = [](const std::string& why) {
      throw std::invalid_argument("ConvSpec: " + why);
    };
    if (channels.empty()) fail("the model needs at least one convolution block");
    if (conv_bias.size() != channels.size() || eps.size() != channels.size())
      fail("conv_bias and eps need one entry per block");
    if (in_channels < 1 || outputs < 1) fail("in_channels and outputs must be positive");
    for (int64_t c : channels)
      if (c < 1) fail("every block needs at least one channel");
    for (double e : eps)
      if (!(e > 0)) fail("every batch-norm eps must be positive");
    if (block_height(num_blocks()) < 1 || block_width(num_blocks()) < 1)
      fail("the image (" + std::to_string(height) + "x" + std::to_string(width) +
           ") is too small for " + std::to_string(num_blocks()) + " 2x2 poolings");
  }
};

}  // namespace fastmeta
