// The conv engine's memory-bound layers on channels-last maps ([rows, C], one row per
// pixel of every sample): im2col and its adjoint, batch norm with batch statistics and
// max-pooling fused with the ReLU before it; each with its backward and its R-operator
// (directional derivative along a parameter direction u; see design/ENGINE.md).
//
// Batch norm, per channel over the M rows (m(.) is the mean over rows):
//   forward     xhat = (z - m(z)) / s,  s = sqrt(m((z - m(z))^2) + eps),  y = g xhat + b
//   backward    dz = (g / s) I,  I = dy - m(dy) - xhat m(dy xhat)
//               grad g = sum dy xhat,  grad b = sum dy
//   R-forward   R{s} = m(xhat R{z}),  R{xhat} = (R{z} - m(R{z}) - xhat R{s}) / s
//               R{y} = g R{xhat} + u_g xhat + u_b
//   R-backward  R{I} = R{dy} - m(R{dy}) - R{xhat} m(dy xhat) - xhat m(R{dy} xhat + dy R{xhat})
//               R{dz} = (u_g / s - g R{s} / s^2) I + (g / s) R{I}
//               (H u)_g = sum (R{dy} xhat + dy R{xhat}),  (H u)_b = sum R{dy}
//
// Max-pool 2x2 (floor) after ReLU equals ReLU after max-pool (both are monotone), so the
// engine pools the batch-norm output y and keeps the arg-max: a value passes (and its
// gradient and R{.} flow back) only through the window's first maximum, and only when it
// is positive, exactly as torch's relu-then-pool routes them.
//
// Every loop runs in a fixed order: the results do not depend on the thread count.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "conv_layout.h"

namespace fastmeta {
namespace FASTMETA_ISA {

// sums[c] = sum_r a[r, c] * (b ? b[r, c] : 1) (+ the same with a2, b2 when a2 is given),
// summed in blocks of rows: a float32 sum over tens of thousands of pixels stays accurate.
template <typename Scalar>
void channel_sums(int64_t rows, int64_t ch, const Scalar* a, const Scalar* b, Scalar* sums,
                  const Scalar* a2 = nullptr, const Scalar* b2 = nullptr) {
  constexpr int64_t kBlock = 64;
  std::vector<Scalar> part(ch);
  for (int64_t c = 0; c < ch; ++c) sums[c] = 0;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    for (int64_t c = 0; c < ch; ++c) part[c] = 0;
    for (int64_t r = r0; r < r1; ++r) {
      const Scalar* ar = a + r * ch;
      const Scalar* br = b ? b + r * ch : nullptr;
      if (br) {
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) part[c] += ar[c] * br[c];
      } else {
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) part[c] += ar[c];
      }
      if (a2) {
        const Scalar* a2r = a2 + r * ch;
        const Scalar* b2r = b2 + r * ch;
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) part[c] += a2r[c] * b2r[c];
      }
    }
    for (int64_t c = 0; c < ch; ++c) sums[c] += part[c];
  }
}

// ---------------------------------------------------------------------------------------------
// im2col: row (n, i, j) of col holds the 3x3 neighbourhood of pixel (i, j) of sample n,
// as (kh, kw, c) with zeros outside the image, then zeros up to k_pad.
// ---------------------------------------------------------------------------------------------
template <typename Scalar>
void im2col(const ConvBlockLayout& b, int64_t samples, const Scalar* x, Scalar* col) {
  const int64_t c = b.in_ch;
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.h; ++i)
      for (int64_t j = 0; j < b.w; ++j) {
        Scalar* row = col + ((n * b.h + i) * b.w + j) * b.k_pad;
        for (int64_t kh = 0; kh < 3; ++kh) {
          const int64_t ii = i + kh - 1;
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t jj = j + kw - 1;
            Scalar* dst = row + (kh * 3 + kw) * c;
            if (ii < 0 || ii >= b.h || jj < 0 || jj >= b.w)
              std::memset(dst, 0, sizeof(Scalar) * c);
            else
              std::memcpy(dst, x + ((n * b.h + ii) * b.w + jj) * c, sizeof(Scalar) * c);
          }
        }
        std::memset(row + b.k, 0, sizeof(Scalar) * (b.k_pad - b.k));
      }
}

// The adjoint of im2col: dx[n, i, j, :] = sum of every col entry that copied it.
template <typename Scalar>
void col2im(const ConvBlockLayout& b, int64_t samples, const Scalar* col, Scalar* dx) {
  const int64_t c = b.in_ch;
  std::memset(dx, 0, sizeof(Scalar) * samples * b.h * b.w * c);
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.h; ++i)
      for (int64_t j = 0; j < b.w; ++j) {
        const Scalar* row = col + ((n * b.h + i) * b.w + j) * b.k_pad;
        for (int64_t kh = 0; kh < 3; ++kh) {
          const int64_t ii = i + kh - 1;
          if (ii < 0 || ii >= b.h) continue;
          for (int64_t kw = 0; kw < 3; ++kw) {
            const int64_t jj = j + kw - 1;
            if (jj < 0 || jj >= b.w) continue;
            const Scalar* src = row + (kh * 3 + kw) * c;
            Scalar* dst = dx + ((n * b.h + ii) * b.w + jj) * c;
#pragma omp simd
            for (int64_t k = 0; k < c; ++k) dst[k] += src[k];
          }
        }
      }
}

