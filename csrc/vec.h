// vec.h: the ISA layer. What the rest of the kernels need to know about the vector unit the
// build targets (CPU_CAPABILITY_AVX512 / _AVX2 / DEFAULT, with the matching -m flags from
// fastreg/backends/_build.py): vector widths, how many independent accumulators the hot loops
// keep, float -> double widening, and `pin`, a register hint. Everything above this header is
// written against at::vec::Vectorized<T> and these few names: a new ISA starts here.
//
// Tails use the masked loadu(ptr, count) / store(ptr, count) of Vectorized<T>, so the same
// arithmetic handles every element (span.h).

#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstdint>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace fastreg_cpu {
namespace detail {

using at::vec::Vectorized;

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

}  // namespace detail
}  // namespace fastreg_cpu
