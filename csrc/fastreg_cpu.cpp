// fastreg C++ CPU backend: fused multi-tensor L1/L2 kernels.
//
// Ops (namespace fastreg_cpu, registered with TORCH_LIBRARY; no pybind module):
//   sums(Tensor[] params) -> Tensor                          [Σ|w|, Σw²] in the acc dtype
//   grads(Tensor[] params, Tensor coeffs) -> Tensor[]        c1*sign(w) + 2*c2*w, fresh tensors
//   add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor coeffs) -> Tensor
//                                                            g += gradient; returns sums(params)
//   prox_(Tensor(a!)[] params, Tensor coeffs) -> ()          w = sign(w)*max(|w|-c1,0)/c2
//
// Work layout. The non-empty tensors of one call are laid end to end (int64 prefix offsets) and
// the concatenation is cut into fixed chunks of kChunk elements, so a chunk may span many small
// tensors and a large tensor spans many chunks. at::parallel_for runs the chunks; every chunk
// writes its own partial sums, and the partials are added in chunk order on the calling
// thread. A chunk's arithmetic depends only on the tensor sizes, never on the thread that runs
// it, so results are bitwise identical for any thread count. (at::parallel_for is a header
// template: the extension must be compiled with -fopenmp, else it silently runs serially.)
//
// Accuracy. fp64 params accumulate in fp64. fp32 / fp16 / bf16 params accumulate in two
// levels: float vector accumulators over short blocks (4 values per lane), folded pairwise
// and widened into double accumulators (see "Accumulation" below): the relative error is at
// most ~7 float roundings (4e-7) in the worst case, ~1e-9 in practice, with almost the
// speed of a plain float sum. Chunk partials are doubles, summed in chunk order; the result
// is rounded once to the acc dtype.
//
// Vectorization. Inner loops use at::vec::Vectorized<T> (the width chosen by the
// CPU_CAPABILITY_* macro the Python side passes with the matching -m flags). Tails use the
// masked loadu(ptr, count) / store(ptr, count), so the same arithmetic handles every element.
//
// Layout. A tensor that is non-overlapping and dense (contiguous, transposed, channels-last,
// ...) occupies exactly [data_ptr, data_ptr + numel) and is processed in memory order. Anything
// else (slices, expanded tensors) is read through a dense temporary; in-place ops then copy the
// temporary back explicitly. Gradients of add_grad_ are used directly when their strides
// match the parameter's, otherwise through a temporary in the parameter's layout.

