// fastreg C++ CPU backend: fused multi-tensor kernels for every fastreg term.
//
// Ops (namespace fastreg_cpu, registered with TORCH_LIBRARY; no pybind module). With d = w - c
// (c: the center, when `centers` is not empty) and s = d, or s = sign(d)·max(|d| - t, 0):
//   sums(Tensor[] params, Tensor[] centers, int group_dim, float threshold) -> (Tensor, Tensor)
//       ([Σ|s|, Σs², Σ_g ‖s_g‖] in the acc dtype, group_sq = ‖s_g‖² per group)
//   grads(Tensor[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_scale)
//       -> Tensor[]                     c1·sign(d) + (2·c2 + scale_g)·d, fresh tensors
//   add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] centers, int group_dim, Tensor coeffs,
//             Tensor? group_norms) -> (Tensor, Tensor)
//       g += c1·sign(d) + 2·c2·d + c3·d_g/‖d_g‖; returns sums(params, centers, group_dim)
//   prox_(Tensor(a!)[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_norms) -> ()
//       w = c + max(0, 1 - c3/‖s_g‖)·s/c2 (tensors with groups), c + s/c2 (others), t = c1
// (see fastreg/backends/__init__.py for the contract, fastreg/backends/_geometry.py for groups).
//
// Work layout: one schedule of tasks per call, each task's arithmetic a function of the tensor
// sizes only, so results are bitwise identical for any thread count. at::parallel_for runs the
// tasks; every task writes its own partial sums (and group partials, "slots"), which are added
// in task order on the calling thread. (at::parallel_for is a header template: the extension
// must be compiled with -fopenmp, else it silently runs serially.) Task kinds:
//   Flat    the tensors without a group term, laid end to end (int64 prefix offsets) and cut
//           into chunks of kChunk elements: a chunk may span many small tensors.
//   Runs    a tensor whose groups are runs of K >= kRunMin contiguous elements (group_dim=0 on a
//           contiguous weight: one run per row): whole runs, about kChunk elements per task, one
//           slot per run. With A == 1 every run is a whole group, so add_grad_ and prox_ compute
//           its norm and update it in one visit (the second read hits the cache): one pass.
//   RunPart one piece of a run longer than kChunk.
//   Rows    a tensor whose runs are short (group_dim=1 on a Linear weight: K = 1): a block of rows
//           of its (A, G*K) memory view, over a window of at most kRowMax positions, with one
//           double accumulator per position, folded into per-group slots at the end.
// add_grad_ and prox_ need a group's norm before they update it: for tensors whose groups span
// tasks (Rows, RunPart, runs with A > 1) a first pass computes the norms (the sums kernel on
// those tasks only), unless the caller passes them (sharded parameters: global norms).
//
// Accuracy. fp64 params accumulate in fp64. fp32 / fp16 / bf16 params accumulate in two
// levels: float vector accumulators over short blocks (4 values per lane), folded pairwise
// and widened into double accumulators (see "Accumulation" below): the relative error is at
// most ~7 float roundings (4e-7) in the worst case, ~1e-9 in practice, with almost the
// speed of a plain float sum. Per-run sums, positional accumulators, task partials and slots
// are doubles, added in a fixed order; results are rounded once to the acc dtype.
//
// Vectorization. Inner loops use at::vec::Vectorized<T> (the width chosen by the
// CPU_CAPABILITY_* macro the Python side passes with the matching -m flags). Tails use the
// masked loadu(ptr, count) / store(ptr, count), so the same arithmetic handles every element.
//
// Layout. A tensor that is non-overlapping and dense (contiguous, transposed, channels-last,
// ...) occupies exactly [data_ptr, data_ptr + numel) and is processed in memory order; its
// groups are located from its strides (fastreg/backends/_geometry.py). Anything else (slices,
// expanded tensors) is read through a dense temporary; in-place ops then copy the temporary
// back explicitly. Centers and gradients are used directly when their strides match the
// parameter's (as read), otherwise through a temporary in that layout.

#pragma once

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastreg_cpu {
namespace detail {

using at::vec::Vectorized;

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per task (flat chunks, runs per task, rows per task)
constexpr int64_t kRunMin = 64;                // runs at least this long are reduced one by one
constexpr int64_t kRowMax = int64_t{1} << 14;  // positions (double accumulators) per Rows task
constexpr int64_t kRowsTask = int64_t{1} << 18;  // elements per Rows task

constexpr int kF = Vectorized<float>::size();
constexpr int kD = Vectorized<double>::size();
static_assert(kF % kD == 0, "a float vector must widen to whole double vectors");
constexpr int kR = kF / kD;  // double vectors per float vector
// Independent accumulators (a power of two): enough to hide the add/fma latency, few enough
// for abs + square accumulators to stay in registers (32 vector registers with AVX-512, 16
// with AVX2 / NEON).
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kFA = 8;  // float accumulators per block (fp32 / fp16 / bf16 params)
constexpr int kDA = 8;  // double accumulators (fp64 params)
#else
constexpr int kFA = 4;
constexpr int kDA = 4;
#endif

// float -> double, lane order preserved: out[0] holds lanes [0, kD), out[1] [kD, 2kD), ...
C10_ALWAYS_INLINE void widen(const Vectorized<float>& v, Vectorized<double>* out) {
#if defined(CPU_CAPABILITY_AVX512)
  static_assert(kR == 2, "");
  const __m512 x = v;
  out[0] = Vectorized<double>(_mm512_cvtps_pd(_mm512_castps512_ps256(x)));
  out[1] = Vectorized<double>(
      _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))));
