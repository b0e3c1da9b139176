// What the MLP engine is asked to do: the model (a stack of Linear layers, each followed
// by an activation), the loss, the algorithm, and the raw input/output pointers of one
// meta-step. Nothing here depends on the instruction set the engine is compiled for.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace fastmeta {

enum class Activation : int { identity = 0, relu = 1, tanh = 2, sigmoid = 3 };
enum class Loss : int { mse = 0, cross_entropy = 1 };

// second_order: MAML's exact meta-gradient (and Meta-SGD's, and ANIL's);
// first_order: the same without the Hessian terms; reptile: the inner loop only.
enum class Algorithm : int { second_order = 0, first_order = 1, reptile = 2 };

struct MlpSpec {
  std::vector<int64_t> widths;          // L + 1: the input width, then each layer's output
  std::vector<Activation> activations;  // L: the activation after each Linear layer
  std::vector<bool> has_bias;           // L
  int64_t head = 0;                     // first adapted layer: 0, or > 0 for ANIL
  Loss loss = Loss::mse;

  int64_t num_layers() const { return static_cast<int64_t>(activations.size()); }

  // Parameters in nn.Linear order (weight [out, in] row-major, then bias [out]), layer by
  // layer: the flat layout P of the user's parameters.
  int64_t num_params() const {
    int64_t total = 0;
    for (int64_t l = 0; l < num_layers(); ++l)
      total += widths[l + 1] * widths[l] + (has_bias[l] ? widths[l + 1] : 0);
    return total;
  }

  // Elements of each parameter tensor, in nn.Linear order.
  std::vector<int64_t> tensor_sizes() const {
    std::vector<int64_t> sizes;
    for (int64_t l = 0; l < num_layers(); ++l) {
      sizes.push_back(widths[l + 1] * widths[l]);
      if (has_bias[l]) sizes.push_back(widths[l + 1]);
    }
    return sizes;
  }

  void validate() const {
    const auto fail = [](const std::string& why) {
      throw std::invalid_argument("MlpSpec: " + why);
    };
    if (activations.empty()) fail("the model needs at least one Linear layer");
    if (widths.size() != activations.size() + 1)
      fail("widths must have one more entry than activations");
    if (has_bias.size() != activations.size()) fail("has_bias must have one entry per layer");
    for (int64_t w : widths)
      if (w < 1) fail("every width must be positive");
    if (head < 0 || head >= num_layers()) fail("head must name one of the layers");
  }
};

// One meta-step over T tasks. Inputs are support_x [T, S, in], query_x [T, Q, in]; targets
// [T, S * out] (mse, Scalar) or [T, S] (cross_entropy, int64). Each task's rows are
// contiguous; task t's start at t * (its *_stride) elements (the rows of several tasks
// need not be: a slice of a larger batch is read without a copy).
template <typename Scalar>
struct MetaStepArgs {
  std::vector<const Scalar*> params;  // one pointer per parameter tensor, nn.Linear order
  std::vector<const Scalar*> lrs;     // Meta-SGD's per-parameter rates; empty: `lr` for all
  Scalar lr = 0;
  Algorithm algorithm = Algorithm::second_order;
  int64_t tasks = 0, support = 0, query = 0, inner_steps = 0;
  const Scalar* support_x = nullptr;
  const void* support_y = nullptr;
  const Scalar* query_x = nullptr;  // unused by reptile
  const void* query_y = nullptr;
  int64_t support_x_stride = 0, support_y_stride = 0;  // elements from one task to the next
  int64_t query_x_stride = 0, query_y_stride = 0;
  bool need_grad = true;  // false: losses (and adapted weights) only, no meta-gradient

  Scalar* query_loss = nullptr;      // [T]
  Scalar* query_accuracy = nullptr;  // [T], cross_entropy only; may be null
  Scalar* support_loss = nullptr;    // [T, K]: each task's mean support loss before step k
  // One pointer per parameter tensor (nn.Linear order), or empty:
  std::vector<Scalar*> grads;     // the mean meta-gradient; reptile: theta - mean phi_K
  std::vector<Scalar*> lr_grads;  // Meta-SGD's rate gradient
  Scalar* adapted = nullptr;      // [T, P]: every task's phi_K, flat; may be null

  // Set by the engine. inputs_finite: support_x, query_x (and mse targets) hold no NaN or
  // infinity; when they do, the engine stops before computing anything and leaves every
  // output unwritten. all_finite: the inputs and every support and query loss are finite.
  bool inputs_finite = true;
  bool all_finite = true;
};

}  // namespace fastmeta
