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
#include <limits>
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
// im2col: row r = (n, i, j) of col holds the 3x3 neighbourhood of pixel (i, j) of sample n,
// as (kh, kw, c) with zeros outside the image, then zeros up to k_pad. Built for a range of
// rows [r0, r1) at a time (col points at row r0's), so the products take it in pieces
// that stay in cache instead of a matrix nine times the size of the map.
// ---------------------------------------------------------------------------------------------
template <typename Scalar>
void im2col(const ConvBlockLayout& b, const Scalar* x, int64_t r0, int64_t r1, Scalar* col) {
  const int64_t c = b.in_ch;
  int64_t j = r0 % b.w, i = (r0 / b.w) % b.h, n = r0 / (b.w * b.h);
  for (int64_t r = r0; r < r1; ++r) {
    Scalar* row = col + (r - r0) * b.k_pad;
    const bool inner = j >= 1 && j + 1 < b.w;  // the three taps of a kernel row are adjacent
    for (int64_t kh = 0; kh < 3; ++kh) {
      const int64_t ii = i + kh - 1;
      const bool row_in = ii >= 0 && ii < b.h;
      if (inner) {
        Scalar* dst = row + kh * 3 * c;
        if (row_in) {
          const Scalar* src = x + ((n * b.h + ii) * b.w + j - 1) * c;
#pragma omp simd
          for (int64_t k = 0; k < 3 * c; ++k) dst[k] = src[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < 3 * c; ++k) dst[k] = Scalar(0);
        }
        continue;
      }
      for (int64_t kw = 0; kw < 3; ++kw) {
        const int64_t jj = j + kw - 1;
        Scalar* dst = row + (kh * 3 + kw) * c;
        if (row_in && jj >= 0 && jj < b.w) {
          const Scalar* src = x + ((n * b.h + ii) * b.w + jj) * c;
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) dst[k] = src[k];
        } else {
#pragma omp simd
          for (int64_t k = 0; k < c; ++k) dst[k] = Scalar(0);
        }
      }
    }
    for (int64_t k = b.k; k < b.k_pad; ++k) row[k] = Scalar(0);
    if (++j == b.w) {
      j = 0;
      if (++i == b.h) {
        i = 0;
        ++n;
      }
    }
  }
}