#elif defined(CPU_CAPABILITY_AVX2)
  static_assert(kR == 2, "");
  const __m256 x = v;
  out[0] = Vectorized<double>(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
  out[1] = Vectorized<double>(_mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
#else
  __at_align__ float f[kF];
  __at_align__ double d[kF];
  v.store(f);
  for (int i = 0; i < kF; ++i) d[i] = static_cast<double>(f[i]);
  for (int r = 0; r < kR; ++r) out[r] = Vectorized<double>::loadu(d + r * kD);
#endif
}

// Keeps a loaded vector in a register. Without it GCC folds the load into both the abs and the
// fma as memory operands, reading every vector twice from L1, which costs ~25% of the
// bandwidth on cache-resident data (measured: 80 vs 110 GB/s on 16 MB of fp32).
#if defined(__GNUC__) && defined(CPU_CAPABILITY_AVX512)
inline void pin(Vectorized<float>& v) {
  __m512 r = v;
  asm("" : "+v"(r));
  v = Vectorized<float>(r);
}
inline void pin(Vectorized<double>& v) {
  __m512d r = v;
  asm("" : "+v"(r));
  v = Vectorized<double>(r);
}
#elif defined(__GNUC__) && defined(CPU_CAPABILITY_AVX2)
inline void pin(Vectorized<float>& v) {
  __m256 r = v;
  asm("" : "+x"(r));
  v = Vectorized<float>(r);
}
inline void pin(Vectorized<double>& v) {
  __m256d r = v;
  asm("" : "+x"(r));
  v = Vectorized<double>(r);
}
#else
template <typename V>
inline void pin(V&) {}
#endif

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
// fp32 / fp16 / bf16 params: two levels. A block is 4 groups of kFA float vectors; vector k of
// every group goes into float accumulator k, so each lane of an accumulator receives 4 values.
// At the end of the block the kFA accumulators are folded pairwise (log2(kFA) levels) and
// widened into double accumulators. A block's float result thus carries at most
// 4 + log2(kFA) <= 7 roundings (|w| is exact), so the relative error of the whole sum (all
// terms are >= 0) is below 7 * 2^-24 = 4.2e-7 in the worst case and ~1e-9 in practice, while
// the inner loop costs 3 vector ops per float vector (and, fabs, fma) instead of ~9 for
// widening every element to double. Everything above the block is double.
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
// Operands: d = w - c, loaded as opmath vectors (zero-filled past a masked count).

template <typename T, bool kCenter>
struct Diff {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  static constexpr int kM = Tr::kM;
  const T* w;
  const T* c;
  C10_ALWAYS_INLINE void load(int64_t i, Vectorized<O>* x) const {
    Tr::load(w + i, x);
    if constexpr (kCenter) {
      Vectorized<O> y[kM];
      Tr::load(c + i, y);
      for (int m = 0; m < kM; ++m) x[m] = x[m] - y[m];
    }
  }
  C10_ALWAYS_INLINE void load(int64_t i, int64_t n, Vectorized<O>* x) const {
    Tr::load(w + i, n, x);
    if constexpr (kCenter) {
      Vectorized<O> y[kM];
      Tr::load(c + i, n, y);
      for (int m = 0; m < kM; ++m) x[m] = x[m] - y[m];
    }
  }
};

// |s| = max(|d| - t, 0): the magnitudes of the proximal step's shrunk values, all its sums need.
// NaN propagates (a diverged weight is not silently zeroed).
template <typename T, bool kCenter>
struct Shrunk {
  using O = typename Traits<T>::opmath;
  static constexpr int kM = Traits<T>::kM;
  Diff<T, kCenter> d;
  Vectorized<O> thr;
  C10_ALWAYS_INLINE void load(int64_t i, Vectorized<O>* x) const {
    d.load(i, x);
    for (int m = 0; m < kM; ++m) x[m] = at::vec::maximum(x[m].abs() - thr, Vectorized<O>(O(0)));
  }
  C10_ALWAYS_INLINE void load(int64_t i, int64_t n, Vectorized<O>* x) const {
    d.load(i, n, x);
    for (int m = 0; m < kM; ++m) x[m] = at::vec::maximum(x[m].abs() - thr, Vectorized<O>(O(0)));
  }
};

// Runs `elem(i, count, x)` on every step of [off, off + n) (x: the loaded opmath vectors, i
// relative to off; elem may store results) and, when kReduce, accumulates the loaded values into
// `acc`. The assignment of elements to accumulators depends only on n: deterministic for any
// thread count.
template <typename T, bool kReduce, typename Loader, typename Elem>
inline void span(const Loader& ld, int64_t off, int64_t n, Acc<T>& acc, const Elem& elem) {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  constexpr int64_t kStep = Tr::kStep;
  constexpr int kM = Tr::kM;
  int64_t i = 0;
  if constexpr (!kReduce) {  // element-wise only: one step at a time, the last one masked
    for (; i + kStep <= n; i += kStep) {
      Vectorized<O> x[kM];
      ld.load(off + i, x);
      elem(i, kStep, x);
    }
    if (i < n) {
      Vectorized<O> x[kM];
      ld.load(off + i, n - i, x);
      elem(i, n - i, x);
    }
  } else if constexpr (std::is_same_v<O, double>) {
    constexpr int kU = Acc<T>::kU;
    // Local copies: the compiler keeps them in registers (members of `acc` would round-trip
    // through memory on every update).
    Vectorized<double> a[kU], q[kU];
#pragma GCC unroll 16
    for (int u = 0; u < kU; ++u) {
      a[u] = acc.abs_[u];
      q[u] = acc.sq_[u];
    }
    for (; i + kU * kStep <= n; i += kU * kStep) {
#pragma GCC unroll 16
      for (int u = 0; u < kU; ++u) {
        Vectorized<double> x[1];
        ld.load(off + i + u * kStep, x);
        elem(i + u * kStep, kStep, x);
        a[u] = a[u] + x[0].abs();
        q[u] = at::vec::fmadd(x[0], x[0], q[u]);
      }
    }
    for (; i < n; i += kStep) {
      const int64_t cnt = std::min<int64_t>(kStep, n - i);
      Vectorized<double> x[1];
      if (cnt == kStep) {
        ld.load(off + i, x);
      } else {
        ld.load(off + i, cnt, x);  // zero-filled: adds nothing to the sums
      }
      elem(i, cnt, x);
      a[0] = a[0] + x[0].abs();
      q[0] = at::vec::fmadd(x[0], x[0], q[0]);
    }
#pragma GCC unroll 16
    for (int u = 0; u < kU; ++u) {
      acc.abs_[u] = a[u];
      acc.sq_[u] = q[u];
    }
  } else {
    constexpr int kG = kFA / kM;                      // steps per group (kFA float vectors)
    constexpr int kGroups = 4;                        // groups per block: 4 values per lane
    constexpr int64_t kBlock = kGroups * kG * kStep;  // elements per block
    const Vectorized<float> zero(0.0f);
    // One step into float accumulators g*kM .. g*kM+kM-1.
    auto step = [&](int64_t at, int64_t cnt, int g, Vectorized<float>* fa, Vectorized<float>* fs) {
      Vectorized<float> x[kM];
      if (cnt == kStep) {
        ld.load(off + at, x);
      } else {
        ld.load(off + at, cnt, x);  // zero-filled: adds nothing to the sums
      }
      elem(at, cnt, x);
#pragma GCC unroll 2
      for (int m = 0; m < kM; ++m) {
        fa[g * kM + m] = fa[g * kM + m] + x[m].abs();
        fs[g * kM + m] = at::vec::fmadd(x[m], x[m], fs[g * kM + m]);
      }
    };
    for (; i + kBlock <= n; i += kBlock) {
      Vectorized<float> fa[kFA];
      Vectorized<float> fs[kFA];
#pragma GCC unroll 16
      for (int k = 0; k < kFA; ++k) fa[k] = fs[k] = zero;
#pragma GCC unroll 1  // a real loop: fully unrolled, GCC spills (measured 0.65x vs 0.95x of torch.sum)
      for (int b = 0; b < kGroups; ++b) {
#pragma GCC unroll 16
        for (int g = 0; g < kG; ++g) step(i + (b * kG + g) * kStep, kStep, g, fa, fs);
      }
      acc.flush(fa, fs);
    }
    if (i < n) {  // a partial block: same pattern, steps past n skipped, the last one masked
      Vectorized<float> fa[kFA];
      Vectorized<float> fs[kFA];
#pragma GCC unroll 16
      for (int k = 0; k < kFA; ++k) fa[k] = fs[k] = zero;
#pragma GCC unroll 4
      for (int b = 0; b < kGroups; ++b) {
#pragma GCC unroll 16
        for (int g = 0; g < kG; ++g) {
          if (i < n) {
            const int64_t cnt = std::min<int64_t>(kStep, n - i);
            step(i, cnt, g, fa, fs);
            i += cnt;
          }
        }
      }
      acc.flush(fa, fs);
    }
  }
}

// (Σ|x|, Σx²) of [off, off + n) in double, from a fresh accumulator.
template <typename T, typename Loader>
inline void reduce_span(const Loader& ld, int64_t off, int64_t n, double* out) {
  Acc<T> acc;
  span<T, true>(ld, off, n, acc, [](int64_t, int64_t, const auto*) {});
  acc.finish(out);
}

// Per-thread scratch of Rows tasks, reused: 0 positional sums, 1 coefficients, 2 group sums,
// 3 positional squares in opmath.
template <typename V>
V* scratch(int64_t n, int which) {
  static thread_local std::vector<V> buffers[4];
  auto& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

// Rows of a (rows, row) memory view, positions [lo, lo + width) of rows [a0, a1): pos[j] += Σ_a x²
// at every position (the groups' partial squared norms, still to be folded over K), and the sum
// of |x| into abs_total. Row after row (one sequential stream each: reading several rows in
// lockstep thrashes L1 sets when the row stride is a multiple of 4 KB, measured 5.7 vs 24 GB/s on
// 4096 x 4096), squares added into an opmath positional buffer, flushed into the double
// accumulators every kRowBlock rows (at most 8 float roundings before widening: <= 5e-7
// relative). pos must have room for width + kStep values (full-width updates past the end add
// zeros: masked loads are zero-filled).
template <typename T, typename Loader>
inline void rows_sums(const Loader& ld, int64_t a0, int64_t a1, int64_t row, int64_t lo, int64_t width,
                      double* pos, double* abs_total) {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  constexpr int kM = Tr::kM;
  constexpr int64_t kStep = Tr::kStep;
  constexpr int kVO = Vectorized<O>::size();
  constexpr int64_t kRowBlock = 8;
  O* squares = std::is_same_v<O, double> ? reinterpret_cast<O*>(pos) : scratch<O>(width + kStep, 3);
  Acc<T> acc;
  auto add_squares = [&](int64_t i, int64_t, const Vectorized<O>* x) {
    for (int m = 0; m < kM; ++m) {
      O* p = squares + i + m * kVO;
      at::vec::fmadd(x[m], x[m], Vectorized<O>::loadu(p)).store(p);
    }
  };
  for (int64_t a = a0; a < a1; a += kRowBlock) {
    if constexpr (!std::is_same_v<O, double>) std::fill(squares, squares + width + kStep, O(0));
    const int64_t end = std::min(a1, a + kRowBlock);
    for (int64_t r = a; r < end; ++r) span<T, true>(ld, r * row + lo, width, acc, add_squares);
    if constexpr (!std::is_same_v<O, double>) {
      for (int64_t j = 0; j < width; j += kF) {
        Vectorized<double> d[kR];
        widen(Vectorized<float>::loadu(squares + j), d);
        for (int r = 0; r < kR; ++r) {
          double* p = pos + j + r * kD;
          (Vectorized<double>::loadu(p) + d[r]).store(p);
        }
      }
    }
  }
  double out[2];
  acc.finish(out);
  *abs_total = out[0];
}

// The per-group sums of a Rows window (pos folded over K, in order) into sums[0 .. width/K), and
// the window's total.
inline double fold_positions(const double* pos, int64_t width, int64_t run, double* sums) {
  double total = 0.0;
  for (int64_t j = 0; j < width / run; ++j) {
    double sum = 0.0;
    for (int64_t k = 0; k < run; ++k) sum += pos[j * run + k];
    sums[j] = sum;
    total += sum;
  }
  return total;
}

// ----------------------------------------------------------------------------------------
// The element-wise maths, in opmath.

template <typename O>
C10_ALWAYS_INLINE Vectorized<O> gradient(const Vectorized<O>& d, const Vectorized<O>& c1,
                                          const Vectorized<O>& coef) {
  const Vectorized<O> zero(O(0));
  // c1 * sign(d), sign(0) = 0 (NaN gives 0 here and NaN from the fmadd below)
  const Vectorized<O> s = Vectorized<O>::blendv(
      Vectorized<O>::blendv(zero, c1.neg(), d < zero), c1, d > zero);
  return at::vec::fmadd(coef, d, s);  // rounded once
}

// sign(d) * max(|d| - thr, 0); NaN propagates.
template <typename O>
C10_ALWAYS_INLINE Vectorized<O> soft_threshold(const Vectorized<O>& d, const Vectorized<O>& thr) {
  const Vectorized<O> zero(O(0));
  const Vectorized<O> r = at::vec::maximum(d.abs() - thr, zero);
  return Vectorized<O>::blendv(r, r.neg(), d < zero);
}

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

// ----------------------------------------------------------------------------------------
// Multi-tensor plumbing: items, tasks, the schedule.

// prefix[k] = elements before entry k; prefix.back() = total.
struct Layout {
  std::vector<int64_t> prefix{0};
  int64_t total() const { return prefix.back(); }
  int64_t items() const { return static_cast<int64_t>(prefix.size()) - 1; }
  int64_t chunks() const { return (total() + kChunk - 1) / kChunk; }
  void add(int64_t n) { prefix.push_back(prefix.back() + n); }
};

// seg(entry, offset, length) for every piece of `chunk`, in order.
template <typename Seg>
inline void for_each_segment(const Layout& layout, int64_t chunk, const Seg& seg) {
  const auto& prefix = layout.prefix;
  const int64_t start = chunk * kChunk;
  const int64_t end = std::min(start + kChunk, layout.total());
  // Last entry whose start <= `start` (empty items were never added, so starts are strict).
  int64_t entry = static_cast<int64_t>(std::upper_bound(prefix.begin(), prefix.end(), start) -
                                       prefix.begin()) - 1;
  for (; entry < layout.items() && prefix[entry] < end; ++entry) {
    const int64_t lo = std::max(start, prefix[entry]);
    const int64_t hi = std::min(end, prefix[entry + 1]);
    if (hi > lo) seg(entry, lo - prefix[entry], hi - lo);
  }
}

// One tensor of a call, as the kernels read it.
struct Item {
  int64_t numel = 0;
  int64_t A = 1, G = 0, K = 0;  // memory geometry of its groups; G == 0: no group term
  int64_t group_base = 0;       // its first entry in the group vectors
  bool whole_groups = false;    // each of its tasks holds whole groups: norms computed in-task
};

enum class Mode : int8_t { kFlat, kRuns, kRunPart, kRows };

struct Task {
  Mode mode;
  int64_t item;        // the item (not Flat)
  int64_t begin, end;  // Flat: the chunk (begin); Runs: runs [begin, end); RunPart: run begin; Rows: rows
  int64_t lo, hi;      // RunPart: elements [lo, hi) of the run; Rows: positions [lo, hi) of each row
  int64_t slot;        // its first slot (group partial): Runs one per run, RunPart one, Rows one per group
};

struct Schedule {
  Layout flat;                      // the items without groups, end to end
  std::vector<int64_t> flat_items;  // flat layout entry -> item
  std::vector<Task> tasks;          // the flat chunks first, then each item's tasks
  int64_t nslots = 0;
};

inline Schedule make_schedule(std::vector<Item>& items) {
  Schedule s;
  for (size_t k = 0; k < items.size(); ++k) {
    if (items[k].numel > 0 && items[k].G == 0) {
      s.flat.add(items[k].numel);
      s.flat_items.push_back(static_cast<int64_t>(k));
    }
  }
  for (int64_t c = 0; c < s.flat.chunks(); ++c) s.tasks.push_back({Mode::kFlat, -1, c, c + 1, 0, 0, 0});
  for (size_t k = 0; k < items.size(); ++k) {
    Item& it = items[k];
    if (it.numel == 0 || it.G == 0) continue;
    const int64_t item = static_cast<int64_t>(k);
    if (it.K >= kRunMin || it.G == 1) {
      const int64_t runs = it.A * it.G;
      if (it.K <= kChunk) {
        const int64_t per = std::max<int64_t>(1, kChunk / it.K);
        for (int64_t r = 0; r < runs; r += per) {
          const int64_t e = std::min(runs, r + per);
          s.tasks.push_back({Mode::kRuns, item, r, e, 0, it.K, s.nslots});
          s.nslots += e - r;
        }
        it.whole_groups = it.A == 1;
      } else {
        for (int64_t r = 0; r < runs; ++r) {
          for (int64_t lo = 0; lo < it.K; lo += kChunk) {
            s.tasks.push_back({Mode::kRunPart, item, r, r + 1, lo, std::min(it.K, lo + kChunk), s.nslots});
            s.nslots += 1;
          }
        }
      }
    } else {
      const int64_t row = it.G * it.K;
      const int64_t window = std::min(row, std::max<int64_t>(1, kRowMax / it.K) * it.K);
      // Larger tasks than elsewhere: a task's slots are one per group of its window, so its
      // partial storage is numel / rows-per-task.
      const int64_t per = std::max<int64_t>(1, kRowsTask / window);
      for (int64_t lo = 0; lo < row; lo += window) {
        const int64_t hi = std::min(row, lo + window);
        for (int64_t a = 0; a < it.A; a += per) {
          s.tasks.push_back({Mode::kRows, item, a, std::min(it.A, a + per), lo, hi, s.nslots});
          s.nslots += (hi - lo) / it.K;
        }
      }
      it.whole_groups = window == row && per >= it.A;
    }
  }
  return s;
}

template <typename Fn>
void parallel_tasks(int64_t n, const Fn& fn) {
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t);
  };
  if (n <= 1) {
    body(0, n);
  } else {
    at::parallel_for(0, n, 1, body);
  }
}


