// The meta-step driver: per-task inner loop, query gradient and reverse sweep, run in
// parallel over tasks (worker_pool.h).
//
// Determinism: the tasks are cut into blocks that depend only on the meta-batch (never on
// the number of threads); each block's gradients are summed in task order, and the blocks'
// sums are combined along a fixed binary tree (a node's sum is its left child's plus its
// right child's, added by whichever thread finishes the second child). So the result is
// bitwise the same for any number of threads and any assignment of blocks to threads.
//
// Compiled once per instruction set (FASTMETA_ISA names the namespace; see simd.h).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "mlp_engine_isa.h"
#include "mlp_loss.h"
#include "mlp_passes.h"
#include "reptile.h"
#include "worker_pool.h"

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// One thread's scratch: it runs its tasks one after another, so a task's parameter
// history lives here rather than per task. Each thread also packs its own copy of theta
// (and the rates): a copy written by another core would have to travel between the
// cores' caches on every call, which costs more than packing it again.
//
// The split history (MetaStep::split_; second-order MAML with a scalar rate, every layer
// adapted): the reverse sweep never reads phi_k's first layer (its R-products at the
// first layer need only u and the layer's input, and no delta of the input is formed);
// that layer only recomputes act[1], the support set's first activations. When act[1]
// is smaller than the layer (few support rows, a wide input), phi's slots hold the
// layers >= 1 only, the first layer of phi_k lives in `first` (phi_{k+1}'s overwrites
// it in place, as the first-order slot does), and act[1] of every step is kept in
// `act1`, so the sweep recomputes from layer 1. Same kernels on the same values: the
// results are bitwise those of the full history.
template <typename Scalar>
struct ThreadWorkspace {
  Scalar *theta = nullptr, *theta_t = nullptr, *alpha = nullptr;
  PassBuffers<Scalar> support, query;
  std::vector<Scalar*> phi;    // phi_1 .. phi_K (second order), or one slot updated in place
                               // (split history: their layers >= 1)
  Scalar* first = nullptr;     // split history: the first layer of phi_k (the current step)
  std::vector<Scalar*> act1;   // split history: act[1] of the support set at steps 0 .. K-1
  std::vector<Scalar*> grads;  // per-parameter rates: g_0 .. g_{K-1} (Meta-SGD, second
                               // order) or one slot; a scalar rate needs none
  Scalar* grad_sum = nullptr;  // Meta-SGD, first order: sum_k g_k
  Scalar* direction = nullptr; // per-parameter rates: u = alpha * v_{k+1} of the sweep step
  Scalar* grad = nullptr;      // a task's meta-gradient when it is not its block's first
  Scalar* lr_grad = nullptr;   // ... and its rate gradient (Meta-SGD)
};

// Everything a meta-step carves from the arena, kept across calls while the plan's key
// (the shapes and options it depends on) is unchanged.
template <typename Scalar>
struct Workspace : Arena::Plan {
  Scalar *mean = nullptr, *lr_mean = nullptr;  // the mean meta-gradient (and rate gradient)
  Scalar *block_sums = nullptr, *lr_block_sums = nullptr;  // [blocks, Pp]
  Scalar* reptile_rows = nullptr;                          // Reptile: every task's phi_K
  std::vector<ThreadWorkspace<Scalar>> threads;            // one per slot
  // Work sharing, reset by every call: slot j's blocks [next, end) as next | end << 32.
  // Slot j takes blocks from the front of its own range, then from the back of others'.
  std::unique_ptr<std::atomic<uint64_t>[]> ranges;
  // The reduction tree over the blocks, heap-numbered (root 1): children finished so far.
  std::unique_ptr<std::atomic<int>[]> arrivals;
  std::atomic<int64_t> blocks_done{0};
};