// ---------------------------------------------------------------------------------------------
// Batch norm. z and xhat may alias (normalised in place).
// ---------------------------------------------------------------------------------------------
template <typename Scalar>
void bn_forward(int64_t rows, int64_t ch, Scalar eps, const Scalar* z, const Scalar* gamma,
                const Scalar* beta, Scalar* xhat, Scalar* s, Scalar* y) {
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  std::vector<Scalar> mean(ch), var(ch);
  channel_sums(rows, ch, z, static_cast<const Scalar*>(nullptr), mean.data());
  for (int64_t c = 0; c < ch; ++c) mean[c] *= inv_rows;
  for (int64_t r = 0; r < rows; ++r) {  // centre first: the two-pass variance is exact
    const Scalar* zr = z + r * ch;
    Scalar* xr = xhat + r * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) xr[c] = zr[c] - mean[c];
  }
  channel_sums(rows, ch, static_cast<const Scalar*>(xhat), xhat, var.data());
  for (int64_t c = 0; c < ch; ++c) s[c] = std::sqrt(var[c] * inv_rows + eps);
  std::vector<Scalar> inv_s(ch);
  for (int64_t c = 0; c < ch; ++c) inv_s[c] = Scalar(1) / s[c];
  for (int64_t r = 0; r < rows; ++r) {
    Scalar* xr = xhat + r * ch;
    Scalar* yr = y + r * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) {
      xr[c] *= inv_s[c];
      yr[c] = gamma[c] * xr[c] + beta[c];
    }
  }
}

// dz from dy (they may alias); the affine gradients into grad_gamma / grad_beta when given.
template <typename Scalar>
void bn_backward(int64_t rows, int64_t ch, const Scalar* dy, const Scalar* xhat, const Scalar* s,
                 const Scalar* gamma, Scalar* dz, Scalar* grad_gamma, Scalar* grad_beta) {
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  std::vector<Scalar> sum_dy(ch), sum_dyx(ch), scale(ch);
  channel_sums(rows, ch, dy, static_cast<const Scalar*>(nullptr), sum_dy.data());
  channel_sums(rows, ch, dy, xhat, sum_dyx.data());
  for (int64_t c = 0; c < ch; ++c) {
    if (grad_gamma) grad_gamma[c] = sum_dyx[c];
    if (grad_beta) grad_beta[c] = sum_dy[c];
    sum_dy[c] *= inv_rows;
    sum_dyx[c] *= inv_rows;
    scale[c] = gamma[c] / s[c];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar* dyr = dy + r * ch;
    const Scalar* xr = xhat + r * ch;
    Scalar* dzr = dz + r * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) dzr[c] = scale[c] * (dyr[c] - sum_dy[c] - xr[c] * sum_dyx[c]);
  }
}

// R{xhat} (in place over R{z}), R{s} and R{y}.
template <typename Scalar>
void bn_r_forward(int64_t rows, int64_t ch, const Scalar* xhat, const Scalar* s,
                  const Scalar* gamma, const Scalar* u_gamma, const Scalar* u_beta, Scalar* rxhat,
                  Scalar* rs, Scalar* ry) {
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  std::vector<Scalar> mean_rz(ch), inv_s(ch);
  channel_sums(rows, ch, static_cast<const Scalar*>(rxhat), static_cast<const Scalar*>(nullptr),
               mean_rz.data());
  channel_sums(rows, ch, xhat, static_cast<const Scalar*>(rxhat), rs);
  for (int64_t c = 0; c < ch; ++c) {
    mean_rz[c] *= inv_rows;
    rs[c] *= inv_rows;
    inv_s[c] = Scalar(1) / s[c];
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar* xr = xhat + r * ch;
    Scalar* rxr = rxhat + r * ch;
    Scalar* ryr = ry + r * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) {
      rxr[c] = (rxr[c] - mean_rz[c] - xr[c] * rs[c]) * inv_s[c];
      ryr[c] = gamma[c] * rxr[c] + u_gamma[c] * xr[c] + u_beta[c];
    }
  }
}