// Adds the slots into per-group sums (group vector order), task by task: a fixed order. (No
// division per slot: a Rows task's slots are consecutive groups, a Runs task's wrap around G.)
inline void add_slots(const Schedule& s, const std::vector<Item>& items, const std::vector<double>& slots,
                      std::vector<double>& group_sq, const std::vector<bool>* only_items = nullptr) {
  for (const Task& t : s.tasks) {
    if (t.mode == Mode::kFlat) continue;
    if (only_items != nullptr && !(*only_items)[t.item]) continue;
    const Item& it = items[t.item];
    const double* from = slots.data() + t.slot;
    double* to = group_sq.data() + it.group_base;
    if (t.mode == Mode::kRows) {
      const int64_t first = t.lo / it.K;
      const int64_t n = (t.hi - t.lo) / it.K;
      for (int64_t j = 0; j < n; ++j) to[first + j] += from[j];
    } else {
      int64_t g = t.begin % it.G;
      for (int64_t r = t.begin; r < t.end; ++r) {
        to[g] += from[r - t.begin];
        if (++g == it.G) g = 0;
      }
    }
  }
}

// ----------------------------------------------------------------------------------------
// The sums kernel: (Σ|s|, Σs²) per task, and the group partials.

template <typename T, typename Loader, typename LoaderOf>
C10_NOINLINE void sums_tasks(const Schedule& s, const std::vector<Item>& items, const LoaderOf& loader_of,
                             double* partials, double* slots, const std::vector<bool>* only_items = nullptr) {
  using O = typename Traits<T>::opmath;
  auto none = [](int64_t, int64_t, const Vectorized<O>*) {};
  parallel_tasks(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[ti];
    if (only_items != nullptr && (t.mode == Mode::kFlat || !(*only_items)[t.item])) return;
    double* out = partials + 2 * ti;
    out[0] = out[1] = 0.0;
    if (t.mode == Mode::kFlat) {
      Acc<T> acc;
      for_each_segment(s.flat, t.begin, [&](int64_t entry, int64_t off, int64_t len) {
        span<T, true>(loader_of(s.flat_items[entry]), off, len, acc, none);
      });
      acc.finish(out);
      return;
    }
    const Item& it = items[t.item];
    const Loader ld = loader_of(t.item);
    if (t.mode == Mode::kRuns || t.mode == Mode::kRunPart) {
      for (int64_t r = t.begin; r < t.end; ++r) {
        double run[2];
        reduce_span<T>(ld, r * it.K + t.lo, t.hi - t.lo, run);
        out[0] += run[0];
        out[1] += run[1];
        slots[t.slot + (r - t.begin)] = run[1];
      }
      return;
    }
    const int64_t width = t.hi - t.lo;
    double* pos = scratch<double>(width + Traits<T>::kStep, 0);
    std::fill(pos, pos + width + Traits<T>::kStep, 0.0);
    rows_sums<T>(ld, t.begin, t.end, it.G * it.K, t.lo, width, pos, &out[0]);
    out[1] = fold_positions(pos, width, it.K, slots + t.slot);
  });
}