template <typename Scalar>
class MetaStep {
 public:
  MetaStep(const MlpSpec& spec, MetaStepArgs<Scalar>& args, int max_threads)
      : spec_(spec), layout_(spec), args_(args) {
    reptile_ = args.algorithm == Algorithm::reptile;
    need_grad_ = reptile_ || args.need_grad;
    second_order_ = args.algorithm == Algorithm::second_order && need_grad_;
    vector_lr_ = !args.lrs.empty();
    meta_sgd_ = vector_lr_ && !reptile_ && need_grad_ && !args.lr_grads.empty();
    history_ = second_order_ ? args.inner_steps : 1;
    // The split history (see ThreadWorkspace) where it saves memory: act[1] smaller than
    // the first layer. Not for Meta-SGD (its step runs over the whole vector), ANIL (the
    // body is not adapted) or when every task's phi_K is wanted whole.
    const int64_t first_end = layout_.num_layers() > 1 ? layout_.layers[1].weight : 0;
    split_ = second_order_ && !vector_lr_ && layout_.head == 0 && !args.adapted &&
             args.inner_steps >= 2 && args.support * layout_.layers[0].out_pad < first_end;
    first_end_ = split_ ? first_end : 0;
    sums_ = need_grad_ && !reptile_;
    // As many blocks as tasks while their partial sums stay small, fewer (of several tasks
    // each) for large models: never more than kBlockBytes of partial sums.
    // (Without a meta-gradient there is nothing to sum: one task per block.)
    const int64_t row_bytes = layout_.padded_size * int64_t(sizeof(Scalar)) * (meta_sgd_ ? 2 : 1);
    num_blocks_ = sums_ ? std::clamp<int64_t>(kBlockBytes / row_bytes, 1, args.tasks) : args.tasks;
    num_threads_ = static_cast<int>(std::clamp<int64_t>(max_threads, 1, num_blocks_));
    while ((int64_t(1) << levels_) < num_blocks_) ++levels_;
  }

  // Upper bound on the blocks' partial sums (a few tasks per block for large models).
  static constexpr int64_t kBlockBytes = int64_t(8) << 20;

  // What carve() depends on (the model is the engine's own).
  std::vector<int64_t> key() const {
    return {int64_t(sizeof(Scalar)), args_.tasks, args_.support, args_.query, args_.inner_steps,
            int64_t(num_threads_), int64_t(args_.algorithm), int64_t(need_grad_),
            int64_t(vector_lr_), int64_t(meta_sgd_), int64_t(split_)};
  }

  // Assigns every buffer a piece of the arena (base == nullptr: only measures).
  std::size_t carve(char* base, Workspace<Scalar>& ws) const {
    Carver c(base);
    const int64_t pp = layout_.padded_size, hp = layout_.head_size(), tasks = args_.tasks;
    ws.mean = c.take<Scalar>(pp);
    ws.lr_mean = meta_sgd_ ? c.take<Scalar>(pp) : nullptr;
    ws.block_sums = sums_ ? c.take<Scalar>(num_blocks_ * pp) : nullptr;
    ws.lr_block_sums = sums_ && meta_sgd_ ? c.take<Scalar>(num_blocks_ * pp) : nullptr;
    ws.reptile_rows = reptile_ ? c.take<Scalar>(tasks * pp) : nullptr;
    ws.threads.assign(num_threads_, ThreadWorkspace<Scalar>());
    for (ThreadWorkspace<Scalar>& w : ws.threads) {
      w.theta = c.take<Scalar>(pp);
      w.theta_t = layout_.transposed_size > 0 ? c.take<Scalar>(layout_.transposed_size) : nullptr;
      w.alpha = vector_lr_ ? c.take<Scalar>(pp) : nullptr;
      carve_pass(c, w.support, args_.support, second_order_);
      if (!reptile_) carve_pass(c, w.query, args_.query, false);
      w.phi.clear();
      for (int64_t k = 0; k < history_; ++k) w.phi.push_back(c.take<Scalar>(hp - first_end_));
      w.first = split_ ? c.take<Scalar>(first_end_) : nullptr;
      w.act1.clear();
      if (split_) {  // step 0's is the support pass's own act[1]
        w.act1.push_back(w.support.act[1]);
        for (int64_t k = 1; k < args_.inner_steps; ++k)
          w.act1.push_back(c.take<Scalar>(args_.support * layout_.width(1)));
      }
      w.grads.clear();
      const int64_t grad_slots = !vector_lr_ ? 0 : meta_sgd_ ? history_ : 1;
      for (int64_t k = 0; k < grad_slots; ++k) w.grads.push_back(c.take<Scalar>(hp));
      w.grad_sum = meta_sgd_ && !second_order_ ? c.take<Scalar>(hp) : nullptr;
      w.direction = second_order_ && vector_lr_ ? c.take<Scalar>(hp) : nullptr;
      w.grad = sums_ ? c.take<Scalar>(pp) : nullptr;
      w.lr_grad = meta_sgd_ ? c.take<Scalar>(pp) : nullptr;
    }
    if (base) {
      ws.ranges.reset(new std::atomic<uint64_t>[num_threads_]);
      ws.arrivals.reset(new std::atomic<int>[std::size_t(2) << levels_]);
    }
    return c.size();
  }

