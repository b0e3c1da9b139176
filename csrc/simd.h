// A minimal fixed-width vector type for the engine's kernels.
//
// The engine is compiled once per instruction set (see CMakeLists.txt and
// mlp_dispatch.cpp); each build gets its own namespace, FASTMETA_ISA, so the
// inline code in these headers never collides across builds (the linker would
// otherwise keep one copy and could run AVX-512 code on a machine without it).
#pragma once
#include <cstdint>
#include <cstring>

#ifndef FASTMETA_ISA
#define FASTMETA_ISA generic
#endif

#if !defined(__GNUC__)
#error "fastmeta's engine uses GCC/Clang vector extensions; build with GCC or Clang"
#endif

namespace fastmeta {
namespace FASTMETA_ISA {

#if defined(__AVX512F__)
constexpr int kVectorBytes = 64;
#elif defined(__AVX__)
constexpr int kVectorBytes = 32;
#else
constexpr int kVectorBytes = 16;  // SSE2 / NEON, or scalar code the compiler splits up
#endif

template <typename Scalar>
struct Simd;

// One vector of kLanes scalars. Loads and stores are unaligned (memcpy compiles to a
// single unaligned move): rows of the engine's matrices start wherever they start.
#define FASTMETA_DEFINE_SIMD(Scalar)                                                    \
  template <>                                                                           \
  struct Simd<Scalar> {                                                                 \
    typedef Scalar Vec __attribute__((vector_size(kVectorBytes)));                      \
    static constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(Scalar));      \
    static inline Vec load(const Scalar* p) {                                           \
      Vec v;                                                                            \
      std::memcpy(&v, p, sizeof v);                                                     \
      return v;                                                                         \
    }                                                                                   \
    static inline void store(Scalar* p, Vec v) { std::memcpy(p, &v, sizeof v); }        \
    static inline Vec zero() { return Vec{}; }                                          \
    static inline Vec broadcast(Scalar s) { return Vec{} + s; }                         \
    static inline Scalar sum(Vec v) { return reduce_add(v); }                           \
  };

// Horizontal sum: add the two halves until one 16-byte vector is left (memcpy of a half
// compiles to a register extract), then finish in scalars.
template <typename Scalar, int Bytes>
inline Scalar reduce_add(Scalar __attribute__((vector_size(Bytes))) v) {
  if constexpr (Bytes > 16) {
    typedef Scalar Half __attribute__((vector_size(Bytes / 2)));
    Half lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
    return reduce_add<Scalar, Bytes / 2>(lo + hi);
  } else if constexpr (sizeof(Scalar) == 4) {
    return (v[0] + v[2]) + (v[1] + v[3]);
  } else {
    return v[0] + v[1];
  }
}

inline float reduce_add(float __attribute__((vector_size(kVectorBytes))) v) {
  return reduce_add<float, kVectorBytes>(v);
}
inline double reduce_add(double __attribute__((vector_size(kVectorBytes))) v) {
  return reduce_add<double, kVectorBytes>(v);
}

FASTMETA_DEFINE_SIMD(float)
FASTMETA_DEFINE_SIMD(double)
#undef FASTMETA_DEFINE_SIMD

// Rounds a row width up to whole vectors: every activation and weight row is padded
// with zeros to this width so the kernels never need a scalar tail.
template <typename Scalar>
constexpr int64_t padded_width(int64_t width) {
  constexpr int64_t lanes = Simd<Scalar>::kLanes;
  return (width + lanes - 1) / lanes * lanes;
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
