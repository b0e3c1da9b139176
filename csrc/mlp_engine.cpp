// The meta-step driver: per-task inner loop, query gradient and reverse sweep, run in
// parallel over tasks. The tasks are cut into blocks that depend only on the meta-batch
// (never on the number of threads); each block's gradients are summed in task order, then
// the blocks in block order, so the result is bitwise the same for any number of threads.
//
// Compiled once per instruction set (FASTMETA_ISA names the namespace; see simd.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "mlp_engine_isa.h"
#include "mlp_loss.h"
#include "mlp_passes.h"
#include "reptile.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// One thread's scratch: it runs its tasks one after another, so a task's parameter
// history lives here rather than per task.
template <typename Scalar>
struct ThreadWorkspace {
  PassBuffers<Scalar> support, query;
  std::vector<Scalar*> phi;    // phi_1 .. phi_K (second order), or one slot updated in place
  std::vector<Scalar*> grads;  // per-parameter rates: g_0 .. g_{K-1} (Meta-SGD, second
                               // order) or one slot; a scalar rate needs none
  Scalar* grad_sum = nullptr;  // Meta-SGD, first order: sum_k g_k
  Scalar* direction = nullptr; // per-parameter rates: u = alpha * v_{k+1} of the sweep step
  Scalar* grad = nullptr;      // a task's meta-gradient when it is not its block's first
  Scalar* lr_grad = nullptr;   // ... and its rate gradient (Meta-SGD)
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
    // As many blocks as tasks while their partial sums stay small, fewer (of several tasks
    // each) for large models: never more than kBlockBytes of partial sums.
    // (Without a meta-gradient there is nothing to sum: one task per block.)
    const int64_t row_bytes = layout_.padded_size * int64_t(sizeof(Scalar)) * (meta_sgd_ ? 2 : 1);
    num_blocks_ = need_grad_ && !reptile_
                      ? std::max<int64_t>(1, std::min<int64_t>(args.tasks, kBlockBytes / row_bytes))
                      : args.tasks;
    num_threads_ = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, num_blocks_)));
  }

  // Upper bound on the blocks' partial sums (a few tasks per block for large models).
  static constexpr int64_t kBlockBytes = int64_t(8) << 20;

  int64_t block_begin(int64_t b) const { return b * args_.tasks / num_blocks_; }

  // Assigns every buffer a piece of the arena (base == nullptr: only measures).
  std::size_t carve(char* base) {
    Carver c(base);
    const int64_t pp = layout_.padded_size, hp = layout_.head_size(), tasks = args_.tasks;
    theta_ = c.take<Scalar>(pp);
    alpha_ = vector_lr_ ? c.take<Scalar>(pp) : nullptr;
    mean_ = c.take<Scalar>(pp);
    lr_mean_ = meta_sgd_ ? c.take<Scalar>(pp) : nullptr;
    const bool sums = need_grad_ && !reptile_;
    block_sums_ = sums ? c.take<Scalar>(num_blocks_ * pp) : nullptr;
    lr_block_sums_ = sums && meta_sgd_ ? c.take<Scalar>(num_blocks_ * pp) : nullptr;
    reptile_rows_ = reptile_ ? c.take<Scalar>(tasks * pp) : nullptr;
    threads_.assign(num_threads_, ThreadWorkspace<Scalar>());
    for (ThreadWorkspace<Scalar>& w : threads_) {
      carve_pass(c, w.support, args_.support, second_order_);
      if (!reptile_) carve_pass(c, w.query, args_.query, false);
      w.phi.clear();
      for (int64_t k = 0; k < history_; ++k) w.phi.push_back(c.take<Scalar>(hp));
      w.grads.clear();
      const int64_t grad_slots = !vector_lr_ ? 0 : meta_sgd_ ? history_ : 1;
      for (int64_t k = 0; k < grad_slots; ++k) w.grads.push_back(c.take<Scalar>(hp));
      w.grad_sum = meta_sgd_ && !second_order_ ? c.take<Scalar>(hp) : nullptr;
      w.direction = second_order_ && vector_lr_ ? c.take<Scalar>(hp) : nullptr;
      w.grad = need_grad_ && !reptile_ ? c.take<Scalar>(pp) : nullptr;
      w.lr_grad = meta_sgd_ ? c.take<Scalar>(pp) : nullptr;
    }
    return c.size();
  }

  // What carve() depends on: the arena is re-zeroed when this changes.
  std::string plan() const {
    std::string s = std::to_string(sizeof(Scalar));
    for (int64_t v : {args_.tasks, args_.support, args_.query, args_.inner_steps,
                      int64_t(num_threads_), int64_t(args_.algorithm), int64_t(need_grad_),
                      int64_t(vector_lr_), int64_t(meta_sgd_), layout_.head, num_blocks_})
      s += "," + std::to_string(v);
    for (int64_t w : spec_.widths) s += ";" + std::to_string(w);
    return s;
  }

  void run() {
    layout_.pack(args_.params, theta_);
    if (vector_lr_) layout_.pack(args_.lrs, alpha_);
    const int64_t pp = layout_.padded_size;

    // Blocks go to whichever thread is free (a busy machine may stall one); each task's
    // gradient goes straight into its block's row when it is the block's first task,
    // else into the thread's buffer and then added to the row, in task order.
#pragma omp parallel num_threads(num_threads_)
    {
#ifdef _OPENMP
      ThreadWorkspace<Scalar>& w = threads_[omp_get_thread_num()];
#else
      ThreadWorkspace<Scalar>& w = threads_[0];
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < num_blocks_; ++b) {
        Scalar* sum = block_sums_ ? block_sums_ + b * pp : nullptr;
        Scalar* lr_sum = lr_block_sums_ ? lr_block_sums_ + b * pp : nullptr;
        for (int64_t t = block_begin(b); t < block_begin(b + 1); ++t) {
          const bool first = t == block_begin(b);
          run_task(t, w, first ? sum : w.grad, first ? lr_sum : w.lr_grad);
          if (!first && sum) add(w.grad, sum);
          if (!first && lr_sum) add(w.lr_grad, lr_sum);
        }
      }
      // mean = (sum of the block rows, in block order) / T, by column ranges.
      if (block_sums_) {
        reduce_blocks(block_sums_, mean_);
        if (lr_block_sums_) reduce_blocks(lr_block_sums_, lr_mean_);
      }
    }

    args_.all_finite = all_finite(args_.support_loss, args_.tasks * args_.inner_steps) &&
                       (reptile_ || all_finite(args_.query_loss, args_.tasks));
    if (reptile_) {
      reptile_direction<Scalar>(theta_, reptile_rows_, args_.tasks, layout_.padded_size, mean_);
      layout_.unpack(mean_, args_.grads);
    } else if (need_grad_) {
      layout_.unpack(mean_, args_.grads);
      if (meta_sgd_) layout_.unpack(lr_mean_, args_.lr_grads);
    }
  }

 private:
  void carve_pass(Carver& c, PassBuffers<Scalar>& buf, int64_t rows, bool with_r) {
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
    }
  }

  // phi_k as a view of the adapted layers (k = 0: theta itself).
  ParamView<const Scalar> phi(const ThreadWorkspace<Scalar>& w, int64_t k) const {
    if (k == 0) return {theta_, 0};
    return {w.phi[std::min<int64_t>(k, history_) - 1], layout_.head_offset};
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
    const Scalar* alpha = vector_lr_ ? alpha_ + ho : nullptr;
    const Scalar lr = args_.lr;
    const ParamView<const Scalar> theta{theta_, 0};

    // Inner loop on the support set; ANIL's body features are computed once.
    PassBuffers<Scalar>& sup = w.support;
    const void* sup_y = targets(args_.support_y, args_.support_y_stride, t);
    sup.set_input(layout_, args_.support_x + t * args_.support_x_stride);
    if (head > 0) forward(layout_, theta, sup, 0, head);
    for (int64_t k = 0; k < steps; ++k) {
      const ParamView<const Scalar> now = phi(w, k);
      Scalar* next = w.phi[std::min<int64_t>(k + 1, history_) - 1];
      forward(layout_, now, sup, head, layers);
      args_.support_loss[t * steps + k] = loss(sup, sup_y, true, nullptr);
      if (!vector_lr_) {  // phi_{k+1} = phi_k - lr g_k, written by the gradient's products
        const ParamSink<Scalar> step{{next, ho}, -lr, now};
        backward(layout_, now, sup, head, layers, &step, false);
        continue;
      }
      Scalar* g = w.grads[meta_sgd_ && second_order_ ? k : 0];
      const ParamSink<Scalar> grad{{g, ho}};
      backward(layout_, now, sup, head, layers, &grad, false);
      const Scalar* from = now.weight(layout_.layers[head]);
#pragma omp simd
      for (int64_t i = 0; i < hp; ++i) next[i] = from[i] - alpha[i] * g[i];
      if (w.grad_sum) {
        if (k == 0) std::memcpy(w.grad_sum, g, sizeof(Scalar) * hp);
        else
#pragma omp simd
          for (int64_t i = 0; i < hp; ++i) w.grad_sum[i] += g[i];
      }
    }
    const ParamView<const Scalar> adapted = phi(w, steps);
    if (args_.adapted)
      layout_.unpack(theta_, adapted.base, args_.adapted + t * layout_.user_size);

    if (reptile_) {  // Reptile needs only phi_K: theta's rows for the body, phi_K's for the rest
      Scalar* row = reptile_rows_ + t * layout_.padded_size;
      std::memcpy(row, theta_, sizeof(Scalar) * ho);
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
      // activations are still in `sup` from the inner loop; earlier ones are recomputed.
      // With a scalar rate, H_k (lr v) = lr H_k v: the direction is v itself.
      Scalar* features_grad = head > 0 ? sup.dact[head] : nullptr;
      if (features_grad)
        std::memset(features_grad, 0, sizeof(Scalar) * sup.rows * layout_.width(head));
      const ParamView<const Scalar> u{vector_lr_ ? w.direction : v.base, ho};
      const Scalar scale = vector_lr_ ? Scalar(-1) : -lr;
      const ParamSink<Scalar> sweep{v, scale, {v.base, v.origin}};
      for (int64_t k = steps - 1; k >= 0; --k) {
        const ParamView<const Scalar> now = phi(w, k);
        if (k < steps - 1) {
          forward(layout_, now, sup, head, layers);
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

  // mean[p] = (rows[0][p] + rows[1][p] + ...) / T, each column summed in block order;
  // the columns are shared among the threads (called inside the parallel region).
  void reduce_blocks(const Scalar* rows, Scalar* mean) const {
    const int64_t pp = layout_.padded_size, chunk = 1024;
    const Scalar inv = Scalar(1) / Scalar(args_.tasks);
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < pp; p0 += chunk) {
      const int64_t n = std::min(chunk, pp - p0);
      Scalar* out = mean + p0;
      std::memcpy(out, rows + p0, sizeof(Scalar) * n);
      for (int64_t b = 1; b < num_blocks_; ++b) {
        const Scalar* row = rows + b * pp + p0;
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) out[p] += row[p];
      }
#pragma omp simd
      for (int64_t p = 0; p < n; ++p) out[p] *= inv;
    }
  }

  const MlpSpec& spec_;
  const MlpLayout<Scalar> layout_;
  MetaStepArgs<Scalar>& args_;
  int num_threads_ = 1;
  bool reptile_ = false, need_grad_ = false, second_order_ = false;
  bool vector_lr_ = false;  // per-parameter inner rates (Meta-SGD) rather than one scalar
  bool meta_sgd_ = false;   // ... and their gradient is wanted
  int64_t history_ = 1;
  int64_t num_blocks_ = 1;  // task blocks (a function of T and the model only)
  Scalar *block_sums_ = nullptr, *lr_block_sums_ = nullptr;  // [blocks, Pp] partial sums
  Scalar *theta_ = nullptr, *alpha_ = nullptr;
  Scalar *mean_ = nullptr, *lr_mean_ = nullptr;  // sums over tasks, then means
  Scalar* reptile_rows_ = nullptr;               // Reptile: every task's phi_K [T, Pp]
  std::vector<ThreadWorkspace<Scalar>> threads_;
};

template <typename Scalar>
void run_meta_step(const MlpSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
#ifdef _OPENMP
  const int max_threads = omp_get_max_threads();
#else
  const int max_threads = 1;
#endif
  MetaStep<Scalar> step(spec, args, max_threads);
  const std::size_t bytes = step.carve(nullptr);
  step.carve(arena.prepare(bytes, step.plan()));
  step.run();
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