  void run(Workspace<Scalar>& ws) {
    ws_ = &ws;
    for (int j = 0; j < num_threads_; ++j) {
      const uint64_t begin = uint64_t(num_blocks_ * j / num_threads_);
      const uint64_t end = uint64_t(num_blocks_ * (j + 1) / num_threads_);
      ws.ranges[j].store(begin | end << 32, std::memory_order_relaxed);
    }
    for (std::size_t n = 0; n < (std::size_t(2) << levels_); ++n)
      ws.arrivals[n].store(0, std::memory_order_relaxed);
    ws.blocks_done.store(0, std::memory_order_relaxed);

    const auto work = [](void* self, int slot) { static_cast<MetaStep*>(self)->work(slot); };
    run_parallel(num_threads_, work, this);

    args_.all_finite = all_finite(args_.support_loss, args_.tasks * args_.inner_steps) &&
                       (reptile_ || all_finite(args_.query_loss, args_.tasks));
    const int64_t pp = layout_.padded_size;
    if (reptile_) {
      Scalar* theta = ws.threads[0].theta;  // (the caller may have found no block to run)
      layout_.pack(args_.params, theta);
      reptile_direction<Scalar>(theta, ws.reptile_rows, args_.tasks, pp, ws.mean);
      layout_.unpack(ws.mean, args_.grads);
    } else if (need_grad_) {  // the tree's root sum is in block 0's row
      scale(ws.block_sums, ws.mean);
      layout_.unpack(ws.mean, args_.grads);
      if (meta_sgd_) {
        scale(ws.lr_block_sums, ws.lr_mean);
        layout_.unpack(ws.lr_mean, args_.lr_grads);
      }
    }
  }

 private:
  // One thread's share: blocks until none is left; slot 0 then waits for the others'.
  void work(int slot) {
    ThreadWorkspace<Scalar>& w = ws_->threads[slot];
    for (int64_t b, blocks = 0; (b = claim(slot)) >= 0; ++blocks) {
      if (blocks == 0) {  // (a thread that joins too late to find work skips this)
        layout_.pack(args_.params, w.theta);
        if (w.theta_t) layout_.transpose(w.theta, w.theta_t);
        if (w.alpha) layout_.pack(args_.lrs, w.alpha);
      }
      run_block(b, w);
      finish_block(b);
    }
    if (slot == 0) wait_for(ws_->blocks_done, num_blocks_);
  }

  // The next block for `slot`: the front of its own range, else the back of another's.
  int64_t claim(int slot) const {
    for (int i = 0; i < num_threads_; ++i) {
      std::atomic<uint64_t>& range = ws_->ranges[(slot + i) % num_threads_];
      uint64_t r = range.load(std::memory_order_relaxed);
      while ((r & 0xffffffffu) < (r >> 32)) {
        const bool own = i == 0;
        const uint64_t taken = own ? r + 1 : r - (uint64_t(1) << 32);
        if (range.compare_exchange_weak(r, taken, std::memory_order_relaxed))
          return own ? int64_t(r & 0xffffffffu) : int64_t(r >> 32) - 1;
      }
    }
    return -1;
  }

  int64_t block_begin(int64_t b) const { return b * args_.tasks / num_blocks_; }

  // Block b's tasks in order: the first writes the block's row, the others are added to it.
  void run_block(int64_t b, ThreadWorkspace<Scalar>& w) const {
    const int64_t pp = layout_.padded_size;
    Scalar* sum = ws_->block_sums ? ws_->block_sums + b * pp : nullptr;
    Scalar* lr_sum = ws_->lr_block_sums ? ws_->lr_block_sums + b * pp : nullptr;
    for (int64_t t = block_begin(b); t < block_begin(b + 1); ++t) {
      const bool first = t == block_begin(b);
      run_task(t, w, first ? sum : w.grad, first ? lr_sum : w.lr_grad);
      if (!first && sum) add(w.grad, sum);
      if (!first && lr_sum) add(w.lr_grad, lr_sum);
    }
  }