#include <ATen/Dispatch.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <cstdint>
#include <vector>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastreg_cpu {
namespace {

using at::vec::Vectorized;

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per chunk (work unit and partial)

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

// Runs `elem(i, count, x)` on every step of w[0, n) (x: the loaded opmath vectors; elem may
// store results) and, when kReduce, accumulates the loaded values into `acc`. The assignment
// of elements to accumulators depends only on n: deterministic for any thread count.
template <typename T, bool kReduce, typename Elem>
inline void span(const T* w, int64_t n, Acc<T>& acc, const Elem& elem) {
  using Tr = Traits<T>;
  using O = typename Tr::opmath;
  constexpr int64_t kStep = Tr::kStep;
  constexpr int kM = Tr::kM;
  int64_t i = 0;
  if constexpr (!kReduce) {  // element-wise only: one step at a time, the last one masked
    for (; i + kStep <= n; i += kStep) {
      Vectorized<O> x[kM];
      Tr::load(w + i, x);
      elem(i, kStep, x);
    }
    if (i < n) {
      Vectorized<O> x[kM];
      Tr::load(w + i, n - i, x);
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
        Tr::load(w + i + u * kStep, x);
        elem(i + u * kStep, kStep, x);
        a[u] = a[u] + x[0].abs();
        q[u] = at::vec::fmadd(x[0], x[0], q[u]);
      }
    }
    for (; i < n; i += kStep) {
      const int64_t cnt = std::min<int64_t>(kStep, n - i);
      Vectorized<double> x[1];
      if (cnt == kStep) {
        Tr::load(w + i, x);
      } else {
        Tr::load(w + i, cnt, x);  // zero-filled: adds nothing to the sums
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
        Tr::load(w + at, x);
      } else {
        Tr::load(w + at, cnt, x);  // zero-filled: adds nothing to the sums
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

// The element-wise maths, in opmath.
template <typename O>
inline Vectorized<O> gradient(const Vectorized<O>& w, const Vectorized<O>& c1, const Vectorized<O>& two_c2) {
  const Vectorized<O> zero(O(0));
  // c1 * sign(w), sign(0) = 0 (NaN gives 0 here and NaN from the fmadd below)
  const Vectorized<O> s = Vectorized<O>::blendv(
      Vectorized<O>::blendv(zero, c1.neg(), w < zero), c1, w > zero);
  return at::vec::fmadd(two_c2, w, s);  // rounded once
}

template <typename O>
inline Vectorized<O> shrink(const Vectorized<O>& w, const Vectorized<O>& thr, const Vectorized<O>& den) {
  const Vectorized<O> zero(O(0));
  const Vectorized<O> r = at::vec::maximum(w.abs() - thr, zero);  // NaN propagates
  return Vectorized<O>::blendv(r, r.neg(), w < zero) / den;
}

// ----------------------------------------------------------------------------------------
// Multi-tensor plumbing.

// prefix[k] = elements before item k; prefix.back() = total.
struct Layout {
  std::vector<int64_t> prefix{0};
  int64_t total() const { return prefix.back(); }
  int64_t items() const { return static_cast<int64_t>(prefix.size()) - 1; }
  int64_t chunks() const { return (total() + kChunk - 1) / kChunk; }
  void add(int64_t n) { prefix.push_back(prefix.back() + n); }
};

// fn(chunk) for every chunk, in parallel.
template <typename Fn>
void parallel_chunks(const Layout& layout, const Fn& fn) {
  const int64_t nchunks = layout.chunks();
  auto body = [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) fn(c);
  };
  if (nchunks <= 1) {
    body(0, nchunks);
  } else {
    at::parallel_for(0, nchunks, 1, body);
  }
}

// seg(item, offset, length) for every piece of `chunk`, in order.
template <typename Seg>
inline void for_each_segment(const Layout& layout, int64_t chunk, const Seg& seg) {
  const auto& prefix = layout.prefix;
  const int64_t start = chunk * kChunk;
  const int64_t end = std::min(start + kChunk, layout.total());
  // Last item whose start <= `start` (empty items were never added, so starts are strict).
  int64_t item = static_cast<int64_t>(std::upper_bound(prefix.begin(), prefix.end(), start) -
                                      prefix.begin()) - 1;
  for (; item < layout.items() && prefix[item] < end; ++item) {
    const int64_t lo = std::max(start, prefix[item]);
    const int64_t hi = std::min(end, prefix[item + 1]);
    if (hi > lo) seg(item, lo - prefix[item], hi - lo);
  }
}

inline bool direct(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && !t.is_neg();
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

// A dense copy of `t` laid out like at::empty_like(t).
inline at::Tensor dense_copy(const at::Tensor& t) {
  at::Tensor tmp = at::empty_like(t);
  tmp.copy_(t);
  return tmp;
}

at::ScalarType check_group(at::TensorList params, const char* op) {
  TORCH_CHECK(!params.empty(), "fastreg_cpu::", op, ": params must not be empty");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastreg_cpu::", op, ": unsupported dtype ", dtype);
  for (const auto& p : params) {
    TORCH_CHECK(p.device().is_cpu(), "fastreg_cpu::", op, ": expected CPU tensors, got ", p.device());
    TORCH_CHECK(p.scalar_type() == dtype, "fastreg_cpu::", op, ": all params must share one dtype, got ",
                dtype, " and ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided, "fastreg_cpu::", op, ": expected strided tensors");
  }
  return dtype;
}

inline at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// coeffs: a (2,) tensor of the acc dtype on the CPU.
template <typename O>
void read_coeffs(const at::Tensor& coeffs, at::ScalarType dtype, O* out) {
  TORCH_CHECK(coeffs.device().is_cpu() && coeffs.dim() == 1 && coeffs.size(0) == 2,
              "fastreg_cpu: coeffs must be a (2,) CPU tensor, got shape ", coeffs.sizes(), " on ",
              coeffs.device());
  TORCH_CHECK(coeffs.scalar_type() == acc_type(dtype), "fastreg_cpu: coeffs must be ", acc_type(dtype),
              " for ", dtype, " params, got ", coeffs.scalar_type());
  const auto c = coeffs.accessor<O, 1>();
  out[0] = c[0];
  out[1] = c[1];
}

at::Tensor finish_sums(const std::vector<double>& partials, int64_t nchunks, at::ScalarType dtype) {
  double a = 0.0, s = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {  // fixed order
    a += partials[2 * c];
    s += partials[2 * c + 1];
  }
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(acc_type(dtype)).device(at::kCPU));
  if (out.scalar_type() == at::kDouble) {
    out.data_ptr<double>()[0] = a;
    out.data_ptr<double>()[1] = s;
  } else {
    out.data_ptr<float>()[0] = static_cast<float>(a);
    out.data_ptr<float>()[1] = static_cast<float>(s);
  }
  return out;
}

// ----------------------------------------------------------------------------------------
// Kernels: one function per op and dtype, over all chunks of a call.

template <typename T>
C10_NOINLINE void sums_kernel(const Layout& layout, const std::vector<const T*>& w, double* partials) {
  auto none = [](int64_t, int64_t, const Vectorized<typename Traits<T>::opmath>*) {};
  parallel_chunks(layout, [&](int64_t c) {
    Acc<T> acc;
    for_each_segment(layout, c, [&](int64_t item, int64_t off, int64_t len) {
      span<T, true>(w[item] + off, len, acc, none);
    });
    acc.finish(partials + 2 * c);
  });
}

template <typename T>
C10_NOINLINE void grads_kernel(const Layout& layout, const std::vector<const T*>& w,
                               const std::vector<T*>& out, const typename Traits<T>::opmath* coeffs) {
  using O = typename Traits<T>::opmath;
  const Vectorized<O> c1(coeffs[0]);
  const Vectorized<O> two_c2(O(2) * coeffs[1]);
  parallel_chunks(layout, [&](int64_t c) {
    Acc<T> acc;  // unused
    for_each_segment(layout, c, [&](int64_t item, int64_t off, int64_t len) {
      T* dst = out[item] + off;
      span<T, false>(w[item] + off, len, acc, [&](int64_t i, int64_t n, const Vectorized<O>* x) {
        Vectorized<O> g[Traits<T>::kM];
        for (int m = 0; m < Traits<T>::kM; ++m) g[m] = gradient(x[m], c1, two_c2);
        if (n == Traits<T>::kStep) {
          Traits<T>::store(dst + i, g);
        } else {
          Traits<T>::store(dst + i, n, g);
        }
      });
    });
  });
}

template <typename T>
C10_NOINLINE void add_grad_kernel(const Layout& layout, const std::vector<const T*>& w,
                                  const std::vector<T*>& grad, const typename Traits<T>::opmath* coeffs,
                                  double* partials) {
  using O = typename Traits<T>::opmath;
  const Vectorized<O> c1(coeffs[0]);
  const Vectorized<O> two_c2(O(2) * coeffs[1]);
  parallel_chunks(layout, [&](int64_t c) {
    Acc<T> acc;
    for_each_segment(layout, c, [&](int64_t item, int64_t off, int64_t len) {
      T* g = grad[item] + off;
      span<T, true>(w[item] + off, len, acc, [&](int64_t i, int64_t n, const Vectorized<O>* x) {
        constexpr int kM = Traits<T>::kM;
        Vectorized<O> cur[kM];
        if (n == Traits<T>::kStep) {
          Traits<T>::load(g + i, cur);
        } else {
          Traits<T>::load(g + i, n, cur);
        }
        for (int m = 0; m < kM; ++m) cur[m] = cur[m] + gradient(x[m], c1, two_c2);
        if (n == Traits<T>::kStep) {
          Traits<T>::store(g + i, cur);
        } else {
          Traits<T>::store(g + i, n, cur);
        }
      });
    });
    acc.finish(partials + 2 * c);
  });
}

template <typename T>
C10_NOINLINE void prox_kernel(const Layout& layout, const std::vector<T*>& w,
                              const typename Traits<T>::opmath* coeffs) {
  using O = typename Traits<T>::opmath;
  const Vectorized<O> thr(coeffs[0]);
  const Vectorized<O> den(coeffs[1]);
  parallel_chunks(layout, [&](int64_t c) {
    Acc<T> acc;  // unused
    for_each_segment(layout, c, [&](int64_t item, int64_t off, int64_t len) {
      T* p = w[item] + off;
      span<T, false>(p, len, acc, [&](int64_t i, int64_t n, const Vectorized<O>* x) {
        Vectorized<O> r[Traits<T>::kM];
        for (int m = 0; m < Traits<T>::kM; ++m) r[m] = shrink(x[m], thr, den);
        if (n == Traits<T>::kStep) {
          Traits<T>::store(p + i, r);
        } else {
          Traits<T>::store(p + i, n, r);
        }
      });
    });
  });
}

// ----------------------------------------------------------------------------------------
// Ops.

at::Tensor sums(at::TensorList params) {
  const at::ScalarType dtype = check_group(params, "sums");
  Layout layout;
  std::vector<const void*> ptrs;
  std::vector<at::Tensor> temps;  // keeps dense copies of non-dense params alive
  ptrs.reserve(params.size());
  layout.prefix.reserve(params.size() + 1);
  for (const auto& p : params) {
    const int64_t n = p.numel();
    if (n == 0) continue;
    if (direct(p)) {
      ptrs.push_back(p.const_data_ptr());
    } else {
      temps.push_back(dense_copy(p));
      ptrs.push_back(temps.back().const_data_ptr());
    }
    layout.add(n);
  }
  const int64_t nchunks = layout.chunks();
  std::vector<double> partials(2 * nchunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::sums", [&] {
    std::vector<const scalar_t*> w(ptrs.size());
    for (size_t k = 0; k < ptrs.size(); ++k) w[k] = static_cast<const scalar_t*>(ptrs[k]);
    sums_kernel<scalar_t>(layout, w, partials.data());
  });
  return finish_sums(partials, nchunks, dtype);
}

std::vector<at::Tensor> grads(at::TensorList params, const at::Tensor& coeffs) {
  const at::ScalarType dtype = check_group(params, "grads");
  Layout layout;
  std::vector<const void*> src;
  std::vector<void*> dst;
  std::vector<at::Tensor> temps;
  std::vector<at::Tensor> outs;
  outs.reserve(params.size());
  for (const auto& p : params) {
    at::Tensor out = fresh_like(p);  // the layout of empty_like(p), as the fake impl promises
    outs.push_back(out);
    const int64_t n = p.numel();
    if (n == 0) continue;
    if (direct(p) && same_layout(p, out)) {
      src.push_back(p.const_data_ptr());
    } else {
      temps.push_back(dense_copy(p));  // empty_like(p) layout == out's layout
      TORCH_INTERNAL_ASSERT(same_layout(temps.back(), out));
      src.push_back(temps.back().const_data_ptr());
    }
    dst.push_back(out.data_ptr());
    layout.add(n);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::grads", [&] {
    using O = typename Traits<scalar_t>::opmath;
    O c[2];
    read_coeffs<O>(coeffs, dtype, c);
    std::vector<const scalar_t*> w(src.size());
    std::vector<scalar_t*> o(dst.size());
    for (size_t k = 0; k < src.size(); ++k) {
      w[k] = static_cast<const scalar_t*>(src[k]);
      o[k] = static_cast<scalar_t*>(dst[k]);
    }
    grads_kernel<scalar_t>(layout, w, o, c);
  });
  return outs;
}

at::Tensor add_grad_(at::TensorList params, at::TensorList grads_, const at::Tensor& coeffs) {
  const at::ScalarType dtype = check_group(params, "add_grad_");
  TORCH_CHECK(grads_.size() == params.size(), "fastreg_cpu::add_grad_: ", params.size(), " params but ",
              grads_.size(), " grads");
  Layout layout;
  std::vector<const void*> src;
  std::vector<void*> dst;
  std::vector<at::Tensor> temps;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original grad, temporary)
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& p = params[k];
    const at::Tensor& g = grads_[k];
    TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == dtype && g.layout() == at::kStrided,
                "fastreg_cpu::add_grad_: grads[", k, "] must be a strided CPU ", dtype, " tensor");
    TORCH_CHECK(g.sizes() == p.sizes(), "fastreg_cpu::add_grad_: grads[", k, "] has shape ", g.sizes(),
                ", params[", k, "] has ", p.sizes());
    const int64_t n = p.numel();
    if (n == 0) continue;
    const at::Tensor* wv = &p;
    if (!direct(p)) {
      temps.push_back(dense_copy(p));
      wv = &temps.back();
    }
    src.push_back(wv->const_data_ptr());
    if (direct(g) && same_layout(g, *wv)) {
      dst.push_back(g.data_ptr());
    } else {
      at::Tensor tmp = at::empty_like(*wv);  // dense, same strides as *wv
      tmp.copy_(g);
      dst.push_back(tmp.data_ptr());
      copy_back.emplace_back(g, tmp);
    }
    layout.add(n);
  }
  const int64_t nchunks = layout.chunks();
  std::vector<double> partials(2 * nchunks);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::add_grad_", [&] {
    using O = typename Traits<scalar_t>::opmath;
    O c[2];
    read_coeffs<O>(coeffs, dtype, c);
    std::vector<const scalar_t*> w(src.size());
    std::vector<scalar_t*> o(dst.size());
    for (size_t k = 0; k < src.size(); ++k) {
      w[k] = static_cast<const scalar_t*>(src[k]);
      o[k] = static_cast<scalar_t*>(dst[k]);
    }
    add_grad_kernel<scalar_t>(layout, w, o, c, partials.data());
  });
  for (auto& gt : copy_back) gt.first.copy_(gt.second);  // explicit write into the real grad
  return finish_sums(partials, nchunks, dtype);
}

