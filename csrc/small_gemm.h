// The two small matrix-product kernels every pass of the MLP engine is built from.
//
// Matrices are row-major with rows padded to whole vectors (the padding holds zeros),
// so the vectorised dimension never needs a scalar tail. Each kernel takes up to two
// operand pairs summed into the same output, because the R-operator's products come in
// pairs (R{x} W^T + x U^T, R{d} W + d U, R{d}^T x + d^T R{x}): one pass over the output.
//
//   dot form   C[r, c] = bias[c] + sum_p sum_i A_p[r, i] * B_p[c, i]
//              (y = x W^T: both operands are read along their rows, reduced per output)
//   axpy form  C[r, :] = addend[r, :] + scale * sum_p sum_k a_p(r, k) * B_p[k, :]
//              (d W and d^T x: a scalar of A times a row of B, accumulated in registers;
//              the addend fuses "accumulate" and the SGD step into the final write)
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// Register blocking: an RB x CB tile of accumulators that fits the register file with
// room for the operands it streams (axpy form: CB counts vectors of columns; dot form: CB
// counts outputs). Measured on the 784-256-128-64-64-5 MLP's products: a 4 x 4 dot tile
// reaches ~70 GMAC/s per core with AVX-512, a 2 x 8 one ~40 (its A rows stream from L2
// twice as often) and a 4 x 8 one spills.
// The axpy form spends kAxpyAccumulators on a panel of CB <= kAxpyCols vectors: a
// narrower panel gets taller tiles (up to kAxpyMaxRows), so that a 48-wide layer (3
// vectors) runs 10 rows as 5 + 5 rather than 4 + 4 + 2 (~15% faster: B streams twice,
// and no thin tile).
#if defined(__AVX512F__)
constexpr int kAxpyAccumulators = 16, kAxpyCols = 4;
constexpr int kDotRows = 4, kDotCols = 4;
#else
constexpr int kAxpyAccumulators = 8, kAxpyCols = 2;
constexpr int kDotRows = 4, kDotCols = 2;
#endif
constexpr int kAxpyMaxRows = 5;

template <typename Scalar>
struct DotOperand {
  const Scalar* a;  // [rows, depth], row stride lda
  int64_t lda;
  const Scalar* b;  // [cols, depth], row stride ldb
  int64_t ldb;
};

template <typename Scalar>
struct AxpyOperand {
  const Scalar* a;  // a(r, k) = a[r * a_row + k * a_depth]: A or A^T without a copy
  int64_t a_row, a_depth;
  const Scalar* b;  // [depth, cols], row stride ldb
  int64_t ldb;
};