// ----------------------------------------------------------------------------------------
// Element-wise passes (grads, add_grad_, prox_) over the same schedule.
//
// Every op says what to do with d on a step given the coefficient of its position: a scalar for
// a flat chunk or a run, one value per position for Rows. `group_coef(norm)` turns a group's
// norm into that coefficient; for items with whole groups per task and no norms given, the norm
// comes from a first visit of the run (or rows) in the same task.

template <typename T, bool kCenter, typename Op>
C10_NOINLINE void apply_tasks(const Schedule& s, const std::vector<Item>& items, const std::vector<const T*>& w,
                              const std::vector<const T*>& c, const Op& op, const double* group_coef,
                              const std::vector<bool>& precomputed, bool allow_in_task, double* partials,
                              double* slots) {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  constexpr int kM = Tr::kM;
  constexpr bool kReduce = Op::kReduce;
  // The sums an op returns are those of d, which is also what it takes norms of.
  static_assert(!Op::kReduce || Op::kNormOfD, "a reducing op must take the norms of d");
  constexpr int kVO = Vectorized<O>::size();
  auto diff_of = [&](int64_t item) { return Diff<T, kCenter>{w[item], kCenter ? c[item] : nullptr}; };
  parallel_tasks(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[ti];
    if (t.mode == Mode::kFlat) {
      Acc<T> acc;
      const Vectorized<O> coef(op.flat_coef());
      for_each_segment(s.flat, t.begin, [&](int64_t entry, int64_t off, int64_t len) {
        const int64_t item = s.flat_items[entry];
        span<T, kReduce>(diff_of(item), off, len, acc, [&](int64_t i, int64_t cnt, const Vectorized<O>* x) {
          Vectorized<O> k[kM];
          for (int m = 0; m < kM; ++m) k[m] = coef;
          op.template elem<true>(item, off + i, cnt, x, k);
        });
      });
      if constexpr (kReduce) acc.finish(partials + 2 * ti);
      return;
    }
    const Item& it = items[t.item];
    const auto ld = diff_of(t.item);
    const auto visit_loader = op.norm_loader(ld);
    const bool in_task = allow_in_task && it.whole_groups;
    // A visit reads the task's elements first (then in cache for the update): for norms
    // computed here, or for the sums of a task whose first pass did not compute them.
    const bool visit = in_task || (kReduce && !precomputed[t.item]);
    double* out = kReduce && visit ? partials + 2 * ti : nullptr;
    if (out != nullptr) out[0] = out[1] = 0.0;
    if (t.mode == Mode::kRuns || t.mode == Mode::kRunPart) {
      for (int64_t r = t.begin; r < t.end; ++r) {
        const int64_t off = r * it.K + t.lo;
        const int64_t len = t.hi - t.lo;
        O coef_value = in_task ? O(0) : static_cast<O>(group_coef[it.group_base + r % it.G]);
        if (visit) {
          double run[2];
          reduce_span<T>(visit_loader, off, len, run);
          if (in_task) coef_value = op.group_coef(std::sqrt(run[1]));
          if (out != nullptr) {
            out[0] += run[0];
            out[1] += run[1];
            slots[t.slot + (r - t.begin)] = run[1];
          }
        }
        const Vectorized<O> coef(coef_value);
        Acc<T> unused;
        span<T, false>(ld, off, len, unused, [&](int64_t i, int64_t cnt, const Vectorized<O>* x) {
          Vectorized<O> k[kM];
          for (int m = 0; m < kM; ++m) k[m] = coef;
          op.template elem<false>(t.item, off + i, cnt, x, k);
        });
      }
      return;
    }
    // Rows: the coefficient of every position of the window, from its group.
    const int64_t row = it.G * it.K;
    const int64_t width = t.hi - t.lo;
    const int64_t ngroups = width / it.K;
    O* coefs = scratch<O>(width + Tr::kStep, 1);
    std::fill(coefs + width, coefs + width + Tr::kStep, O(0));
    if (visit) {
      double* pos = scratch<double>(width + Tr::kStep, 0);
      std::fill(pos, pos + width + Tr::kStep, 0.0);
      double abs_total = 0.0;
      rows_sums<T>(visit_loader, t.begin, t.end, row, t.lo, width, pos, &abs_total);
      double* group_sums = scratch<double>(ngroups, 2);
      const double total = fold_positions(pos, width, it.K, group_sums);
      if (out != nullptr) {
        out[0] = abs_total;
        out[1] = total;
        std::copy(group_sums, group_sums + ngroups, slots + t.slot);
      }
      if (in_task) {
        for (int64_t j = 0; j < ngroups; ++j) {
          const O value = op.group_coef(std::sqrt(group_sums[j]));
          std::fill(coefs + j * it.K, coefs + (j + 1) * it.K, value);
        }
      }
    }
    if (!in_task) {
      for (int64_t j = 0; j < ngroups; ++j) {
        const O value = static_cast<O>(group_coef[it.group_base + t.lo / it.K + j]);
        std::fill(coefs + j * it.K, coefs + (j + 1) * it.K, value);
      }
    }
    for (int64_t a = t.begin; a < t.end; ++a) {
      const int64_t off = a * row + t.lo;
      Acc<T> unused;
      span<T, false>(ld, off, width, unused, [&](int64_t i, int64_t cnt, const Vectorized<O>* x) {
        Vectorized<O> k[kM];
        for (int m = 0; m < kM; ++m) k[m] = Vectorized<O>::loadu(coefs + i + m * kVO);
        op.template elem<false>(t.item, off + i, cnt, x, k);
      });
    }
  });
}