  // Climbs the reduction tree from block b's leaf while this thread finished the second
  // child of the node above (a node whose right child is empty just takes its left
  // child's sum). A node's sum lives in the row of its leftmost block.
  void finish_block(int64_t b) const {
    if (sums_) {
      const int64_t pp = layout_.padded_size;
      int64_t index = b;
      for (int level = 0; level < levels_; ++level, index >>= 1) {
        if (((index ^ 1) << level) >= num_blocks_) continue;  // no right sibling
        const int64_t parent = (int64_t(1) << (levels_ - level - 1)) + (index >> 1);
        if (ws_->arrivals[parent].fetch_add(1, std::memory_order_acq_rel) == 0) break;
        const int64_t left = (index & ~int64_t(1)) << level, right = (index | 1) << level;
        add(ws_->block_sums + right * pp, ws_->block_sums + left * pp);
        if (Scalar* lr = ws_->lr_block_sums) add(lr + right * pp, lr + left * pp);
      }
    }
    ws_->blocks_done.fetch_add(1, std::memory_order_release);
  }

  void carve_pass(Carver& c, PassBuffers<Scalar>& buf, int64_t rows, bool with_r) const {
    const int64_t layers = layout_.num_layers();
    buf.rows = rows;
    const LayerLayout& first = layout_.layers[0];
    buf.input_copy = first.in != first.in_pad ? c.take<Scalar>(rows * first.in_pad) : nullptr;
    buf.act.assign(layers + 1, nullptr);
    buf.dact.assign(layers + 1, nullptr);
    buf.dpre.assign(layers, nullptr);
    buf.ract.assign(layers + 1, nullptr);
    buf.rdact.assign(layers + 1, nullptr);
    buf.rpre.assign(layers, nullptr);
    buf.rdpre.assign(layers, nullptr);
    int64_t scratch = 0;
    for (int64_t l = 1; l <= layers; ++l) {
      const int64_t size = rows * layout_.width(l);
      buf.act[l] = c.take<Scalar>(size);
      buf.dact[l] = c.take<Scalar>(size);
      buf.dpre[l - 1] = c.take<Scalar>(size);
      if (with_r) {
        buf.ract[l] = c.take<Scalar>(size);
        buf.rdact[l] = c.take<Scalar>(size);
        buf.rpre[l - 1] = c.take<Scalar>(size);
        buf.rdpre[l - 1] = c.take<Scalar>(size);
      }
      const LayerLayout& layer = layout_.layers[l - 1];
      if (layer.weight_t >= 0) scratch = std::max(scratch, 2 * layer.in * layer.out_pad);
    }
    buf.scratch = scratch > 0 ? c.take<Scalar>(scratch) : nullptr;
  }

  // Where phi_k (k >= 1) is stored: its slot, and with the split history the first
  // layer's buffer (which holds phi_k's first layer only until step k has run).
  ParamView<Scalar> slot(const ThreadWorkspace<Scalar>& w, int64_t k) const {
    Scalar* base = w.phi[std::min<int64_t>(k, history_) - 1];
    if (!split_) return {base, layout_.head_offset};
    return {base, first_end_, nullptr, w.first, first_end_};
  }

  // phi_k as a view of the adapted layers (k = 0: theta itself, with its transposed copy
  // for the layers that have one).
  ParamView<const Scalar> phi(const ThreadWorkspace<Scalar>& w, int64_t k) const {
    if (k == 0) return {w.theta, 0, w.theta_t};
    const ParamView<Scalar> s = slot(w, k);
    return {s.base, s.origin, nullptr, s.first, s.first_end};
  }

  // Task t's targets, `stride` elements (values or labels) after task t - 1's.
  const void* targets(const void* all, int64_t stride, int64_t t) const {
    if (spec_.loss == Loss::mse) return static_cast<const Scalar*>(all) + t * stride;
    return static_cast<const int64_t*>(all) + t * stride;
  }

  Scalar loss(PassBuffers<Scalar>& buf, const void* target, bool delta, Scalar* accuracy) const {
    const int64_t layers = layout_.num_layers();
    return loss_and_delta(spec_.loss, buf.rows, spec_.widths.back(), buf.act[layers],
                          layout_.width(layers), target, delta ? buf.dact[layers] : nullptr,
                          accuracy);
  }