namespace detail {

template <typename Scalar, int RB, int CB>
inline void dot_tile(const DotOperand<Scalar>* ops, int num_ops, int64_t depth_padded,
                     const Scalar* bias, Scalar* c, int64_t ldc) {
  using S = Simd<Scalar>;
  typename S::Vec acc[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CB; ++j) acc[r][j] = S::zero();
  for (int p = 0; p < num_ops; ++p) {
    const Scalar* a = ops[p].a;
    const Scalar* b = ops[p].b;
    for (int64_t i = 0; i < depth_padded; i += S::kLanes) {
      typename S::Vec bv[CB];
      for (int j = 0; j < CB; ++j) bv[j] = S::load(b + j * ops[p].ldb + i);
      for (int r = 0; r < RB; ++r) {
        const typename S::Vec av = S::load(a + r * ops[p].lda + i);
        for (int j = 0; j < CB; ++j) acc[r][j] += av * bv[j];
      }
    }
  }
  // Horizontal sums: kLanes accumulators at a time in one transposed pass (S::sum_each; a
  // partial group is padded with zero vectors, whose shuffles the compiler folds away),
  // put back in row-major order by one permutation. When whole rows fit a group, the bias
  // is added as a vector and each row's CB outputs are stored together; otherwise they
  // are scattered. (The loops are unrolled so every index is a compile-time constant.)
  constexpr int kCount = RB * CB;
  if constexpr (kCount == 1) {
    c[0] = S::sum(acc[0][0]) + (bias ? bias[0] : Scalar(0));
  } else {
    constexpr int kGroups = (kCount + S::kLanes - 1) / S::kLanes;
    constexpr bool kWholeRows = S::kLanes % CB == 0;
    typename S::Vec bias_v = S::zero();
    if (kWholeRows && bias) {
      Scalar pattern[S::kLanes];
      for (int lane = 0; lane < S::kLanes; ++lane) pattern[lane] = bias[lane % CB];
      bias_v = S::load(pattern);
    }
    typename S::Vec all[kGroups * S::kLanes];
#pragma GCC unroll 64
    for (int a = 0; a < kGroups * S::kLanes; ++a)
      all[a] = a < kCount ? acc[a / CB][a % CB] : S::zero();
#pragma GCC unroll 4
    for (int g = 0; g < kGroups; ++g) {
      Scalar sums[S::kLanes];
      S::store(sums, S::unreverse(S::sum_each(all + g * S::kLanes)) + bias_v);
      if constexpr (kWholeRows) {
        constexpr int kRowsPerGroup = S::kLanes / CB;
#pragma GCC unroll 16
        for (int r = 0; r < kRowsPerGroup; ++r)
          if (g * kRowsPerGroup + r < RB)
            std::memcpy(c + (g * kRowsPerGroup + r) * ldc, sums + r * CB, sizeof(Scalar) * CB);
      } else {
#pragma GCC unroll 64
        for (int lane = 0; lane < S::kLanes; ++lane) {
          const int a = g * S::kLanes + lane;
          if (a < kCount)
            c[(a / CB) * ldc + a % CB] = sums[lane] + (bias ? bias[a % CB] : Scalar(0));
        }
      }
    }
  }
}

template <typename Scalar, int RB, int CB>
inline void axpy_tile(const AxpyOperand<Scalar>* ops, int num_ops, int64_t depth,
                      Scalar scale, const Scalar* addend, int64_t ld_addend, Scalar* c,
                      int64_t ldc, bool relu) {
  using S = Simd<Scalar>;
  typename S::Vec acc[RB][CB];
  for (int r = 0; r < RB; ++r)
    for (int j = 0; j < CB; ++j) acc[r][j] = S::zero();
  for (int p = 0; p < num_ops; ++p) {
    const AxpyOperand<Scalar>& op = ops[p];
    for (int64_t k = 0; k < depth; ++k) {
      typename S::Vec bv[CB];
      const Scalar* brow = op.b + k * op.ldb;
      for (int j = 0; j < CB; ++j) bv[j] = S::load(brow + j * S::kLanes);
      const Scalar* acol = op.a + k * op.a_depth;
      for (int r = 0; r < RB; ++r) {
        const typename S::Vec av = S::broadcast(acol[r * op.a_row]);
        for (int j = 0; j < CB; ++j) acc[r][j] += av * bv[j];
      }
    }
  }
  const typename S::Vec factor = S::broadcast(scale);
  for (int r = 0; r < RB; ++r) {
    for (int j = 0; j < CB; ++j) {
      typename S::Vec v = acc[r][j] * factor;
      if (addend) v += S::load(addend + r * ld_addend + j * S::kLanes);
      // (written so that a NaN passes, as torch's relu lets it: a NaN loss must not turn
      // finite; one max instruction)
      if (relu) v = v < S::zero() ? S::zero() : v;
      S::store(c + r * ldc + j * S::kLanes, v);
    }
  }
}

// Calls Tile<RB, CB> with the run-time tile size (rb, cb) <= (MaxRows, MaxCols).
template <template <int, int> class Tile, int MaxCols, int RB>
struct TileSwitch {
  template <typename... Args>
  static inline void run(int rb, int cb, Args&&... args) {
    if (rb == RB) return dispatch_cols<MaxCols>(cb, args...);
    if constexpr (RB > 1) TileSwitch<Tile, MaxCols, RB - 1>::run(rb, cb, args...);
  }
  template <int CB, typename... Args>
  static inline void dispatch_cols(int cb, Args&&... args) {
    if (cb == CB) return Tile<RB, CB>::run(args...);
    if constexpr (CB > 1) dispatch_cols<CB - 1>(cb, args...);
  }
};

template <typename Scalar>
struct DotTile {
  template <int RB, int CB>
  struct Of {
    static inline void run(const DotOperand<Scalar>* ops, int num_ops, int64_t depth_padded,
                           const Scalar* bias, Scalar* c, int64_t ldc) {
      dot_tile<Scalar, RB, CB>(ops, num_ops, depth_padded, bias, c, ldc);
    }
  };
};

template <typename Scalar>
struct AxpyTile {
  template <int RB, int CB>
  struct Of {
    static inline void run(const AxpyOperand<Scalar>* ops, int num_ops, int64_t depth,
                           Scalar scale, const Scalar* addend, int64_t ld_addend, Scalar* c,
                           int64_t ldc, bool relu) {
      axpy_tile<Scalar, RB, CB>(ops, num_ops, depth, scale, addend, ld_addend, c, ldc, relu);
    }
  };
};

}  // namespace detail