// grads: out = c1·sign(d) + coef·d, coef = 2·c2 (+ the group's scale).
template <typename T>
struct GradsOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kReduce = false;
  static constexpr bool kNormOfD = true;
  Vectorized<O> c1;
  O two_c2;
  std::vector<T*> out;
  O flat_coef() const { return two_c2; }
  O group_coef(double) const { return two_c2; }  // never in-task: the scale is given
  template <typename D>
  D norm_loader(const D& d) const { return d; }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    constexpr int kM = Traits<T>::kM;
    Vectorized<O> g[kM];
    for (int m = 0; m < kM; ++m) g[m] = gradient(x[m], c1, coef[m]);
    if (cnt == Traits<T>::kStep) {
      Traits<T>::store(out[item] + at, g);
    } else {
      Traits<T>::store(out[item] + at, cnt, g);
    }
  }
};

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

// add_grad_: g += c1·sign(d) + coef·d, coef = 2·c2 + c3/‖d_g‖ (0 for a zero group).
template <typename T>
struct AddGradOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kReduce = true;
  static constexpr bool kNormOfD = true;  // the norm visit's sums are the sums of d
  Vectorized<O> c1;
  O two_c2;
  double c3;
  GradKind kind;
  std::vector<void*> grad;
  O flat_coef() const { return two_c2; }
  O group_coef(double norm) const {
    return static_cast<O>(static_cast<double>(two_c2) + (norm > 0.0 ? c3 / norm : 0.0));
  }
  template <typename D>
  D norm_loader(const D& d) const { return d; }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    constexpr int kM = Traits<T>::kM;
    Vectorized<O> g[kM];
    for (int m = 0; m < kM; ++m) g[m] = gradient(x[m], c1, coef[m]);
    void* target = grad[item];
    switch (kind) {
      case GradKind::kFloat: add_into<T, float>(static_cast<float*>(target) + at, cnt, g); break;
      case GradKind::kDouble: add_into<T, double>(static_cast<double*>(target) + at, cnt, g); break;
      case GradKind::kHalf: add_into<T, at::Half>(static_cast<at::Half*>(target) + at, cnt, g); break;
      case GradKind::kBFloat16: add_into<T, at::BFloat16>(static_cast<at::BFloat16*>(target) + at, cnt, g); break;
    }
  }
};