  // One task; its meta-gradient (and rate gradient) is written to `row` (`lr_row`).
  void run_task(int64_t t, ThreadWorkspace<Scalar>& w, Scalar* row, Scalar* lr_row) const {
    const int64_t layers = layout_.num_layers(), head = layout_.head, steps = args_.inner_steps;
    const int64_t hp = layout_.head_size(), ho = layout_.head_offset;
    const Scalar* alpha = vector_lr_ ? w.alpha + ho : nullptr;
    const Scalar lr = args_.lr;
    const ParamView<const Scalar> theta = phi(w, 0);

    // Inner loop on the support set; ANIL's body features are computed once.
    PassBuffers<Scalar>& sup = w.support;
    const void* sup_y = targets(args_.support_y, args_.support_y_stride, t);
    sup.set_input(layout_, args_.support_x + t * args_.support_x_stride);
    if (head > 0) forward(layout_, theta, sup, 0, head);
    for (int64_t k = 0; k < steps; ++k) {
      const ParamView<const Scalar> now = phi(w, k);
      const ParamView<Scalar> next = slot(w, k + 1);
      if (split_) sup.act[1] = w.act1[k];  // kept for the sweep
      forward(layout_, now, sup, head, layers);
      args_.support_loss[t * steps + k] = loss(sup, sup_y, true, nullptr);
      if (!vector_lr_) {  // phi_{k+1} = phi_k - lr g_k, written by the gradient's products
        // (The split history's first layer is updated in place: its result is the last
        // thing the backward pass writes, and nothing reads that layer after it.)
        const ParamSink<Scalar> step{next, -lr, now};
        backward(layout_, now, sup, head, layers, &step, false);
        continue;
      }
      Scalar* g = w.grads[meta_sgd_ && second_order_ ? k : 0];
      const ParamSink<Scalar> grad{{g, ho}};
      backward(layout_, now, sup, head, layers, &grad, false);
      const Scalar* from = now.weight(layout_.layers[head]);
#pragma omp simd
      for (int64_t i = 0; i < hp; ++i) next.base[i] = from[i] - alpha[i] * g[i];
      if (w.grad_sum) {
        if (k == 0) std::memcpy(w.grad_sum, g, sizeof(Scalar) * hp);
        else
#pragma omp simd
          for (int64_t i = 0; i < hp; ++i) w.grad_sum[i] += g[i];
      }
    }
    const ParamView<const Scalar> adapted = phi(w, steps);
    if (args_.adapted)
      layout_.unpack(w.theta, adapted.base, args_.adapted + t * layout_.user_size);

    if (reptile_) {  // Reptile needs only phi_K: theta's rows for the body, phi_K's for the rest
      Scalar* row = ws_->reptile_rows + t * layout_.padded_size;
      std::memcpy(row, w.theta, sizeof(Scalar) * ho);
      std::memcpy(row + ho, adapted.base, sizeof(Scalar) * hp);
      return;
    }

    // Query loss at phi_K and its gradient v_K (and, for ANIL, the query features').
    PassBuffers<Scalar>& qry = w.query;
    const void* qry_y = targets(args_.query_y, args_.query_y_stride, t);
    qry.set_input(layout_, args_.query_x + t * args_.query_x_stride);
    if (head > 0) forward(layout_, theta, qry, 0, head);
    forward(layout_, adapted, qry, head, layers);
    args_.query_loss[t] = loss(qry, qry_y, need_grad_,
                               args_.query_accuracy ? args_.query_accuracy + t : nullptr);
    if (!need_grad_) return;
    const ParamView<Scalar> v{row + ho, ho};
    const ParamSink<Scalar> query_grad{v};
    backward(layout_, adapted, qry, head, layers, &query_grad, head > 0);
    if (lr_row) std::memset(lr_row, 0, sizeof(Scalar) * layout_.padded_size);

    if (!second_order_) {
      // dL/dalpha = -sum_k g_k * v_K (the inner gradients are constants).
      if (lr_row)
#pragma omp simd
        for (int64_t i = 0; i < hp; ++i) lr_row[ho + i] = -w.grad_sum[i] * v.base[i];
    } else {
      // Reverse sweep: v_k = v_{k+1} - H_k (alpha * v_{k+1}). Step K-1's support
      // activations are still in `sup` from the inner loop; earlier ones are recomputed
      // (with the split history from the kept act[1]: `now`'s first layer is not phi_k's
      // then, and is not read). With a scalar rate, H_k (lr v) = lr H_k v: the direction
      // is v itself.
      Scalar* features_grad = head > 0 ? sup.dact[head] : nullptr;
      if (features_grad)
        std::memset(features_grad, 0, sizeof(Scalar) * sup.rows * layout_.width(head));
      const ParamView<const Scalar> u{vector_lr_ ? w.direction : v.base, ho};
      const Scalar scale = vector_lr_ ? Scalar(-1) : -lr;
      const ParamSink<Scalar> sweep{v, scale, {v.base, v.origin}};
      for (int64_t k = steps - 1; k >= 0; --k) {
        const ParamView<const Scalar> now = phi(w, k);
        if (k < steps - 1) {
          if (split_) sup.act[1] = w.act1[k];
          forward(layout_, now, sup, split_ ? 1 : head, layers);
          loss(sup, sup_y, true, nullptr);
          backward<Scalar>(layout_, now, sup, head, layers, nullptr, false);
        }
        if (vector_lr_)
#pragma omp simd
          for (int64_t i = 0; i < hp; ++i) w.direction[i] = alpha[i] * v.base[i];
        if (lr_row) {  // dL/dalpha = -sum_k g_k * v_{k+1}
          const Scalar* g = w.grads[k];
#pragma omp simd
          for (int64_t i = 0; i < hp; ++i) lr_row[ho + i] -= g[i] * v.base[i];
        }
        r_forward(layout_, now, u, sup, head, layers);
        loss_r_delta(spec_.loss, sup.rows, spec_.widths.back(), sup.act[layers], sup.ract[layers],
                     layout_.width(layers), sup.rdact[layers]);
        r_backward(layout_, now, u, sup, head, layers, sweep, features_grad, scale);
      }
    }

    // ANIL: the body's gradient through the query features and (second order) through
    // the support features' effect on every inner step.
    if (head > 0) {
      const ParamSink<Scalar> body{{row, 0}};
      backward(layout_, theta, qry, 0, head, &body, false);
      if (second_order_) {
        const ParamSink<Scalar> more{{row, 0}, Scalar(1), {row, 0}};
        backward(layout_, theta, sup, 0, head, &more, false);
      }
    }
  }