// C[r, c] = bias[c] + sum_p sum_i A_p[r, i] B_p[c, i] for r < rows, c < cols (C's padding
// columns are left alone). depth is the true inner width, depth_padded its padded width.
template <typename Scalar>
void gemm_dot(int64_t rows, int64_t cols, int64_t depth, int64_t depth_padded,
              const DotOperand<Scalar>* ops, int num_ops, const Scalar* bias, Scalar* c,
              int64_t ldc) {
  if (depth <= 2) {
    // A reduction over one or two numbers wastes a whole vector and its horizontal sum:
    // run along the outputs instead. (The passes send such shallow products to the axpy
    // form over W^T, see LayerLayout; this keeps the dot form right for any depth.)
    for (int64_t r = 0; r < rows; ++r) {
      Scalar* __restrict crow = c + r * ldc;
      for (int64_t o = 0; o < cols; ++o) crow[o] = bias ? bias[o] : Scalar(0);
      for (int p = 0; p < num_ops; ++p) {
        const Scalar* __restrict arow = ops[p].a + r * ops[p].lda;
        const Scalar* __restrict b = ops[p].b;
        const int64_t ldb = ops[p].ldb;
        for (int64_t i = 0; i < depth; ++i) {
          const Scalar ai = arow[i];
#pragma omp simd
          for (int64_t o = 0; o < cols; ++o) crow[o] += ai * b[o * ldb + i];
        }
      }
    }
    return;
  }
  using Switch = detail::TileSwitch<detail::DotTile<Scalar>::template Of, kDotCols, kDotRows>;
  DotOperand<Scalar> shifted[2];
  // Output-column tiles outermost: each tile's rows of B stay in L1 while every row of A
  // streams past them.
  for (int64_t c0 = 0; c0 < cols; c0 += kDotCols) {
    const int cb = static_cast<int>(std::min<int64_t>(kDotCols, cols - c0));
    for (int64_t r0 = 0; r0 < rows; r0 += kDotRows) {
      const int rb = static_cast<int>(std::min<int64_t>(kDotRows, rows - r0));
      for (int p = 0; p < num_ops; ++p) {
        shifted[p] = {ops[p].a + r0 * ops[p].lda, ops[p].lda, ops[p].b + c0 * ops[p].ldb,
                      ops[p].ldb};
      }
      Switch::run(rb, cb, shifted, num_ops, depth_padded, bias ? bias + c0 : nullptr,
                  c + r0 * ldc + c0, ldc);
    }
  }
}

// C[r, :] = addend[r, :] + scale * sum_p sum_k a_p(r, k) B_p[k, :] over cols_padded
// columns (a multiple of the vector width). addend may be null (nothing added), C itself
// (accumulate), another matrix (C = addend - lr * gradient: an SGD step), or a single row
// repeated with ld_addend = 0 (a bias). relu: C = max(C, 0) (a forward pass's ReLU, fused
// into the write). The register tile is at most MaxRows x TileCols vectors and uses at most
// Accumulators registers (defaults above; a caller with a known shape may pick a larger one,
// e.g. the conv engine's weight gradients).
template <typename Scalar, int MaxRows = kAxpyMaxRows, int TileCols = kAxpyCols,
          int Accumulators = kAxpyAccumulators>
void gemm_axpy(int64_t rows, int64_t cols_padded, int64_t depth, const AxpyOperand<Scalar>* ops,
               int num_ops, Scalar scale, const Scalar* addend, int64_t ld_addend, Scalar* c,
               int64_t ldc, bool relu = false) {
  using S = Simd<Scalar>;
  using Switch = detail::TileSwitch<detail::AxpyTile<Scalar>::template Of, TileCols, MaxRows>;
  const int64_t col_vectors = cols_padded / S::kLanes;
  AxpyOperand<Scalar> shifted[2];
  // Column panels outermost: the panel of every B (depth x a few vectors) stays in L1
  // while the row tiles of A pass over it.
  for (int64_t v0 = 0; v0 < col_vectors; v0 += TileCols) {
    const int cb = static_cast<int>(std::min<int64_t>(TileCols, col_vectors - v0));
    const int64_t tile_rows = std::min<int64_t>(MaxRows, Accumulators / cb);
    for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
      const int rb = static_cast<int>(std::min<int64_t>(tile_rows, rows - r0));
      for (int p = 0; p < num_ops; ++p) {
        shifted[p] = {ops[p].a + r0 * ops[p].a_row, ops[p].a_row, ops[p].a_depth,
                      ops[p].b + v0 * S::kLanes, ops[p].ldb};
      }
      const Scalar* add = addend ? addend + r0 * ld_addend + v0 * S::kLanes : nullptr;
      Switch::run(rb, cb, shifted, num_ops, depth, scale, add, ld_addend,
                  c + r0 * ldc + v0 * S::kLanes, ldc, relu);
    }
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