// prox_: w = c + s·f with s = soft_threshold(d, t) and f = max(0, 1 - c3/‖s_g‖)/den for tensors
// with groups; w = c + s/den for the others (an IEEE division, as the formula says).
template <typename T, bool kCenter>
struct ProxOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kReduce = false;
  static constexpr bool kNormOfD = false;
  Vectorized<O> thr;
  Vectorized<O> den;
  double group_thr;
  double den_value;
  std::vector<T*> w;
  std::vector<const T*> c;
  O flat_coef() const { return O(0); }  // unused: flat steps divide
  O group_coef(double norm) const {
    return static_cast<O>(norm > 0.0 ? std::max(0.0, 1.0 - group_thr / norm) / den_value : 0.0);
  }
  Shrunk<T, kCenter> norm_loader(const Diff<T, kCenter>& d) const { return {d, thr}; }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    using Tr = Traits<T>;
    constexpr int kM = Tr::kM;
    Vectorized<O> r[kM];
    for (int m = 0; m < kM; ++m) {
      const Vectorized<O> s = soft_threshold(x[m], thr);
      r[m] = kFlat ? s / den : s * coef[m];
    }
    if constexpr (kCenter) {
      Vectorized<O> y[kM];
      if (cnt == Tr::kStep) {
        Tr::load(c[item] + at, y);
      } else {
        Tr::load(c[item] + at, cnt, y);
      }
      for (int m = 0; m < kM; ++m) r[m] = r[m] + y[m];
    }
    if (cnt == Tr::kStep) {
      Tr::store(w[item] + at, r);
    } else {
      Tr::store(w[item] + at, cnt, r);
    }
  }
};