  static bool all_finite(const Scalar* values, int64_t count) {
    for (int64_t i = 0; i < count; ++i)
      if (!std::isfinite(values[i])) return false;
    return true;
  }

  void add(const Scalar* values, Scalar* sum) const {
#pragma omp simd
    for (int64_t p = 0; p < layout_.padded_size; ++p) sum[p] += values[p];
  }

  // mean = sum / T
  void scale(const Scalar* sum, Scalar* mean) const {
    const Scalar inv = Scalar(1) / Scalar(args_.tasks);
#pragma omp simd
    for (int64_t p = 0; p < layout_.padded_size; ++p) mean[p] = sum[p] * inv;
  }

  const MlpSpec& spec_;
  const MlpLayout<Scalar> layout_;
  MetaStepArgs<Scalar>& args_;
  Workspace<Scalar>* ws_ = nullptr;
  int num_threads_ = 1;
  bool reptile_ = false, need_grad_ = false, second_order_ = false;
  bool vector_lr_ = false;  // per-parameter inner rates (Meta-SGD) rather than one scalar
  bool meta_sgd_ = false;   // ... and their gradient is wanted
  bool sums_ = false;       // a meta-gradient summed over tasks (not Reptile)
  int64_t history_ = 1;
  bool split_ = false;      // the split history (see ThreadWorkspace)
  int64_t first_end_ = 0;   // ... and the padded size of its first layer (else 0)
  int64_t num_blocks_ = 1;  // task blocks (a function of T and the model only)
  int levels_ = 0;          // the reduction tree's depth: 2^levels_ >= num_blocks_
};