void prox_(at::TensorList params, const at::Tensor& coeffs) {
  const at::ScalarType dtype = check_group(params, "prox_");
  Layout layout;
  std::vector<void*> ptrs;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (original param, temporary)
  for (const auto& p : params) {
    const int64_t n = p.numel();
    if (n == 0) continue;
    if (direct(p)) {
      ptrs.push_back(p.data_ptr());
    } else {
      at::Tensor tmp = dense_copy(p);
      ptrs.push_back(tmp.data_ptr());
      copy_back.emplace_back(p, tmp);
    }
    layout.add(n);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::prox_", [&] {
    using O = typename Traits<scalar_t>::opmath;
    O c[2];
    read_coeffs<O>(coeffs, dtype, c);
    std::vector<scalar_t*> w(ptrs.size());
    for (size_t k = 0; k < ptrs.size(); ++k) w[k] = static_cast<scalar_t*>(ptrs[k]);
    prox_kernel<scalar_t>(layout, w, c);
  });
  for (auto& pt : copy_back) pt.first.copy_(pt.second);  // explicit write into the real param
}

}  // namespace

TORCH_LIBRARY(fastreg_cpu, m) {
  m.set_python_module("fastreg.backends.cpu");  // where the fake (meta) impls live
  m.def("sums(Tensor[] params) -> Tensor");
  m.def("grads(Tensor[] params, Tensor coeffs) -> Tensor[]");
  m.def("add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor coeffs) -> Tensor");
  m.def("prox_(Tensor(a!)[] params, Tensor coeffs) -> ()");
}

TORCH_LIBRARY_IMPL(fastreg_cpu, CPU, m) {
  m.impl("sums", &sums);
  m.impl("grads", &grads);
  m.impl("add_grad_", &add_grad_);
  m.impl("prox_", &prox_);
}

}  // namespace fastreg_cpu
