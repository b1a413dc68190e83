// traits.h: one place per dtype. How a param dtype is loaded and stored as vectors of its
// opmath (Traits: double for fp64, float for fp32 / fp16 / bf16), how sums are accumulated in it
// (Acc, with the accuracy argument below), and how a gradient of another dtype is updated
// (add_into, GradKind: the gradient dtypes add_grad_ accepts). The loops (span.h) and the term
// maths (terms.h) are written once for every dtype on top of these.
//
// Accuracy. fp64 params accumulate in fp64. fp32 / fp16 / bf16 params accumulate in two
// levels: float vector accumulators over short blocks (8 values per lane), folded pairwise
// and widened into double accumulators (see "Accumulation" below): the relative error is at
// most ~11 float roundings (6.6e-7) in the worst case, ~1e-9 in practice, with almost the
// speed of a plain float sum. Per-run sums, positional accumulators, task partials and slots
// are doubles, added in a fixed order; results are rounded once to the acc dtype.

#pragma once

#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

#include "vec.h"

namespace fastreg_cpu {
namespace detail {

// Per-dtype loading: one "step" is one Vectorized<T> of storage, turned into kM vectors of
// opmath (the compute dtype: double for double, float otherwise).
template <typename T>
struct Traits;

// float and double: one storage vector is one opmath vector.
template <typename T>
struct FullTraits {
  using opmath = T;
  static constexpr int kStep = Vectorized<T>::size();
  static constexpr int kM = 1;
  static inline void load(const T* p, Vectorized<T>* x) {
    x[0] = Vectorized<T>::loadu(p);
    pin(x[0]);
  }
  static inline void load(const T* p, int64_t n, Vectorized<T>* x) { x[0] = Vectorized<T>::loadu(p, n); }
  static inline void store(T* p, const Vectorized<T>* x) { x[0].store(p); }
  static inline void store(T* p, int64_t n, const Vectorized<T>* x) { x[0].store(p, static_cast<int>(n)); }
};

template <>
struct Traits<double> : FullTraits<double> {};

template <>
struct Traits<float> : FullTraits<float> {};

template <typename T>  // at::Half, at::BFloat16
struct ReducedTraits {
  using opmath = float;
  static constexpr int kStep = Vectorized<T>::size();
  static_assert(kStep == 2 * kF, "a reduced-precision vector must hold two float vectors");
  static constexpr int kM = 2;
  static inline void split(const Vectorized<T>& v, Vectorized<float>* x) {
    auto both = at::vec::convert_to_float<T>(v);
    x[0] = std::get<0>(both);
    x[1] = std::get<1>(both);
  }
  static inline void load(const T* p, Vectorized<float>* x) { split(Vectorized<T>::loadu(p), x); }
  static inline void load(const T* p, int64_t n, Vectorized<float>* x) {
    split(Vectorized<T>::loadu(p, static_cast<int>(n)), x);
  }
  static inline void store(T* p, const Vectorized<float>* x) {
    at::vec::convert_from_float<T>(x[0], x[1]).store(p);
  }
  static inline void store(T* p, int64_t n, const Vectorized<float>* x) {
    at::vec::convert_from_float<T>(x[0], x[1]).store(p, static_cast<int>(n));
  }
};
template <>
struct Traits<at::Half> : ReducedTraits<at::Half> {};
template <>
struct Traits<at::BFloat16> : ReducedTraits<at::BFloat16> {};

// Accumulation.
//
// fp64 params: kDA independent double accumulators (one per step of an unrolled loop).
//
// fp32 / fp16 / bf16 params: two levels. A block is 8 groups of kFA float vectors; vector k of
// every group goes into float accumulator k, so each lane of an accumulator receives 8 values.
// At the end of the block the kFA accumulators are folded pairwise (log2(kFA) levels) and
// widened into double accumulators. A block's float result thus carries at most
// 8 + log2(kFA) <= 11 roundings (|w| is exact), so the relative error of the whole sum (all
// terms are >= 0) is below 11 * 2^-24 = 6.6e-7 in the worst case and ~1e-9 in practice, while
// the inner loop costs 3 vector ops per float vector (and, fabs, fma) instead of ~9 for
// widening every element to double. Everything above the block is double. (8 values rather
// than 4: the fold and widening at the end of a block cost about as much as a block of 4 steps
// per accumulator; 8 made the sums of ResNet-50's shapes ~5% faster, one thread each.)
template <typename T, bool kDouble = std::is_same_v<typename Traits<T>::opmath, double>>
struct Acc;

template <typename T>
struct Acc<T, true> {  // double params
  static constexpr int kU = kDA;
  Vectorized<double> abs_[kU];
  Vectorized<double> sq_[kU];
  Acc() {
    for (int k = 0; k < kU; ++k) abs_[k] = sq_[k] = Vectorized<double>(0.0);
  }
  void finish(double* out) const { finish_vectors(abs_, sq_, kU, out); }