// ----------------------------------------------------------------------------------------
// Preparing a call: which memory each operand is read from and written to.

inline bool direct(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && !t.is_neg() && !t.is_conj();
}

// Same element order in memory: equal strides on every dimension of size > 1.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// at::empty_like(t), without the dispatcher round trip when t is dense (its strides are then
// exactly what empty_like would choose): 2000 of these per call add up.
inline at::Tensor fresh_like(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) {
    return at::Tensor(at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type()));
  }
  return at::empty_like(t);
}

// A dense copy of `t` (in its own dtype) laid out like at::empty_like(like).
inline at::Tensor copy_like(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor tmp = at::empty_like(like, like.options().dtype(t.scalar_type()));
  tmp.copy_(t);
  return tmp;
}

inline at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::ScalarType check_group(at::TensorList params, at::TensorList centers, const char* op) {
  TORCH_CHECK(!params.empty(), "fastreg_cpu::", op, ": params must not be empty");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastreg_cpu::", op, ": unsupported dtype ", dtype);
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    TORCH_CHECK(p.device().is_cpu(), "fastreg_cpu::", op, ": params[", k, "]: expected a CPU tensor, got ",
                p.device());
    TORCH_CHECK(p.scalar_type() == dtype, "fastreg_cpu::", op, ": params[", k, "] is ", p.scalar_type(),
                ", params[0] is ", dtype, " (one dtype per call)");
    TORCH_CHECK(p.layout() == at::kStrided, "fastreg_cpu::", op, ": params[", k, "]: expected a strided tensor");
  }
  TORCH_CHECK(centers.empty() || centers.size() == params.size(), "fastreg_cpu::", op, ": ", params.size(),
              " params but ", centers.size(), " centers");
  for (size_t k = 0; k < centers.size(); ++k) {
    const auto& c = centers[k];
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dtype && c.layout() == at::kStrided &&
                    c.sizes() == params[k].sizes(),
                "fastreg_cpu::", op, ": centers[", k, "] must be a strided CPU ", dtype, " tensor of shape ",
                params[k].sizes(), ", got ", c.scalar_type(), " ", c.sizes(), " on ", c.device());
  }
  return dtype;
}

// The first n values of a 1-D coefficient tensor of the acc dtype (more entries are ignored: the
// autograd backward passes its (3,) gradient of the sums as is), as doubles.
inline std::vector<double> read_coeffs(const at::Tensor& coeffs, at::ScalarType dtype, int64_t n) {
  TORCH_CHECK(coeffs.device().is_cpu() && coeffs.dim() == 1 && coeffs.size(0) >= n,
              "fastreg_cpu: coeffs must be a CPU tensor of at least ", n, " values, got shape ", coeffs.sizes(),
              " on ", coeffs.device());
  TORCH_CHECK(coeffs.scalar_type() == acc_type(dtype), "fastreg_cpu: coeffs must be ", acc_type(dtype),
              " for ", dtype, " params, got ", coeffs.scalar_type());
  const at::Tensor values = coeffs.to(at::kDouble).contiguous();
  return std::vector<double>(values.data_ptr<double>(), values.data_ptr<double>() + n);
}

// A group vector argument (group_scale / group_norms) as doubles, or nullopt.
inline std::optional<std::vector<double>> read_group_vector(const std::optional<at::Tensor>& v, int64_t ngroups,
                                                     const char* name) {
  if (!v.has_value()) return std::nullopt;
  TORCH_CHECK(v->device().is_cpu() && v->dim() == 1 && v->size(0) == ngroups, "fastreg_cpu: ", name,
              " must be a (", ngroups, ",) CPU tensor, got shape ", v->sizes(), " on ", v->device());
  const at::Tensor values = v->to(at::kDouble).contiguous();
  return std::vector<double>(values.data_ptr<double>(), values.data_ptr<double>() + ngroups);
}

// The operands of a call, once the layouts are settled.
struct Prepared {
  std::vector<Item> items;
  std::vector<const void*> w;       // what is read as w
  std::vector<const void*> c;       // what is read as c (nullptr without centers)
  std::vector<void*> out;           // what is written (grads: outputs; add_grad_: gradients; prox_: w)
  std::vector<at::Tensor> keep;     // temporaries alive for the call
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (destination, temporary)
  int64_t ngroups = 0;
  Schedule schedule;
};

// Fills items / w / c for params (with centers) and their group geometry; `read[k]` is the
// tensor actually read as params[k] (dense).
inline void add_items(Prepared& p, at::TensorList params, at::TensorList centers, int64_t group_dim,
               std::vector<at::Tensor>& read) {
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& wv = read[k];
    Item it;
    it.numel = wv.numel();
    if (group_dim >= 0 && wv.dim() >= 2) {
      const int64_t groups = wv.size(group_dim);
      it.group_base = p.ngroups;
      p.ngroups += groups;
      if (it.numel > 0) {
        it.G = groups;
        if (groups <= 1) {
          it.A = 1;
          it.K = it.numel;
        } else {
          it.K = wv.stride(group_dim);
          it.A = it.numel / (groups * it.K);
        }
      }
    }
    p.items.push_back(it);
    p.w.push_back(it.numel ? wv.const_data_ptr() : nullptr);
    if (centers.empty()) {
      p.c.push_back(nullptr);
    } else if (!it.numel) {
      p.c.push_back(nullptr);
    } else if (direct(centers[k]) && same_layout(centers[k], wv)) {
      p.c.push_back(centers[k].const_data_ptr());
    } else {
      p.keep.push_back(copy_like(centers[k], wv));
      p.c.push_back(p.keep.back().const_data_ptr());
    }
  }
}

// The dense tensor read as w: the param itself, or a copy laid out like empty_like(param).
inline at::Tensor readable(const at::Tensor& t, Prepared& p) {
  if (direct(t)) return t;
  at::Tensor tmp = at::empty_like(t);
  tmp.copy_(t);
  p.keep.push_back(tmp);
  return tmp;
}

template <typename T>
std::vector<T*> typed(const std::vector<void*>& v) {
  std::vector<T*> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = static_cast<T*>(v[k]);
  return out;
}

