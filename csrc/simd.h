// A minimal fixed-width vector type for the engine's kernels (GCC/Clang vector
// extensions: the compiler picks the instructions for the target ISA).
//
// The engine is compiled once per instruction set (see CMakeLists.txt and
// mlp_dispatch.cpp); each build gets its own namespace, FASTMETA_ISA, so the
// inline code in these headers never collides across builds (the linker would
// otherwise keep one copy and could run AVX-512 code on a machine without it).
#pragma once
#include <cstdint>
#include <cstring>
#include <utility>

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

// Lane shuffles: __builtin_shufflevector (Clang, GCC >= 12) takes the lane indices as
// constants; older GCC has __builtin_shuffle, which takes them as a vector.
#if defined(__has_builtin) && !defined(FASTMETA_NO_SHUFFLEVECTOR)
#if __has_builtin(__builtin_shufflevector)
#define FASTMETA_SHUFFLEVECTOR 1
#endif
#endif

template <typename Scalar>
struct VectorTypes;
template <>
struct VectorTypes<float> {
  typedef float Vec __attribute__((vector_size(kVectorBytes)));
  typedef int32_t Lanes __attribute__((vector_size(kVectorBytes)));
};
template <>
struct VectorTypes<double> {
  typedef double Vec __attribute__((vector_size(kVectorBytes)));
  typedef int64_t Lanes __attribute__((vector_size(kVectorBytes)));
};

template <typename Scalar>
struct Simd {
  using Vec = typename VectorTypes<Scalar>::Vec;
  using Lanes = typename VectorTypes<Scalar>::Lanes;
  static constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(Scalar));

  // Unaligned load and store (memcpy compiles to a single unaligned move).
  static inline Vec load(const Scalar* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static inline void store(Scalar* p, Vec v) { std::memcpy(p, &v, sizeof v); }
  static inline Vec zero() { return Vec{}; }
  // (Not Vec{} + s: without -ffast-math that is a real scalar add before the broadcast.)
  static inline Vec broadcast(Scalar s) {
    return splat(Vec{s}, std::make_index_sequence<kLanes>{});
  }

  // The horizontal sums of kLanes vectors at once, as one vector: lane j holds the sum
  // of v[bit_reverse(j)]. Each level adds the two halves of every lane group of a pair of
  // vectors (two shuffles and an add), halving the group width: log2(kLanes) levels and
  // kLanes - 1 pair steps in all, instead of a full reduction per vector.
  static inline Vec sum_each(Vec* v) { return fold_level<kLanes, kLanes>(v); }

  // One vector's horizontal sum (add the upper half onto the lower, log2(kLanes) times).
  static inline Scalar sum(Vec v) { return sum_halves<kLanes>(v); }

  static constexpr int bit_reverse(int j) {
    int r = 0;
    for (int bit = 1; bit < kLanes; bit <<= 1) r = (r << 1) | ((j & bit) ? 1 : 0);
    return r;
  }

  // Transposes the kLanes x kLanes matrix whose rows are v[0..kLanes) in registers:
  // log2(kLanes) rounds of butterflies, each exchanging blocks of s lanes between rows i
  // and i + s (kLanes shuffles per round).
  static inline void transpose(Vec* v) { transpose_round<1>(v); }

  // out[j] = v[bit_reverse(j)]: puts sum_each's sums back in the order of its inputs.
  static inline Vec unreverse(Vec v) {
    return shuffle<BitReverse>(v, v, std::make_index_sequence<kLanes>{});
  }

 private:
  // out[j] = lane Index{}(j) of the concatenation (x, y): one two-source shuffle.
  template <typename Index, std::size_t... J>
  static inline Vec shuffle(Vec x, Vec y, std::index_sequence<J...>) {
#if defined(FASTMETA_SHUFFLEVECTOR)
    return __builtin_shufflevector(x, y, Index{}(J)...);
#else
    return __builtin_shuffle(x, y, Lanes{Index{}(J)...});
#endif
  }

  struct Zero {
    constexpr int operator()(std::size_t) const { return 0; }
  };

  struct BitReverse {
    constexpr int operator()(std::size_t j) const { return bit_reverse(int(j)); }
  };

  template <std::size_t... J>
  static inline Vec splat(Vec v, std::index_sequence<J...> lanes) {
    return shuffle<Zero>(v, v, lanes);
  }

  // Source lane of output lane j when folding groups of width W: first (High = false) or
  // second halves of group j / W, from x for the group's first half of outputs, else y.
  template <int W, bool High>
  static constexpr int fold_source(int j) {
    const int half = W / 2, group = j / W, pos = j % W;
    return (pos >= half ? kLanes : 0) + group * W + (High ? half : 0) + pos % half;
  }

  template <int W, bool High>
  struct FoldSource {
    constexpr int operator()(std::size_t j) const { return fold_source<W, High>(int(j)); }
  };

  template <int W>
  struct ShiftDown {
    constexpr int operator()(std::size_t j) const { return int((j + W / 2) % kLanes); }
  };

  // Lane j of the butterfly's outputs with block size s: the low output takes a's lane j
  // or b's lane j - s, the high one a's lane j + s or b's lane j.
  template <int S, bool High>
  struct Butterfly {
    constexpr int operator()(std::size_t j) const {
      const int lane = int(j);
      if (lane & S) return High ? kLanes + lane : kLanes + lane - S;
      return High ? lane + S : lane;
    }
  };

  template <int S>
  static inline void transpose_round(Vec* v) {
    if constexpr (S < kLanes) {
      constexpr auto lanes = std::make_index_sequence<kLanes>{};
#pragma GCC unroll 16
      for (int i = 0; i < kLanes; ++i) {
        if (i & S) continue;
        const Vec a = v[i], b = v[i + S];
        v[i] = shuffle<Butterfly<S, false>>(a, b, lanes);
        v[i + S] = shuffle<Butterfly<S, true>>(a, b, lanes);
      }
      transpose_round<2 * S>(v);
    }
  }

  template <int W, std::size_t... J>
  static inline Vec fold(Vec x, Vec y, std::index_sequence<J...> lanes) {
    return shuffle<FoldSource<W, false>>(x, y, lanes) + shuffle<FoldSource<W, true>>(x, y, lanes);
  }

  template <int W, std::size_t... J>
  static inline Vec shift_down(Vec v, std::index_sequence<J...> lanes) {
    return shuffle<ShiftDown<W>>(v, v, lanes);
  }

  template <int W>
  static inline Scalar sum_halves(Vec v) {
    if constexpr (W == 1) {
      return v[0];
    } else {
      return sum_halves<W / 2>(v + shift_down<W>(v, std::make_index_sequence<kLanes>{}));
    }
  }

  template <int W, int Count>
  static inline Vec fold_level(Vec* v) {
#pragma GCC unroll 16
    for (int i = 0; i < Count / 2; ++i)
      v[i] = fold<W>(v[2 * i], v[2 * i + 1], std::make_index_sequence<kLanes>{});
    if constexpr (W > 2) return fold_level<W / 2, Count / 2>(v);
    return v[0];
  }
};

// Rounds a row width up to whole vectors: every activation and weight row is padded
// with zeros to this width so the kernels never need a scalar tail.
template <typename Scalar>
constexpr int64_t padded_width(int64_t width) {
  constexpr int64_t lanes = Simd<Scalar>::kLanes;
  return (width + lanes - 1) / lanes * lanes;
}

}  // namespace FASTMETA_ISA
}  // namespace fastmeta