// The adjoint of im2col for rows [r0, r1): dx[n, i, j, :] += every col entry that copied
// it (dx is zeroed by the caller before the first range).
template <typename Scalar>
void col2im(const ConvBlockLayout& b, const Scalar* col, int64_t r0, int64_t r1, Scalar* dx) {
  const int64_t c = b.in_ch;
  int64_t j = r0 % b.w, i = (r0 / b.w) % b.h, n = r0 / (b.w * b.h);
  for (int64_t r = r0; r < r1; ++r) {
    const Scalar* row = col + (r - r0) * b.k_pad;
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
    if (++j == b.w) {
      j = 0;
      if (++i == b.h) {
        i = 0;
        ++n;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Batch norm. z and xhat may alias (normalised in place).
// ---------------------------------------------------------------------------------------------
// Running per-channel moments of a map produced piece by piece (the convolution's output,
// kColRows rows at a time): each piece's mean and centred sum of squares, taken while the
// piece is still in cache, merged in order (Chan et al.'s pairwise update: as accurate as a
// two-pass variance, and no pass over the whole map).
template <typename Scalar>
struct Moments {
  int64_t count = 0;
  Scalar* mean = nullptr;  // [ch]
  Scalar* m2 = nullptr;    // [ch]: sum of squared deviations from the mean

  void add(int64_t rows, int64_t ch, const Scalar* z, Scalar* piece_mean, Scalar* piece_m2) {
    const Scalar inv = Scalar(1) / Scalar(rows);
    for (int64_t c = 0; c < ch; ++c) piece_mean[c] = piece_m2[c] = 0;
    for (int64_t r = 0; r < rows; ++r) {
      const Scalar* zr = z + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) piece_mean[c] += zr[c];
    }
    for (int64_t c = 0; c < ch; ++c) piece_mean[c] *= inv;
    for (int64_t r = 0; r < rows; ++r) {
      const Scalar* zr = z + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) {
        const Scalar d = zr[c] - piece_mean[c];
        piece_m2[c] += d * d;
      }
    }
    if (count == 0) {
      for (int64_t c = 0; c < ch; ++c) {
        mean[c] = piece_mean[c];
        m2[c] = piece_m2[c];
      }
    } else {
      const Scalar total = Scalar(count + rows);
      const Scalar wb = Scalar(rows) / total, wab = Scalar(count) * Scalar(rows) / total;
      for (int64_t c = 0; c < ch; ++c) {
        const Scalar delta = piece_mean[c] - mean[c];
        mean[c] += delta * wb;
        m2[c] += piece_m2[c] + delta * delta * wab;
      }
    }
    count += rows;
  }
};

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
// Batch norm's normalisation, ReLU and max-pool 2x2, fused. Maps are [samples, h, w, ch];
// pooled: [samples, ph, pw, ch]; arg: the window position (0..3, row-major) of each pooled
// value's first maximum of y = gamma xhat + beta. y itself is never stored: the ReLU
// passes a window's value exactly when its pooled value is positive, so the backward
// passes route by `pooled > 0`.
// ---------------------------------------------------------------------------------------------
namespace detail {
// Offset (in pixels) of window position a's pixel from the window's top-left one.
inline int64_t window_offset(int a, int64_t w) { return (a >> 1) * w + (a & 1); }
}  // namespace detail

// z (the convolution's output, normalised in place into xhat; its moments gathered while
// it was produced) -> arg, pooled, and routed (the xhat each pooled value came from, for
// the backward's sums); s gets the batch-norm scale.
template <typename Scalar>
void bn_relu_pool_forward(const ConvBlockLayout& b, int64_t samples, Scalar eps,
                          const Moments<Scalar>& moments, Scalar* xhat, const Scalar* gamma,
                          const Scalar* beta, Scalar* s, uint8_t* arg, Scalar* pooled,
                          Scalar* routed) {
  const int64_t ch = b.ch, rows = samples * b.h * b.w;
  std::vector<Scalar> inv_s(ch);
  for (int64_t c = 0; c < ch; ++c) {
    s[c] = std::sqrt(moments.m2[c] / Scalar(rows) + eps);
    // An overflowed variance would normalise to zeros, a finite loss from garbage: NaN
    // instead, which the loss reports (see the NaN-passing max below).
    inv_s[c] = std::isfinite(s[c]) ? Scalar(1) / s[c] : std::numeric_limits<Scalar>::quiet_NaN();
  }
  const Scalar* m = moments.mean;
  const Scalar* is = inv_s.data();
  const auto normalise = [&](Scalar* px) {
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) px[c] = (px[c] - m[c]) * is[c];
  };
  for (int64_t n = 0; n < samples; ++n) {
    Scalar* map = xhat + n * b.h * b.w * ch;
    for (int64_t i = 0; i < b.ph; ++i) {
      for (int64_t j = 0; j < b.pw; ++j) {
        Scalar* corner = map + (2 * i * b.w + 2 * j) * ch;
        Scalar* p[4];
        for (int a = 0; a < 4; ++a) {
          p[a] = corner + detail::window_offset(a, b.w) * ch;
          normalise(p[a]);
        }
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) {
          Scalar best = gamma[c] * p[0][c] + beta[c], best_x = p[0][c];
          uint8_t where = 0;
          for (int a = 1; a < 4; ++a) {
            const Scalar y = gamma[c] * p[a][c] + beta[c];
            if (y > best || y != y) {  // (a NaN wins and stays: see below)
              best = y;
              best_x = p[a][c];
              where = static_cast<uint8_t>(a);
            }
          }
          arg[out + c] = where;
          // A NaN passes the max and the ReLU (as in torch): a NaN loss must not turn finite.
          pooled[out + c] = best < Scalar(0) ? Scalar(0) : best;
          routed[out + c] = best_x;
        }
      }
      if (b.w & 1) {  // the odd last column: normalised, never pooled
        normalise(map + (2 * i * b.w + b.w - 1) * ch);
        normalise(map + ((2 * i + 1) * b.w + b.w - 1) * ch);
      }
    }
    if (b.h & 1)  // the odd last row
      for (int64_t j = 0; j < b.w; ++j) normalise(map + ((b.h - 1) * b.w + j) * ch);
  }
}

