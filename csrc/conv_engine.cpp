// The conv engine's meta-step driver: per-task inner loop, query gradient and reverse
// sweep, run in parallel over tasks on the worker pool (worker_pool.h: a descheduled
// worker costs parallelism, not a stall). Each task's meta-gradient goes to its own row;
// the rows are summed in task order, so the result is bitwise the same for any number of
// threads.
//
// Compiled once per instruction set (FASTMETA_ISA names the namespace; see simd.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "conv_engine_isa.h"
#include "conv_passes.h"
#include "mlp_loss.h"
#include "reptile.h"
#include "worker_pool.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// One thread's scratch: it runs its tasks one after another.
template <typename Scalar>
struct ConvThreadWorkspace {
  ConvPassBuffers<Scalar> support, query;
  ConvScratch<Scalar> scratch;
  std::vector<Scalar*> phi;    // phi_1 .. phi_K (second order), or one slot updated in place
  std::vector<Scalar*> grads;  // Meta-SGD, second order: g_0 .. g_{K-1}
  Scalar* grad = nullptr;      // the inner step's support gradient g_k (ANIL: also the
                               // body's gradient through the support features)
  Scalar* grad_sum = nullptr;  // Meta-SGD, first order: sum_k g_k
  Scalar* u = nullptr;         // per-parameter rates: the sweep's direction alpha * v_{k+1}
  Scalar* hu = nullptr;        // H_k u
};

