// The batched per-task MLP engine: MAML (second- and first-order), Meta-SGD, ANIL and
// Reptile meta-steps for a stack of Linear layers, all tasks of a meta-batch in one call.
//
// For every task: K inner SGD steps phi_{k+1} = phi_k - alpha * g_k, the query loss at
// phi_K and its gradient v_K, then the reverse sweep v_k = v_{k+1} - H_k (alpha * v_{k+1})
// with Hessian-vector products by forward-over-reverse, recomputing each step's
// activations from the stored phi_k (memory O(threads * K * P), never activations x K).
// Tasks run in parallel (OpenMP), each whole on one thread; their gradients are summed in
// task order, so the result is bitwise the same for any number of threads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>

#include "mlp_spec.h"

namespace fastmeta {

// One 64-byte-aligned block of scratch memory, kept across calls so a training loop
// does not pay for page faults on every step. Zeroed whenever the layout carved from it
// changes: the padding the kernels rely on must read zero.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();

  // Makes room for `bytes`; zeroes the block when `plan` differs from the last call's.
  char* prepare(std::size_t bytes, const std::string& plan);
  // Forces the next prepare() to zero the block (after a call that produced non-finite
  // values: insurance that nothing of it is ever read again).
  void invalidate() { plan_.clear(); }
  std::size_t capacity() const { return capacity_; }

 private:
  char* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::string plan_;
};

// Hands out aligned pieces of the arena. Run once with base == nullptr to measure the
// total, then again over the prepared block to assign the same pieces.
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* take(int64_t count) {
    offset_ = (offset_ + 63) / 64 * 64;
    T* piece = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<std::size_t>(count) * sizeof(T);
    return piece;
  }
  std::size_t size() const { return offset_; }

 private:
  char* base_;
  std::size_t offset_ = 0;
};

class MlpEngine {
 public:
  explicit MlpEngine(MlpSpec spec);

  void meta_step(MetaStepArgs<float>& args);
  void meta_step(MetaStepArgs<double>& args);

  const MlpSpec& spec() const { return spec_; }
  std::size_t workspace_bytes() const { return arena_.capacity(); }

 private:
  MlpSpec spec_;
  std::mutex mutex_;  // one meta-step at a time per engine: they share the arena
  Arena arena_;
};

// The instruction set the engine's kernels were picked for at load time ("avx512",
// "avx2" or "generic"); FASTMETA_ISA in the environment overrides the choice.
const char* engine_isa();

}  // namespace fastmeta