  static void finish_vectors(const Vectorized<double>* a_, const Vectorized<double>* s_, int n, double* out) {
    Vectorized<double> a = a_[0];
    Vectorized<double> s = s_[0];
    for (int k = 1; k < n; ++k) {  // fixed order
      a = a + a_[k];
      s = s + s_[k];
    }
    __at_align__ double la[kD];
    __at_align__ double ls[kD];
    a.store(la);
    s.store(ls);
    double ta = 0.0, ts = 0.0;
    for (int l = 0; l < kD; ++l) {
      ta += la[l];
      ts += ls[l];
    }
    out[0] = ta;
    out[1] = ts;
  }
};

template <typename T>
struct Acc<T, false> {  // float, half, bfloat16 params
  Vectorized<double> abs_[kR];
  Vectorized<double> sq_[kR];
  Acc() {
    for (int k = 0; k < kR; ++k) abs_[k] = sq_[k] = Vectorized<double>(0.0);
  }
  // Adds one block's float accumulators (fixed pairwise order) into the double ones.
  C10_ALWAYS_INLINE static Vectorized<float> fold(const Vectorized<float>* f) {
    Vectorized<float> t[kFA];
#pragma GCC unroll 16
    for (int k = 0; k < kFA; ++k) t[k] = f[k];
#pragma GCC unroll 4
    for (int width = kFA / 2; width >= 1; width /= 2) {  // pairwise, fixed order
#pragma GCC unroll 16
      for (int k = 0; k < width; ++k) t[k] = t[2 * k] + t[2 * k + 1];
    }
    return t[0];
  }
  C10_ALWAYS_INLINE void flush(const Vectorized<float>* fa, const Vectorized<float>* fs) {
    Vectorized<double> d[kR];
    widen(fold(fa), d);
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) abs_[r] = abs_[r] + d[r];
    widen(fold(fs), d);
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) sq_[r] = sq_[r] + d[r];
  }
  void finish(double* out) const { Acc<double, true>::finish_vectors(abs_, sq_, kR, out); }
};

// ----------------------------------------------------------------------------------------
// Gradients of another dtype than their param (add_grad_).

// g[j] += values[j] for any pair of dtypes, in the wider of the two, rounded once to G (for
// float64 sums stored as fp16 / bf16: through float, i.e. twice).
template <typename G, typename O>
C10_NOINLINE void add_into_any(G* g, int64_t cnt, const O* values) {
  using P = std::conditional_t<std::is_same_v<O, double> || std::is_same_v<G, double>, double, float>;
  for (int64_t j = 0; j < cnt; ++j) {
    const P sum = static_cast<P>(g[j]) + static_cast<P>(values[j]);
    if constexpr (std::is_same_v<G, double> || std::is_same_v<G, float>) {
      g[j] = static_cast<G>(sum);
    } else {
      g[j] = static_cast<G>(static_cast<float>(sum));
    }
  }
}

// g += grad for the cnt elements of one step, g of dtype G, grad in T's opmath: the sum is
// formed in the wider of the two and rounded once to G.
template <typename T, typename G>
C10_ALWAYS_INLINE void add_into(G* g, int64_t cnt, const Vectorized<typename Traits<T>::opmath>* grad) {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  constexpr int kM = Tr::kM;
  constexpr int64_t kStep = Tr::kStep;
  if constexpr (std::is_same_v<G, T>) {
    Vectorized<O> cur[kM];
    if (cnt == kStep) {
      Tr::load(g, cur);
    } else {
      Tr::load(g, cnt, cur);
    }
    for (int m = 0; m < kM; ++m) cur[m] = cur[m] + grad[m];
    if (cnt == kStep) {
      Tr::store(g, cur);
    } else {
      Tr::store(g, cnt, cur);
    }
  } else if constexpr (std::is_same_v<G, float> && std::is_same_v<O, float>) {
    // fp16 / bf16 weights with fp32 gradients: the first-class mixed case, vectorized.
    for (int m = 0; m < kM; ++m) {
      const int64_t lo = m * kF;
      if (lo >= cnt) break;
      const int64_t n = std::min<int64_t>(kF, cnt - lo);
      Vectorized<float> cur = n == kF ? Vectorized<float>::loadu(g + lo) : Vectorized<float>::loadu(g + lo, n);
      cur = cur + grad[m];
      if (n == kF) {
        cur.store(g + lo);
      } else {
        cur.store(g + lo, static_cast<int>(n));
      }
    }
  } else {  // any other pair (rare): through a buffer, out of line to keep the kernels small
    __at_align__ O values[kStep];
    for (int m = 0; m < kM; ++m) grad[m].store(values + m * Vectorized<O>::size());
    add_into_any(g, cnt, values);
  }
}

// The gradient dtypes add_grad_ accepts; the kernels are instantiated per weight dtype only and
// branch on this per step (a loop-invariant, predictable branch).
enum class GradKind : int8_t { kFloat, kDouble, kHalf, kBFloat16 };

inline GradKind grad_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return GradKind::kFloat;
    case at::kDouble: return GradKind::kDouble;
    case at::kHalf: return GradKind::kHalf;
    default: return GradKind::kBFloat16;
  }
}

}  // namespace detail
}  // namespace fastreg_cpu