// R{dz}; (H u) of gamma and beta into hu_gamma / hu_beta.
template <typename Scalar>
void bn_r_backward(int64_t rows, int64_t ch, const Scalar* dy, const Scalar* rdy,
                   const Scalar* xhat, const Scalar* rxhat, const Scalar* s, const Scalar* rs,
                   const Scalar* gamma, const Scalar* u_gamma, Scalar* rdz, Scalar* hu_gamma,
                   Scalar* hu_beta) {
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  std::vector<Scalar> m_dy(ch), m_dyx(ch), m_rdy(ch), m_rdyx(ch), a(ch), bcoef(ch);
  channel_sums(rows, ch, dy, static_cast<const Scalar*>(nullptr), m_dy.data());
  channel_sums(rows, ch, dy, xhat, m_dyx.data());
  channel_sums(rows, ch, rdy, static_cast<const Scalar*>(nullptr), m_rdy.data());
  channel_sums(rows, ch, rdy, xhat, m_rdyx.data(), dy, rxhat);
  for (int64_t c = 0; c < ch; ++c) {
    hu_gamma[c] = m_rdyx[c];
    hu_beta[c] = m_rdy[c];
    m_dy[c] *= inv_rows;
    m_dyx[c] *= inv_rows;
    m_rdy[c] *= inv_rows;
    m_rdyx[c] *= inv_rows;
    a[c] = u_gamma[c] / s[c] - gamma[c] * rs[c] / (s[c] * s[c]);  // multiplies I
    bcoef[c] = gamma[c] / s[c];                                    // multiplies R{I}
  }
  for (int64_t r = 0; r < rows; ++r) {
    const Scalar* dyr = dy + r * ch;
    const Scalar* rdyr = rdy + r * ch;
    const Scalar* xr = xhat + r * ch;
    const Scalar* rxr = rxhat + r * ch;
    Scalar* out = rdz + r * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) {
      const Scalar i_val = dyr[c] - m_dy[c] - xr[c] * m_dyx[c];
      const Scalar ri = rdyr[c] - m_rdy[c] - rxr[c] * m_dyx[c] - xr[c] * m_rdyx[c];
      out[c] = a[c] * i_val + bcoef[c] * ri;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// ReLU + max-pool 2x2. y: [samples, h, w, ch]; pooled: [samples, ph, pw, ch]; arg: the
// window position (0..3, row-major) of each pooled value's first maximum.
// ---------------------------------------------------------------------------------------------
namespace detail {
// Offset (in pixels) of window position a's pixel from the window's top-left one.
inline int64_t window_offset(int a, int64_t w) { return (a >> 1) * w + (a & 1); }
}  // namespace detail

template <typename Scalar>
void relu_pool_forward(const ConvBlockLayout& b, int64_t samples, const Scalar* y, uint8_t* arg,
                       Scalar* pooled) {
  const int64_t ch = b.ch;
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.ph; ++i)
      for (int64_t j = 0; j < b.pw; ++j) {
        const Scalar* corner = y + ((n * b.h + 2 * i) * b.w + 2 * j) * ch;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        const Scalar* p[4];
        for (int a = 0; a < 4; ++a) p[a] = corner + detail::window_offset(a, b.w) * ch;
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) {
          Scalar best = p[0][c];
          uint8_t where = 0;
          for (int a = 1; a < 4; ++a)
            if (p[a][c] > best) {
              best = p[a][c];
              where = static_cast<uint8_t>(a);
            }
          arg[out + c] = where;
          pooled[out + c] = best > Scalar(0) ? best : Scalar(0);
        }
      }
}

// R{pooled} from R{y}: the same routes.
template <typename Scalar>
void relu_pool_r_forward(const ConvBlockLayout& b, int64_t samples, const Scalar* y,
                         const uint8_t* arg, const Scalar* ry, Scalar* rpooled) {
  const int64_t ch = b.ch;
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.ph; ++i)
      for (int64_t j = 0; j < b.pw; ++j) {
        const int64_t corner = ((n * b.h + 2 * i) * b.w + 2 * j) * ch;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        for (int64_t c = 0; c < ch; ++c) {
          const int64_t at = corner + detail::window_offset(arg[out + c], b.w) * ch + c;
          rpooled[out + c] = y[at] > Scalar(0) ? ry[at] : Scalar(0);
        }
      }
}

// dy from d(pooled) (also R{dy} from R{d(pooled)}: the routes are the same): each pooled
// gradient goes to its arg-max when that value is positive; every other entry is zero.
template <typename Scalar>
void relu_pool_backward(const ConvBlockLayout& b, int64_t samples, const Scalar* y,
                        const uint8_t* arg, const Scalar* dpooled, Scalar* dy) {
  const int64_t ch = b.ch;
  std::memset(dy, 0, sizeof(Scalar) * samples * b.h * b.w * ch);
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.ph; ++i)
      for (int64_t j = 0; j < b.pw; ++j) {
        const int64_t corner = ((n * b.h + 2 * i) * b.w + 2 * j) * ch;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        for (int64_t c = 0; c < ch; ++c) {
          const int64_t at = corner + detail::window_offset(arg[out + c], b.w) * ch + c;
          dy[at] = y[at] > Scalar(0) ? dpooled[out + c] : Scalar(0);
        }
      }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
