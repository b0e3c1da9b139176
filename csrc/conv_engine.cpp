// The conv engine's meta-step driver: per-task inner loop, query gradient and reverse
// sweep, run in parallel over tasks. Each task's meta-gradient goes to its own row; the
// rows are summed in task order, so the result is bitwise the same for any number of
// threads.
//
// Compiled once per instruction set (FASTMETA_ISA names the namespace; see simd.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "conv_engine_isa.h"
#include "conv_passes.h"
#include "mlp_loss.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastmeta {
namespace FASTMETA_ISA {
namespace {

// One thread's scratch: it runs its tasks one after another.
template <typename Scalar>
struct ConvThreadWorkspace {
  ConvPassBuffers<Scalar> support, query;
  ConvScratch<Scalar> scratch;
  std::vector<Scalar*> phi;  // phi_1 .. phi_K (second order), or one slot updated in place
  Scalar* grad = nullptr;    // the inner step's support gradient g_k
  Scalar* u = nullptr;       // the sweep's direction v_{k+1}
  Scalar* hu = nullptr;      // H_k u
};

template <typename Scalar>
class ConvMetaStep {
 public:
  ConvMetaStep(const ConvSpec& spec, MetaStepArgs<Scalar>& args, int max_threads)
      : spec_(spec), layout_(spec), args_(args) {
    second_order_ = args.algorithm == Algorithm::second_order && args.need_grad;
    history_ = second_order_ ? args.inner_steps : 1;
    num_threads_ = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, args.tasks)));
  }

  // Assigns every buffer a piece of the arena (base == nullptr: only measures).
  std::size_t carve(char* base) {
    Carver c(base);
    const int64_t pp = layout_.padded_size;
    theta_ = c.take<Scalar>(pp);
    mean_ = c.take<Scalar>(pp);
    rows_ = args_.need_grad ? c.take<Scalar>(args_.tasks * pp) : nullptr;
    int64_t col = 0, rcol = 0;  // the largest im2col matrices any pass builds
    for (const ConvBlockLayout& b : layout_.blocks) {
      const int64_t pixels = b.h * b.w * b.k_pad;
      col = std::max(col, std::max(args_.support, args_.query) * pixels);
      rcol = std::max(rcol, args_.support * pixels);
    }
    threads_.assign(num_threads_, ConvThreadWorkspace<Scalar>());
    for (ConvThreadWorkspace<Scalar>& w : threads_) {
      carve_pass(c, w.support, args_.support, second_order_);
      carve_pass(c, w.query, args_.query, false);
      w.scratch.col = c.take<Scalar>(col);
      w.scratch.dcol = c.take<Scalar>(col);
      w.scratch.rcol = second_order_ ? c.take<Scalar>(rcol) : nullptr;
      w.phi.clear();
      for (int64_t k = 0; k < history_; ++k) w.phi.push_back(c.take<Scalar>(pp));
      w.grad = c.take<Scalar>(pp);
      w.u = second_order_ ? c.take<Scalar>(pp) : nullptr;
      w.hu = second_order_ ? c.take<Scalar>(pp) : nullptr;
    }
    return c.size();
  }

  // What carve() depends on: the arena is re-zeroed when this changes.
  std::string plan() const {
    std::string s = "conv," + std::to_string(sizeof(Scalar));
    for (int64_t v : {args_.tasks, args_.support, args_.query, args_.inner_steps,
                      int64_t(num_threads_), int64_t(args_.algorithm), int64_t(args_.need_grad),
                      spec_.height, spec_.width, spec_.in_channels, spec_.outputs})
      s += "," + std::to_string(v);
    for (int64_t ch : spec_.channels) s += ";" + std::to_string(ch);
    return s;
  }

  void run() {
    layout_.pack(args_.params, theta_);
    const int64_t pp = layout_.padded_size;
#pragma omp parallel num_threads(num_threads_)
    {
#ifdef _OPENMP
      ConvThreadWorkspace<Scalar>& w = threads_[omp_get_thread_num()];
#else
      ConvThreadWorkspace<Scalar>& w = threads_[0];
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t t = 0; t < args_.tasks; ++t) run_task(t, w, rows_ ? rows_ + t * pp : nullptr);
      if (rows_) reduce_rows();
    }
    args_.all_finite = all_finite(args_.support_loss, args_.tasks * args_.inner_steps) &&
                       all_finite(args_.query_loss, args_.tasks);
    if (rows_) layout_.unpack(mean_, args_.grads);
  }

 private:
  void carve_pass(Carver& c, ConvPassBuffers<Scalar>& buf, int64_t samples, bool with_r) {
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
      bb.y = c.take<Scalar>(map);
      bb.s = c.take<Scalar>(b.ch);
      bb.arg = c.take<uint8_t>(pooled);
      bb.pooled = c.take<Scalar>(pooled);
      bb.dpooled = c.take<Scalar>(pooled);
      bb.dy = c.take<Scalar>(map);
      bb.dz = with_r ? c.take<Scalar>(map) : bb.dy;  // the R-backward reads dy after dz
      if (with_r) {
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
      buf.rfeat = c.take<Scalar>(samples * h.in_pad);
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

  // One task; its meta-gradient is written to `row` (null: losses only).
  void run_task(int64_t t, ConvThreadWorkspace<Scalar>& w, Scalar* row) const {
    const int64_t steps = args_.inner_steps, pp = layout_.padded_size;
    const Scalar lr = args_.lr;

    // Inner loop on the support set.
    ConvPassBuffers<Scalar>& sup = w.support;
    const void* sup_y = targets(args_.support_y, args_.support_y_stride, t);
    load_images(layout_, args_.support_x + t * args_.support_x_stride, sup);
    for (int64_t k = 0; k < steps; ++k) {
      const Scalar* now = phi(w, k);
      Scalar* next = w.phi[std::min<int64_t>(k + 1, history_) - 1];
      conv_forward(layout_, now, sup, w.scratch);
      args_.support_loss[t * steps + k] = loss(sup, sup_y, true, nullptr);
      conv_backward(layout_, now, sup, w.scratch, w.grad);
#pragma omp simd
      for (int64_t i = 0; i < pp; ++i) next[i] = now[i] - lr * w.grad[i];
    }
    const Scalar* adapted = phi(w, steps);
    if (args_.adapted) layout_.unpack(adapted, args_.adapted + t * layout_.user_size);

    // Query loss at phi_K and its gradient v_K.
    ConvPassBuffers<Scalar>& qry = w.query;
    const void* qry_y = targets(args_.query_y, args_.query_y_stride, t);
    load_images(layout_, args_.query_x + t * args_.query_x_stride, qry);
    conv_forward(layout_, adapted, qry, w.scratch);
    args_.query_loss[t] = loss(qry, qry_y, row != nullptr,
                               args_.query_accuracy ? args_.query_accuracy + t : nullptr);
    if (!row) return;
    conv_backward(layout_, adapted, qry, w.scratch, row);
    if (!second_order_) return;  // first order: the meta-gradient is v_K

    // Reverse sweep: v_k = v_{k+1} - lr H_k v_{k+1}. Step K-1's support activations and
    // deltas are still in `sup` from the inner loop; earlier ones are recomputed.
    for (int64_t k = steps - 1; k >= 0; --k) {
      const Scalar* now = phi(w, k);
      if (k < steps - 1) {
        conv_forward(layout_, now, sup, w.scratch);
        loss(sup, sup_y, true, nullptr);
        conv_backward<Scalar>(layout_, now, sup, w.scratch, nullptr);
      }
      std::memcpy(w.u, row, sizeof(Scalar) * pp);
      conv_r_forward(layout_, now, w.u, sup, w.scratch);
      loss_r_delta(spec_.loss, sup.samples, spec_.outputs, sup.out, sup.rout, spec_.outputs,
                   sup.rdout);
      conv_r_backward(layout_, now, w.u, sup, w.scratch, w.hu);
#pragma omp simd
      for (int64_t i = 0; i < pp; ++i) row[i] -= lr * w.hu[i];
    }
  }

  // mean[p] = (rows[0][p] + rows[1][p] + ...) / T in task order; the columns are shared
  // among the threads (called inside the parallel region).
  void reduce_rows() {
    const int64_t pp = layout_.padded_size, chunk = 1024;
    const Scalar inv = Scalar(1) / Scalar(args_.tasks);
#pragma omp for schedule(static)
    for (int64_t p0 = 0; p0 < pp; p0 += chunk) {
      const int64_t n = std::min(chunk, pp - p0);
      Scalar* out = mean_ + p0;
      std::memcpy(out, rows_ + p0, sizeof(Scalar) * n);
      for (int64_t t = 1; t < args_.tasks; ++t) {
        const Scalar* row = rows_ + t * pp + p0;
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
  bool second_order_ = false;
  int64_t history_ = 1;
  Scalar *theta_ = nullptr, *mean_ = nullptr;
  Scalar* rows_ = nullptr;  // [T, Pp]: every task's meta-gradient
  std::vector<ConvThreadWorkspace<Scalar>> threads_;
};

template <typename Scalar>
void run_conv_meta_step(const ConvSpec& spec, MetaStepArgs<Scalar>& args, Arena& arena) {
#ifdef _OPENMP
  const int max_threads = omp_get_max_threads();
#else
  const int max_threads = 1;
#endif
  ConvMetaStep<Scalar> step(spec, args, max_threads);
  const std::size_t bytes = step.carve(nullptr);
  step.carve(arena.prepare(bytes, step.plan()));
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