// True when every element of x's tasks [t0, t1), runs of `count` (task t's at t * stride),
// is finite. (x - x is 0 for a finite x and NaN otherwise; NaN sticks in the sum.)
template <typename Scalar>
bool finite_run(const Scalar* x, int64_t t0, int64_t t1, int64_t stride, int64_t count) {
  using S = Simd<Scalar>;
  typename S::Vec acc[4] = {S::zero(), S::zero(), S::zero(), S::zero()};
  Scalar tail = 0;
  for (int64_t t = t0; t < t1; ++t) {
    const Scalar* p = x + t * stride;
    int64_t i = 0;
    for (; i + 4 * S::kLanes <= count; i += 4 * S::kLanes)
      for (int v = 0; v < 4; ++v) {
        const typename S::Vec xv = S::load(p + i + v * S::kLanes);
        acc[v] += xv - xv;
      }
    for (; i < count; ++i) tail += p[i] - p[i];
  }
  return S::sum(acc[0] + acc[1] + acc[2] + acc[3]) + tail == Scalar(0);
}

// The check of the inputs (support_x, query_x and mse targets) before anything is
// computed; tasks are scanned in parallel when there are many values (a few MB for
// Omniglot-sized meta-batches).
template <typename Scalar>
class InputScan {
 public:
  InputScan(const MlpSpec& spec, const MetaStepArgs<Scalar>& args) : spec_(spec), args_(args) {}

  bool finite(int max_threads) {
    const int64_t in = spec_.widths.front(), out = spec_.widths.back();
    const int64_t per_task = (args_.support + args_.query) * (in + (mse() ? out : 0));
    const int threads = per_task * args_.tasks < kParallelValues ? 1 : max_threads;
    chunk_ = std::max<int64_t>(1, args_.tasks / (4 * int64_t(threads)));
    chunks_ = (args_.tasks + chunk_ - 1) / chunk_;
    const auto work = [](void* self, int slot) { static_cast<InputScan*>(self)->work(slot); };
    run_parallel(threads, work, this);
    return finite_.load(std::memory_order_relaxed);
  }

 private:
  static constexpr int64_t kParallelValues = int64_t(1) << 16;

  bool mse() const { return spec_.loss == Loss::mse; }

  bool finite_tasks(int64_t t0, int64_t t1) const {
    const int64_t in = spec_.widths.front(), out = spec_.widths.back();
    const bool query = args_.algorithm != Algorithm::reptile;
    const auto* sy = static_cast<const Scalar*>(args_.support_y);
    const auto* qy = static_cast<const Scalar*>(args_.query_y);
    return finite_run(args_.support_x, t0, t1, args_.support_x_stride, args_.support * in) &&
           (!mse() || finite_run(sy, t0, t1, args_.support_y_stride, args_.support * out)) &&
           (!query || finite_run(args_.query_x, t0, t1, args_.query_x_stride, args_.query * in)) &&
           (!query || !mse() || finite_run(qy, t0, t1, args_.query_y_stride, args_.query * out));
  }

  void work(int slot) {
    for (int64_t c; (c = next_.fetch_add(1, std::memory_order_relaxed)) < chunks_;) {
      if (!finite_tasks(c * chunk_, std::min(args_.tasks, (c + 1) * chunk_)))
        finite_.store(false, std::memory_order_relaxed);
      done_.fetch_add(1, std::memory_order_release);
    }
    if (slot == 0) wait_for(done_, chunks_);
  }

  const MlpSpec& spec_;
  const MetaStepArgs<Scalar>& args_;
  int64_t chunk_ = 1, chunks_ = 0;  // tasks per chunk, chunks
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<bool> finite_{true};
};

template <typename Scalar>
void run_meta_step(const MlpSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
  const int threads = max_threads();
  if (!InputScan<Scalar>(spec, args).finite(threads)) {  // nothing is computed or written
    args.inputs_finite = args.all_finite = false;
    return;
  }
  MetaStep<Scalar> step(spec, args, threads);
  step.run(arena.plan_for<Workspace<Scalar>>(step.key(), [&](char* base, Workspace<Scalar>& ws) {
    return step.carve(base, ws);
  }));
}

}  // namespace

void meta_step(const MlpSpec& spec, MetaStepArgs<float>& args, Arena& arena) {
  run_meta_step(spec, args, arena);
}
void meta_step(const MlpSpec& spec, MetaStepArgs<double>& args, Arena& arena) {
  run_meta_step(spec, args, arena);
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
