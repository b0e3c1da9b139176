// The batched per-task MLP engine: MAML (second- and first-order), Meta-SGD, ANIL and
// Reptile meta-steps for a stack of Linear layers, all tasks of a meta-batch in one call.
//
// For every task: K inner SGD steps phi_{k+1} = phi_k - alpha * g_k, the query loss at
// phi_K and its gradient v_K, then the reverse sweep v_k = v_{k+1} - H_k (alpha * v_{k+1})
// with Hessian-vector products by forward-over-reverse, recomputing each step's
// activations from the stored phi_k (memory O(threads * K * P), never activations x K;
// only the first layer's activations are kept per step, instead of that layer of phi_k,
// where they are the smaller: see ThreadWorkspace in mlp_engine.cpp).
// Tasks run in parallel (worker_pool.h), each whole on one thread; their gradients are
// summed in an order fixed by the meta-batch alone, so the result is bitwise the same for
// any number of threads. Inputs holding a NaN or infinity stop the call before anything
// is computed (MetaStepArgs::inputs_finite).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "mlp_spec.h"

namespace fastmeta {

// One 64-byte-aligned block of scratch memory, kept across calls so a training loop
// does not pay for page faults on every step, with the plan of what was carved from it.
// Zeroed whenever the plan changes: the padding the kernels rely on must read zero.
class Arena {
 public:
  // What a meta-step carved from the block (pointers into it), for reuse by the next
  // call with the same key.
  struct Plan {
    virtual ~Plan() = default;
    std::vector<int64_t> key;  // the shapes and options the carving depends on
  };

  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();

  // The current plan if its key is `key`, else null.
  Plan* plan(const std::vector<int64_t>& key) const {
    return plan_ && plan_->key == key ? plan_.get() : nullptr;
  }
  // Makes room for `bytes`, zeroes them and keeps `plan` (to be carved from the result).
  char* reset(std::size_t bytes, std::unique_ptr<Plan> plan);
  // Forgets the plan, so the next call zeroes the block again (after a call that produced
  // non-finite values: insurance that nothing of it is ever read again).
  void invalidate() { plan_.reset(); }
  std::size_t capacity() const { return capacity_; }

  // The plan for `key`, made when the current one has another key: `carve(base, plan)`
  // assigns the plan its pieces and returns their total size (base == nullptr: it only
  // measures); the block is then reset to that size and carved for real.
  template <typename PlanType, typename Carve>
  PlanType& plan_for(std::vector<int64_t> key, Carve&& carve) {
    if (Plan* current = plan(key)) return *static_cast<PlanType*>(current);
    auto fresh = std::make_unique<PlanType>();
    fresh->key = std::move(key);
    PlanType& made = *fresh;
    const std::size_t bytes = carve(nullptr, made);
    carve(reset(bytes, std::move(fresh)), made);
    return made;
  }

 private:
  char* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::unique_ptr<Plan> plan_;
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