template <typename T>
std::vector<const T*> typed(const std::vector<const void*>& v) {
  std::vector<const T*> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = static_cast<const T*>(v[k]);
  return out;
}

// (Σ|s|, Σs², Σ_g‖s_g‖, group_sq) from task partials and slots.
inline std::tuple<at::Tensor, at::Tensor> finish_sums(const Prepared& p, const std::vector<double>& partials,
                                               const std::vector<double>& slots, at::ScalarType dtype) {
  double a = 0.0, s = 0.0;
  for (size_t t = 0; t < p.schedule.tasks.size(); ++t) {  // fixed order
    a += partials[2 * t];
    s += partials[2 * t + 1];
  }
  std::vector<double> group_sq(p.ngroups, 0.0);
  add_slots(p.schedule, p.items, slots, group_sq);
  double norms = 0.0;
  for (double v : group_sq) norms += std::sqrt(v);  // fixed order
  const auto options = at::TensorOptions().dtype(acc_type(dtype)).device(at::kCPU);
  at::Tensor out = at::empty({3}, options);
  at::Tensor groups = at::empty({p.ngroups}, options);
  if (out.scalar_type() == at::kDouble) {
    double* o = out.data_ptr<double>();
    o[0] = a;
    o[1] = s;
    o[2] = norms;
    std::copy(group_sq.begin(), group_sq.end(), groups.data_ptr<double>());
  } else {
    float* o = out.data_ptr<float>();
    o[0] = static_cast<float>(a);
    o[1] = static_cast<float>(s);
    o[2] = static_cast<float>(norms);
    float* g = groups.data_ptr<float>();
    for (int64_t i = 0; i < p.ngroups; ++i) g[i] = static_cast<float>(group_sq[i]);
  }
  return {out, groups};
}

template <typename T, bool kCenter>
auto diff_loaders(const std::vector<const T*>& w, const std::vector<const T*>& c) {
  return [&w, &c](int64_t item) { return Diff<T, kCenter>{w[item], kCenter ? c[item] : nullptr}; };
}

// The sums pass over (a subset of) the schedule: of d, or of the shrunk values (kShrink).
template <typename T, bool kCenter, bool kShrink>
void run_sums(const Prepared& p, double thr, std::vector<double>& partials, std::vector<double>& slots,
              const std::vector<bool>* only_items = nullptr) {
  using O = typename Traits<T>::opmath;
  const auto w = typed<T>(p.w);
  const auto c = typed<T>(p.c);
  partials.resize(2 * p.schedule.tasks.size(), 0.0);
  slots.resize(p.schedule.nslots, 0.0);
  if constexpr (kShrink) {
    const Vectorized<O> t(static_cast<O>(thr));
    auto loader_of = [&](int64_t item) {
      return Shrunk<T, kCenter>{Diff<T, kCenter>{w[item], kCenter ? c[item] : nullptr}, t};
    };
    sums_tasks<T, Shrunk<T, kCenter>>(p.schedule, p.items, loader_of, partials.data(), slots.data(), only_items);
  } else {
    sums_tasks<T, Diff<T, kCenter>>(p.schedule, p.items, diff_loaders<T, kCenter>(w, c), partials.data(),
                                    slots.data(), only_items);
  }
}

// The per-group coefficients of an in-place update (add_grad_, prox_), before it runs.
//   group_coef[g]  the coefficient of d for group g (from `per_group(norm)`), for every group
//                  whose norm is given or spans tasks; in-task groups are computed by the update.
//   precomputed[k] item k's sums already came from this first pass (partials and slots written).
// Without given norms, the items whose groups span tasks get a first sums pass (kShrink: of the
// shrunk values, for prox_) over their tasks only, into `partials` / `slots`.
struct GroupCoefs {
  std::vector<double> group_coef;
  std::vector<bool> precomputed;
};

template <typename T, bool kCenter, bool kShrink, typename PerGroup>
GroupCoefs group_coefs(const Prepared& p, double thr, const PerGroup& per_group,
                       const std::optional<std::vector<double>>& given_norms, std::vector<double>& partials,
                       std::vector<double>& slots) {
  GroupCoefs out{std::vector<double>(p.ngroups, 0.0), std::vector<bool>(p.items.size(), false)};
  if (given_norms.has_value()) {
    for (int64_t g = 0; g < p.ngroups; ++g) out.group_coef[g] = per_group((*given_norms)[g]);
    return out;
  }
  bool any = false;
  for (size_t k = 0; k < p.items.size(); ++k) {
    out.precomputed[k] = p.items[k].G > 0 && !p.items[k].whole_groups;
    any = any || out.precomputed[k];
  }
  if (!any) return out;
  run_sums<T, kCenter, kShrink>(p, thr, partials, slots, &out.precomputed);
  std::vector<double> group_sq(p.ngroups, 0.0);
  add_slots(p.schedule, p.items, slots, group_sq, &out.precomputed);
  for (size_t k = 0; k < p.items.size(); ++k) {
    const Item& it = p.items[k];
    if (!out.precomputed[k]) continue;
    for (int64_t g = 0; g < it.G; ++g) {
      out.group_coef[it.group_base + g] = per_group(std::sqrt(group_sq[it.group_base + g]));
    }
  }
  return out;
}

}  // namespace detail

// The ops (one translation unit each, compiled in parallel; registered in library.cpp).
std::tuple<at::Tensor, at::Tensor> sums(at::TensorList params, at::TensorList centers, int64_t group_dim,
                                        double threshold);
std::vector<at::Tensor> grads(at::TensorList params, at::TensorList centers, int64_t group_dim,
                              const at::Tensor& coeffs, const std::optional<at::Tensor>& group_scale);
std::tuple<at::Tensor, at::Tensor> add_grad_(at::TensorList params, at::TensorList grads_, at::TensorList centers,
                                             int64_t group_dim, const at::Tensor& coeffs,
                                             const std::optional<at::Tensor>& group_norms);
void prox_(at::TensorList params, at::TensorList centers, int64_t group_dim, const at::Tensor& coeffs,
           const std::optional<at::Tensor>& group_norms);

}  // namespace fastreg_cpu
