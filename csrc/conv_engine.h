// The batched per-task conv engine: MAML (second- and first-order), Meta-SGD, ANIL and
// Reptile meta-steps for a stack of conv3x3 / BatchNorm2d / ReLU / maxpool 2x2 blocks and
// a Linear head (conv_spec.h), all tasks of a meta-batch in one call.
//
// Per task, as the MLP engine (mlp_engine.h): K inner SGD steps on the support set, the
// query loss at phi_K and its gradient v_K, then the reverse sweep
// v_k = v_{k+1} - H_k (alpha v_{k+1}) with Hessian-vector products by forward-over-reverse,
// recomputing each step's activations from the stored phi_k. Scratch: T * P for the
// per-task results (two for Meta-SGD), and per thread one task's activations plus
// K * P of fast weights (and of inner gradients for second-order Meta-SGD): it grows with
// K only by parameter-sized vectors, never activations x K (Omniglot conv4, T = 32, two
// threads: ~110 MiB at K = 1, ~118 MiB at K = 10). Tasks run in parallel (OpenMP), each
// whole on one thread; their gradients are summed in task order, so the result is
// bitwise the same for any number of threads.
#pragma once
#include <cstddef>
#include <mutex>

#include "conv_spec.h"
#include "mlp_engine.h"  // Arena, Carver

namespace fastmeta {

class ConvEngine {
 public:
  explicit ConvEngine(ConvSpec spec);

  // args as for the MLP engine (scalar or per-parameter rates; every algorithm).
  void meta_step(MetaStepArgs<float>& args);
  void meta_step(MetaStepArgs<double>& args);

  const ConvSpec& spec() const { return spec_; }
  std::size_t workspace_bytes() const { return arena_.capacity(); }

 private:
  ConvSpec spec_;
  std::mutex mutex_;  // one meta-step at a time per engine: they share the arena
  Arena arena_;
};

}  // namespace fastmeta