// R{pooled} from R{y}: the same routes (picked branch-free from the window's four pixels).
template <typename Scalar>
void relu_pool_r_forward(const ConvBlockLayout& b, int64_t samples, const Scalar* pooled,
                         const uint8_t* arg, const Scalar* ry, Scalar* rpooled) {
  const int64_t ch = b.ch;
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.ph; ++i)
      for (int64_t j = 0; j < b.pw; ++j) {
        const Scalar* r0 = ry + ((n * b.h + 2 * i) * b.w + 2 * j) * ch;
        const Scalar* r1 = r0 + ch;
        const Scalar* r2 = r0 + b.w * ch;
        const Scalar* r3 = r2 + ch;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        const Scalar* pl = pooled + out;
        const uint8_t* ar = arg + out;
        Scalar* rp = rpooled + out;
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) {
          const int a = ar[c];
          const Scalar v = a == 0 ? r0[c] : a == 1 ? r1[c] : a == 2 ? r2[c] : r3[c];
          rp[c] = pl[c] > Scalar(0) ? v : Scalar(0);
        }
      }
}

// dy from d(pooled) (also R{dy} from R{d(pooled)}: the routes are the same): each pooled
// gradient goes to its arg-max when the pooled value is positive; every other entry is zero.
// Written window by window (every pixel once), then the pixels no window covers.
template <typename Scalar>
void relu_pool_backward(const ConvBlockLayout& b, int64_t samples, const Scalar* pooled,
                        const uint8_t* arg, const Scalar* dpooled, Scalar* dy) {
  const int64_t ch = b.ch;
  for (int64_t n = 0; n < samples; ++n) {
    for (int64_t i = 0; i < b.ph; ++i) {
      for (int64_t j = 0; j < b.pw; ++j) {
        const int64_t corner = (n * b.h + 2 * i) * b.w + 2 * j;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        const Scalar* pl = pooled + out;
        const Scalar* dp = dpooled + out;
        const uint8_t* ar = arg + out;
        for (int a = 0; a < 4; ++a) {
          Scalar* d = dy + (corner + detail::window_offset(a, b.w)) * ch;
#pragma omp simd
          for (int64_t c = 0; c < ch; ++c)
            d[c] = ar[c] == a && pl[c] > Scalar(0) ? dp[c] : Scalar(0);
        }
      }
      if (b.w & 1) {
        std::memset(dy + ((n * b.h + 2 * i) * b.w + b.w - 1) * ch, 0, sizeof(Scalar) * ch);
        std::memset(dy + ((n * b.h + 2 * i + 1) * b.w + b.w - 1) * ch, 0, sizeof(Scalar) * ch);
      }
    }
    if (b.h & 1) std::memset(dy + (n * b.h + b.h - 1) * b.w * ch, 0, sizeof(Scalar) * b.w * ch);
  }
}