template <typename Scalar>
class ConvMetaStep {
 public:
  ConvMetaStep(const ConvSpec& spec, MetaStepArgs<Scalar>& args, int max_threads)
      : spec_(spec), layout_(spec), args_(args) {
    reptile_ = args.algorithm == Algorithm::reptile;
    need_grad_ = reptile_ || args.need_grad;
    second_order_ = args.algorithm == Algorithm::second_order && need_grad_;
    vector_lr_ = !args.lrs.empty();
    meta_sgd_ = vector_lr_ && !reptile_ && need_grad_ && !args.lr_grads.empty();
    anil_ = spec.head_only;
    history_ = second_order_ ? args.inner_steps : 1;
    num_threads_ = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, args.tasks)));
    head_offset_ = anil_ ? layout_.head.weight : 0;
  }

  // Assigns every buffer a piece of the arena (base == nullptr: only measures).
  std::size_t carve(char* base) {
    Carver c(base);
    const int64_t pp = layout_.padded_size;
    theta_ = c.take<Scalar>(pp);
    alpha_ = vector_lr_ ? c.take<Scalar>(pp) : nullptr;
    mean_ = c.take<Scalar>(pp);
    lr_mean_ = meta_sgd_ ? c.take<Scalar>(pp) : nullptr;
    rows_ = need_grad_ ? c.take<Scalar>(args_.tasks * pp) : nullptr;
    lr_rows_ = meta_sgd_ ? c.take<Scalar>(args_.tasks * pp) : nullptr;
    int64_t col = 0, wt = 0, max_channels = 0;  // the widest im2col piece; W^T
    for (const ConvBlockLayout& b : layout_.blocks) {
      max_channels = std::max(max_channels, b.ch);
      col = std::max(col, kColRows * b.k_pad);
      wt = std::max(wt, 2 * b.k * b.ch);
    }
    const bool body_r = second_order_ && !anil_;  // R{.} through the blocks
    threads_.assign(num_threads_, ConvThreadWorkspace<Scalar>());
    for (ConvThreadWorkspace<Scalar>& w : threads_) {
      carve_pass(c, w.support, args_.support, second_order_, body_r);
      if (!reptile_) carve_pass(c, w.query, args_.query, false, false);
      w.scratch.col = c.take<Scalar>(col);
      w.scratch.dcol = c.take<Scalar>(col);
      w.scratch.wt = c.take<Scalar>(wt);
      w.scratch.stats = c.take<Scalar>(4 * max_channels);
      w.scratch.rcol = body_r ? c.take<Scalar>(col) : nullptr;
      w.phi.clear();
      for (int64_t k = 0; k < history_; ++k) w.phi.push_back(c.take<Scalar>(pp));
      w.grads.clear();
      if (meta_sgd_ && second_order_)
        for (int64_t k = 0; k < history_; ++k) w.grads.push_back(c.take<Scalar>(pp));
      w.grad = c.take<Scalar>(pp);
      w.grad_sum = meta_sgd_ && !second_order_ ? c.take<Scalar>(pp) : nullptr;
      w.u = second_order_ && vector_lr_ ? c.take<Scalar>(pp) : nullptr;
      w.hu = second_order_ ? c.take<Scalar>(pp) : nullptr;
    }
    return c.size();
  }

  // What carve() depends on: the arena is re-zeroed when this changes.
  // What carve() depends on: the arena is carved (and zeroed) afresh when this changes.
  std::vector<int64_t> plan_key() const {
    std::vector<int64_t> key{int64_t(sizeof(Scalar)), args_.tasks, args_.support, args_.query,
                             args_.inner_steps, int64_t(num_threads_), int64_t(args_.algorithm),
                             int64_t(need_grad_), int64_t(vector_lr_), int64_t(meta_sgd_),
                             int64_t(anil_), spec_.height, spec_.width, spec_.in_channels,
                             spec_.outputs};
    key.insert(key.end(), spec_.channels.begin(), spec_.channels.end());
    return key;
  }

  void run() {
    layout_.pack(args_.params, theta_);
    if (vector_lr_) layout_.pack(args_.lrs, alpha_);
    const int64_t pp = layout_.padded_size;
    if (anil_)  // the body's entries of every fast-weight slot are theta's, never written after
      for (ConvThreadWorkspace<Scalar>& w : threads_)
        for (Scalar* slot : w.phi) std::memcpy(slot, theta_, sizeof(Scalar) * head_offset_);
    next_task_.store(0, std::memory_order_relaxed);
    tasks_done_.store(0, std::memory_order_relaxed);
    const auto work = [](void* self, int slot) { static_cast<ConvMetaStep*>(self)->work(slot); };
    run_parallel(num_threads_, work, this);
    if (rows_ && !reptile_) reduce_rows(rows_, mean_);
    if (lr_rows_) reduce_rows(lr_rows_, lr_mean_);
    args_.all_finite = all_finite(args_.support_loss, args_.tasks * args_.inner_steps) &&
                       (reptile_ || all_finite(args_.query_loss, args_.tasks));
    if (reptile_) {
      reptile_direction<Scalar>(theta_, rows_, args_.tasks, pp, mean_);
      layout_.unpack(mean_, args_.grads);
    } else if (rows_) {
      layout_.unpack(mean_, args_.grads);
      if (lr_rows_) layout_.unpack(lr_mean_, args_.lr_grads);
    }
  }

 private:
  // with_r: R{.} buffers of the head; body_r: also of every block.
  void carve_pass(Carver& c, ConvPassBuffers<Scalar>& buf, int64_t samples, bool with_r,
                  bool body_r) {
    buf.samples = samples;
    const ConvBlockLayout& first = layout_.blocks[0];
    buf.images = c.take<Scalar>(samples * first.h * first.w * first.in_ch);
    buf.blocks.assign(layout_.num_blocks(), BlockBuffers<Scalar>());
    for (int64_t i = 0; i < layout_.num_blocks(); ++i) {
      const ConvBlockLayout& b = layout_.blocks[i];
      BlockBuffers<Scalar>& bb = buf.blocks[i];
      const int64_t map = samples * b.h * b.w * b.ch, pooled = samples * b.ph * b.pw * b.ch;
      bb.x = i == 0 ? buf.images : buf.blocks[i - 1].pooled;
      bb.xhat = c.take<Scalar>(map);
      bb.s = c.take<Scalar>(b.ch);
      bb.arg = c.take<uint8_t>(pooled);
      bb.pooled = c.take<Scalar>(pooled);
      bb.routed = c.take<Scalar>(pooled);
      bb.dpooled = c.take<Scalar>(pooled);
      // Without R-passes nothing reads xhat after the backward has its dz: dz overwrites
      // it (pixel by pixel) and dy is never stored. The R-backward reads xhat, dy and dz.
      bb.dy = body_r ? c.take<Scalar>(map) : bb.xhat;
      bb.dz = body_r ? c.take<Scalar>(map) : bb.xhat;
      if (body_r) {
        bb.rx = i == 0 ? nullptr : buf.blocks[i - 1].rpooled;
        bb.rxhat = c.take<Scalar>(map);
        bb.ry = c.take<Scalar>(map);
        bb.rs = c.take<Scalar>(b.ch);
        bb.rpooled = c.take<Scalar>(pooled);
        bb.rdpooled = c.take<Scalar>(pooled);
        bb.rdy = c.take<Scalar>(map);
        bb.rdz = c.take<Scalar>(map);
      }
    }
    const HeadLayout& h = layout_.head;
    buf.feat = c.take<Scalar>(samples * h.in_pad);
    buf.dfeat = c.take<Scalar>(samples * h.in_pad);
    buf.out = c.take<Scalar>(samples * h.out);
    buf.dout = c.take<Scalar>(samples * h.out);
    if (with_r) {
      buf.rfeat = body_r ? c.take<Scalar>(samples * h.in_pad) : nullptr;
      buf.rdfeat = c.take<Scalar>(samples * h.in_pad);
      buf.rout = c.take<Scalar>(samples * h.out);
      buf.rdout = c.take<Scalar>(samples * h.out);
    }
  }

  // phi_k (k = 0: theta itself).
  const Scalar* phi(const ConvThreadWorkspace<Scalar>& w, int64_t k) const {
    return k == 0 ? theta_ : w.phi[std::min<int64_t>(k, history_) - 1];
  }

  // Task t's targets, `stride` elements (values or labels) after task t - 1's.
  const void* targets(const void* all, int64_t stride, int64_t t) const {
    if (spec_.loss == Loss::mse) return static_cast<const Scalar*>(all) + t * stride;
    return static_cast<const int64_t*>(all) + t * stride;
  }

  Scalar loss(ConvPassBuffers<Scalar>& buf, const void* target, bool delta, Scalar* accuracy) const {
    return loss_and_delta(spec_.loss, buf.samples, spec_.outputs, buf.out, spec_.outputs, target,
                          delta ? buf.dout : nullptr, accuracy);
  }

  // The adapted part of the network (ANIL: the head on fixed features; else everything).
  void adapted_forward(const Scalar* p, ConvPassBuffers<Scalar>& buf,
                       const ConvScratch<Scalar>& scratch) const {
    if (anil_) head_forward(layout_, p, buf);
    else conv_forward(layout_, p, buf, scratch);
  }
  void adapted_backward(const Scalar* p, ConvPassBuffers<Scalar>& buf,
                        const ConvScratch<Scalar>& scratch, Scalar* grad) const {
    if (anil_) head_backward(layout_, p, buf, grad, false);
    else conv_backward(layout_, p, buf, scratch, grad);
  }

  // One thread's share: tasks until none is left; slot 0 then waits for the others'.
  void work(int slot) {
    ConvThreadWorkspace<Scalar>& w = threads_[slot];
    const int64_t pp = layout_.padded_size;
    for (int64_t t; (t = next_task_.fetch_add(1, std::memory_order_relaxed)) < args_.tasks;) {
      run_task(t, w, rows_ ? rows_ + t * pp : nullptr, lr_rows_ ? lr_rows_ + t * pp : nullptr);
      tasks_done_.fetch_add(1, std::memory_order_release);
    }
    if (slot == 0) wait_for(tasks_done_, args_.tasks);
  }

  // One task; its meta-gradient (Reptile: phi_K) is written to `row` (null: losses only),
  // Meta-SGD's rate gradient to `lr_row`.
  void run_task(int64_t t, ConvThreadWorkspace<Scalar>& w, Scalar* row, Scalar* lr_row) const {
    const int64_t steps = args_.inner_steps, pp = layout_.padded_size, ho = head_offset_;
    const Scalar lr = args_.lr;
    const Scalar* alpha = alpha_;

    // Inner loop on the support set (ANIL: the body's features once, at theta).
    ConvPassBuffers<Scalar>& sup = w.support;
    const void* sup_y = targets(args_.support_y, args_.support_y_stride, t);
    load_images(layout_, args_.support_x + t * args_.support_x_stride, sup);
    if (anil_) body_forward(layout_, theta_, sup, w.scratch);
    for (int64_t k = 0; k < steps; ++k) {
      const Scalar* now = phi(w, k);
      Scalar* next = w.phi[std::min<int64_t>(k + 1, history_) - 1];
      Scalar* g = w.grads.empty() ? w.grad : w.grads[k];
      adapted_forward(now, sup, w.scratch);
      args_.support_loss[t * steps + k] = loss(sup, sup_y, true, nullptr);
      adapted_backward(now, sup, w.scratch, g);
      if (alpha) {
#pragma omp simd
        for (int64_t i = ho; i < pp; ++i) next[i] = now[i] - alpha[i] * g[i];
      } else {
#pragma omp simd
        for (int64_t i = ho; i < pp; ++i) next[i] = now[i] - lr * g[i];
      }
      if (w.grad_sum) {
        if (k == 0) std::memcpy(w.grad_sum + ho, g + ho, sizeof(Scalar) * (pp - ho));
        else
#pragma omp simd
          for (int64_t i = ho; i < pp; ++i) w.grad_sum[i] += g[i];
      }
    }
    const Scalar* adapted = phi(w, steps);
    if (args_.adapted) layout_.unpack(adapted, args_.adapted + t * layout_.user_size);
    if (reptile_) {  // Reptile needs only phi_K
      std::memcpy(row, adapted, sizeof(Scalar) * pp);
      return;
    }

    // Query loss at phi_K and its gradient v_K (ANIL: and the body's, through the query
    // features).
    ConvPassBuffers<Scalar>& qry = w.query;
    const void* qry_y = targets(args_.query_y, args_.query_y_stride, t);
    load_images(layout_, args_.query_x + t * args_.query_x_stride, qry);
    if (anil_) body_forward(layout_, theta_, qry, w.scratch);
    adapted_forward(adapted, qry, w.scratch);
    args_.query_loss[t] = loss(qry, qry_y, row != nullptr,
                               args_.query_accuracy ? args_.query_accuracy + t : nullptr);
    if (!row) return;
    if (anil_) {
      head_backward(layout_, adapted, qry, row, true);
      body_backward(layout_, theta_, qry, w.scratch, row);
    } else {
      conv_backward(layout_, adapted, qry, w.scratch, row);
    }
    if (lr_row) std::memset(lr_row, 0, sizeof(Scalar) * pp);

    if (!second_order_) {  // first order: the meta-gradient is v_K
      if (lr_row)  // dL/dalpha = -sum_k g_k * v_K (the inner gradients are constants)
#pragma omp simd
        for (int64_t i = ho; i < pp; ++i) lr_row[i] = -w.grad_sum[i] * row[i];
      return;
    }

    // Reverse sweep: v_k = v_{k+1} - H_k (alpha v_{k+1}); with a scalar rate the direction
    // is v_{k+1} itself and H_k (lr v) = lr H_k v. Step K-1's support activations and
    // deltas are still in `sup` from the inner loop; earlier ones are recomputed. ANIL:
    // each step also moves the support features' gradient by -R{d features}.
    Scalar* features_grad = anil_ ? sup.dfeat : nullptr;
    if (features_grad)
      std::memset(features_grad, 0, sizeof(Scalar) * sup.samples * layout_.head.in_pad);
    const Scalar scale = alpha ? Scalar(-1) : -lr;
    for (int64_t k = steps - 1; k >= 0; --k) {
      const Scalar* now = phi(w, k);
      if (k < steps - 1) {
        adapted_forward(now, sup, w.scratch);
        loss(sup, sup_y, true, nullptr);
        adapted_backward(now, sup, w.scratch, nullptr);
      }
      const Scalar* u = row;
      if (alpha) {
#pragma omp simd
        for (int64_t i = ho; i < pp; ++i) w.u[i] = alpha[i] * row[i];
        u = w.u;
      }
      if (lr_row) {  // dL/dalpha = -sum_k g_k * v_{k+1}
        const Scalar* g = w.grads[k];
#pragma omp simd
        for (int64_t i = ho; i < pp; ++i) lr_row[i] -= g[i] * row[i];
      }
      if (anil_) {
        head_r_forward(layout_, u, sup);
        loss_r_delta(spec_.loss, sup.samples, spec_.outputs, sup.out, sup.rout, spec_.outputs,
                     sup.rdout);
        head_r_backward(layout_, now, u, sup, w.hu);
        const int64_t n = sup.samples * layout_.head.in_pad;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) features_grad[i] += scale * sup.rdfeat[i];
      } else {
        conv_r_forward(layout_, now, u, sup, w.scratch);
        loss_r_delta(spec_.loss, sup.samples, spec_.outputs, sup.out, sup.rout, spec_.outputs,
                     sup.rdout);
        conv_r_backward(layout_, now, u, sup, w.scratch, w.hu);
      }
#pragma omp simd
      for (int64_t i = ho; i < pp; ++i) row[i] += scale * w.hu[i];
    }
    if (anil_) {  // the body's gradient through the support features, at theta
      detail::from_features(layout_.head, sup.samples, features_grad, sup.blocks.back().dpooled);
      body_backward(layout_, theta_, sup, w.scratch, w.grad);
#pragma omp simd
      for (int64_t i = 0; i < ho; ++i) row[i] += w.grad[i];
    }
  }

  // mean[p] = (rows[0][p] + rows[1][p] + ...) / T in task order (a few milliseconds at
  // most, against a meta-step of hundreds: not worth sharing among the threads).
  void reduce_rows(const Scalar* rows, Scalar* mean) const {
    const int64_t pp = layout_.padded_size, chunk = 1024;
    const Scalar inv = Scalar(1) / Scalar(args_.tasks);
    for (int64_t p0 = 0; p0 < pp; p0 += chunk) {
      const int64_t n = std::min(chunk, pp - p0);
      Scalar* out = mean + p0;
      std::memcpy(out, rows + p0, sizeof(Scalar) * n);
      for (int64_t t = 1; t < args_.tasks; ++t) {
        const Scalar* row = rows + t * pp + p0;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) out[p] += row[p];
      }
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) out[p] *= inv;
    }
  }

  static bool all_finite(const Scalar* values, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
      if (!std::isfinite(values[i])) return false;
    return true;
  }

  const ConvSpec& spec_;
  const ConvLayout<Scalar> layout_;
  MetaStepArgs<Scalar>& args_;
  int num_threads_ = 1;
  bool reptile_ = false, need_grad_ = false, second_order_ = false;
  bool vector_lr_ = false;  // per-parameter inner rates (Meta-SGD) rather than one scalar
  bool meta_sgd_ = false;   // ... and their gradient is wanted
  bool anil_ = false;       // only the head adapts
  int64_t history_ = 1;
  int64_t head_offset_ = 0;  // ANIL: where the head's entries start (the adapted ones)
  Scalar *theta_ = nullptr, *alpha_ = nullptr;
  Scalar *mean_ = nullptr, *lr_mean_ = nullptr;
  Scalar *rows_ = nullptr, *lr_rows_ = nullptr;  // [T, Pp]: every task's meta-gradient (Reptile:
                                                 // phi_K) and rate gradient
  std::vector<ConvThreadWorkspace<Scalar>> threads_;
  std::atomic<int64_t> next_task_{0}, tasks_done_{0};  // work sharing, reset by every call
};

// The arena's plan: the block the last call carved (same key: same pieces, same place).
struct CarvedBlock : Arena::Plan {
  char* base = nullptr;
};

template <typename Scalar>
void run_conv_meta_step(const ConvSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
  ConvMetaStep<Scalar> step(spec, args, max_threads());
  // (the step's pieces are its own members: every call carves them again from the block)
  const CarvedBlock& plan = arena.plan_for<CarvedBlock>(
      step.plan_key(), [&](char* base, CarvedBlock& block) {
        block.base = base;
        return step.carve(base);
      });
  step.carve(plan.base);
  step.run();
}

}  // namespace

void conv_meta_step(const ConvSpec& spec, MetaStepArgs<float>& args, Arena& arena) {
  run_conv_meta_step(spec, args, arena);
}
void conv_meta_step(const ConvSpec& spec, MetaStepArgs<double>& args, Arena& arena) {
  run_conv_meta_step(spec, args, arena);
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
