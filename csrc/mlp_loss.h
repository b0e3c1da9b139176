// The two losses, as the engine needs them: the mean loss of one task, its gradient with
// respect to the model's output, and that gradient's directional derivative R{delta}.
//
//   mse            delta = 2 (o - y) / (N D)                R{delta} = 2 R{o} / (N D)
//   cross-entropy  p = softmax(o), delta = (p - onehot) / N
//                  R{delta} = (p R{o} - p (p . R{o})) / N     (per row)
//
// Outputs o are [N, D] with row stride ld; targets are [N * D] (mse) or [N] labels.
#pragma once
#include <cmath>
#include <cstdint>

#include "mlp_spec.h"
#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

namespace detail {

// Numerically stable log-sum-exp of one row, and the row's softmax into p (may be null).
template <typename Scalar>
inline Scalar log_softmax_row(const Scalar* o, int64_t cols, Scalar* p) {
  Scalar top = o[0];
  for (int64_t j = 1; j < cols; ++j) top = o[j] > top ? o[j] : top;
  Scalar total = 0;
  for (int64_t j = 0; j < cols; ++j) total += std::exp(o[j] - top);
  const Scalar lse = top + std::log(total);
  if (p)
    for (int64_t j = 0; j < cols; ++j) p[j] = std::exp(o[j] - lse);
  return lse;
}

}  // namespace detail

// Returns the task's mean loss; writes delta (if non-null) and the fraction of correct
// arg-max predictions (cross-entropy, if accuracy is non-null).
template <typename Scalar>
Scalar loss_and_delta(Loss loss, int64_t rows, int64_t cols, const Scalar* out, int64_t ld,
                      const void* target, Scalar* delta, Scalar* accuracy) {
  Scalar total = 0;
  if (loss == Loss::mse) {
    const Scalar* y = static_cast<const Scalar*>(target);
    const Scalar scale = Scalar(2) / Scalar(rows * cols);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t j = 0; j < cols; ++j) {
        const Scalar diff = out[r * ld + j] - y[r * cols + j];
        total += diff * diff;
        if (delta) delta[r * ld + j] = scale * diff;
      }
    }
    return total / Scalar(rows * cols);
  }
  const int64_t* labels = static_cast<const int64_t*>(target);
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  int64_t correct = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar* o = out + r * ld;
    Scalar* d = delta ? delta + r * ld : nullptr;
    const Scalar lse = detail::log_softmax_row(o, cols, d);
    total += lse - o[labels[r]];
    if (d) {
      for (int64_t j = 0; j < cols; ++j) d[j] *= inv_rows;
      d[labels[r]] -= inv_rows;
    }
    int64_t best = 0;  // the first maximum, as torch.argmax
    for (int64_t j = 1; j < cols; ++j) best = o[j] > o[best] ? j : best;
    correct += best == labels[r];
  }
  if (accuracy) *accuracy = Scalar(correct) / Scalar(rows);
  return total * inv_rows;
}

// R{delta} from R{o} at the same output o.
template <typename Scalar>
void loss_r_delta(Loss loss, int64_t rows, int64_t cols, const Scalar* out, const Scalar* r_out,
                  int64_t ld, Scalar* r_delta) {
  if (loss == Loss::mse) {
    const Scalar scale = Scalar(2) / Scalar(rows * cols);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < cols; ++j) r_delta[r * ld + j] = scale * r_out[r * ld + j];
    return;
  }
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  for (int64_t r = 0; r < rows; ++r) {
    Scalar* rd = r_delta + r * ld;
    const Scalar* ro = r_out + r * ld;
    detail::log_softmax_row(out + r * ld, cols, rd);  // rd = p for now
    Scalar p_dot = 0;
    for (int64_t j = 0; j < cols; ++j) p_dot += rd[j] * ro[j];
    for (int64_t j = 0; j < cols; ++j) rd[j] = rd[j] * (ro[j] - p_dot) * inv_rows;
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