// relu_pool_backward then bn_backward, fused, when dy itself is not needed afterwards:
// dz = (g / s) (dy - m(dy) - xhat m(dy xhat)) with dy nonzero only at the routes, so the
// two means are sums over the pooled values, and dz is written in one pass.
template <typename Scalar>
void pool_bn_backward(const ConvBlockLayout& b, int64_t samples, const Scalar* pooled,
                      const uint8_t* arg, const Scalar* dpooled, const Scalar* routed,
                      const Scalar* xhat,
                      const Scalar* s, const Scalar* gamma, Scalar* dz, Scalar* grad_gamma,
                      Scalar* grad_beta) {
  const int64_t ch = b.ch, rows = samples * b.h * b.w;
  const Scalar inv_rows = Scalar(1) / Scalar(rows);
  std::vector<Scalar> sum_dy(ch, Scalar(0)), sum_dyx(ch, Scalar(0)), part(ch), partx(ch),
      scale(ch), base(ch);
  // Per-row-of-windows partial sums, added in order (pooled-sized arrays only).
  for (int64_t n = 0; n < samples; ++n)
    for (int64_t i = 0; i < b.ph; ++i) {
      Scalar* pt = part.data();
      Scalar* px = partx.data();
      for (int64_t c = 0; c < ch; ++c) pt[c] = px[c] = 0;
      for (int64_t j = 0; j < b.pw; ++j) {
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        const Scalar* pl = pooled + out;
        const Scalar* dp = dpooled + out;
        const Scalar* xr = routed + out;
#pragma omp simd
        for (int64_t c = 0; c < ch; ++c) {
          const Scalar d = pl[c] > Scalar(0) ? dp[c] : Scalar(0);
          pt[c] += d;
          px[c] += d * xr[c];
        }
      }
      for (int64_t c = 0; c < ch; ++c) {
        sum_dy[c] += pt[c];
        sum_dyx[c] += px[c];
      }
    }
  for (int64_t c = 0; c < ch; ++c) {
    if (grad_gamma) grad_gamma[c] = sum_dyx[c];
    if (grad_beta) grad_beta[c] = sum_dy[c];
    scale[c] = gamma[c] / s[c];
    base[c] = sum_dy[c] * inv_rows;
    sum_dyx[c] *= inv_rows;
  }
  const Scalar *sc = scale.data(), *bs = base.data(), *mx = sum_dyx.data();
  // dz = -(g/s) (m(dy) + xhat m(dy xhat)) everywhere, plus (g/s) dy on the routes: window
  // by window, then the pixels no window covers (an odd last row or column).
  const auto dense = [&](int64_t pixel) {
    const Scalar* xr = xhat + pixel * ch;
    Scalar* dzr = dz + pixel * ch;
#pragma omp simd
    for (int64_t c = 0; c < ch; ++c) dzr[c] = -sc[c] * (bs[c] + xr[c] * mx[c]);
  };
  for (int64_t n = 0; n < samples; ++n) {
    for (int64_t i = 0; i < b.ph; ++i) {
      for (int64_t j = 0; j < b.pw; ++j) {
        const int64_t corner = (n * b.h + 2 * i) * b.w + 2 * j;
        const int64_t out = ((n * b.ph + i) * b.pw + j) * ch;
        const Scalar* pl = pooled + out;
        const Scalar* dp = dpooled + out;
        const uint8_t* ar = arg + out;
        for (int a = 0; a < 4; ++a) {
          const int64_t pixel = corner + detail::window_offset(a, b.w);
          const Scalar* xr = xhat + pixel * ch;
          Scalar* dzr = dz + pixel * ch;
#pragma omp simd
          for (int64_t c = 0; c < ch; ++c) {
            const Scalar v = -sc[c] * (bs[c] + xr[c] * mx[c]);
            dzr[c] = ar[c] == a && pl[c] > Scalar(0) ? v + sc[c] * dp[c] : v;
          }
        }
      }
      if (b.w & 1) {
        dense((n * b.h + 2 * i) * b.w + b.w - 1);
        dense((n * b.h + 2 * i + 1) * b.w + b.w - 1);
      }
    }
    if (b.h & 1)
      for (int64_t j = 0; j < b.w; ++j) dense((n * b.h + b.h - 1) * b.w + j);
  }
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
