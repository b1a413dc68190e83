// span.h: the vectorized loops over memory, for every dtype (traits.h) and every operand
// (terms.h: d = w - c, or the shrunk values). `span` walks one contiguous range, running an
// element-wise function on each step and, when asked, accumulating (Σ|x|, Σx²); `rows_sums`
// walks a block of rows of a (rows, row) view into per-position sums. Which ranges are walked,
// and by which task, is the schedule's business (schedule.h, passes.h).

#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "traits.h"

namespace fastreg_cpu {
namespace detail {

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
    constexpr int kGroups = 8;                        // groups per block: 8 values per lane
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

}  // namespace detail
}  // namespace fastreg_cpu
