// terms.h: the penalty's terms, as named data and as maths. With d = w - c (c the center, 0
// without one) and s = d, or the shrunk s = sign(d)·max(|d| - t, 0) of a proximal step:
//
//   Sum       the slots of the sums vector every sums / add_grad_ returns: [Σ|s|, Σs², Σ_g ‖s_g‖].
//   Gradient  the coefficients of grads / add_grad_: L1·sign(d) + 2·L2·d + GROUP·d_g/‖d_g‖.
//   Prox      the coefficients of prox_: THRESHOLD = lr·l1, DENOMINATOR = 1 + 2·lr·l2,
//             GROUP_THRESHOLD = lr·group.
//
// These enums mirror fastreg/backends/_terms.py (the one place that says what each slot means);
// fastreg_cpu::term_layout() (library.cpp) reports kSlots, and fastreg/backends/cpu.py checks
// it against _terms.py when the library loads. Then the maths: the operands (Diff, Shrunk),
// the element-wise formulas (gradient, soft_threshold) and, per op, what a pass does with d on
// one step (GradsOp, AddGradOp, ProxOp: the Op interface of apply_tasks, passes.h).
//
// Adding a term: a slot here and in _terms.py, its sum in span.h's accumulators and
// finish_sums (passes.h), its gradient / prox formula in the Op structs below.

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "traits.h"

namespace fastreg_cpu {

struct Sum {
  enum Slot : int { ABS = 0, SQUARE = 1, GROUP_NORM = 2 };
  static constexpr int kCount = 3;
};

struct Gradient {
  enum Slot : int { L1 = 0, L2 = 1, GROUP = 2 };
  static constexpr int kCount = 3;
};

struct Prox {
  enum Slot : int { THRESHOLD = 0, DENOMINATOR = 1, GROUP_THRESHOLD = 2 };
  static constexpr int kCount = 3;
};

// Every slot by name, as fastreg_cpu::term_layout() reports it ("Sum.ABS=0,...").
struct NamedSlot {
  const char* term;
  const char* name;
  int value;
};
constexpr NamedSlot kSlots[] = {
    {"Sum", "ABS", Sum::ABS},
    {"Sum", "SQUARE", Sum::SQUARE},
    {"Sum", "GROUP_NORM", Sum::GROUP_NORM},
    {"Gradient", "L1", Gradient::L1},
    {"Gradient", "L2", Gradient::L2},
    {"Gradient", "GROUP", Gradient::GROUP},
    {"Prox", "THRESHOLD", Prox::THRESHOLD},
    {"Prox", "DENOMINATOR", Prox::DENOMINATOR},
    {"Prox", "GROUP_THRESHOLD", Prox::GROUP_THRESHOLD},
};

// The accumulators (Acc::finish, rows_sums) and the task partials hold the first two sums as a
// pair in this order.
static_assert(Sum::ABS == 0 && Sum::SQUARE == 1, "the (Σ|s|, Σs²) pairs are laid out as Sum's first slots");

namespace detail {

constexpr int kPartial = 2;  // per-task partial sums: Sum::ABS, Sum::SQUARE

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

// ----------------------------------------------------------------------------------------
// Per op: the coefficients of a step and what is done with d on it (the Op interface of
// apply_tasks, passes.h).

// What grads and add_grad_ share: the gradient of a step, c1·sign(d) + coef·d, with coef = 2·c2
// on flat steps, and group norms taken of d itself. c1, c2 (and c3 below): the Gradient::L1,
// Gradient::L2 (and Gradient::GROUP) slots of coeffs.
template <typename T>
struct GradientOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kNormOfD = true;  // a norm visit's sums are the sums of d
  Vectorized<O> c1;
  O two_c2;
  O flat_coef() const { return two_c2; }
  template <typename D>
  D norm_loader(const D& d) const { return d; }
  C10_ALWAYS_INLINE void gradients(const Vectorized<O>* x, const Vectorized<O>* coef, Vectorized<O>* g) const {
    for (int m = 0; m < Traits<T>::kM; ++m) g[m] = gradient(x[m], c1, coef[m]);
  }
};

// grads: out = c1·sign(d) + coef·d, coef = 2·c2 (+ the group's scale).
template <typename T>
struct GradsOp : GradientOp<T> {
  using typename GradientOp<T>::O;
  static constexpr bool kReduce = false;
  std::vector<T*> out;
  O group_coef(double) const { return this->two_c2; }  // never in-task: the scale is given
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    Vectorized<O> g[Traits<T>::kM];
    this->gradients(x, coef, g);
    if (cnt == Traits<T>::kStep) {
      Traits<T>::store(out[item] + at, g);
    } else {
      Traits<T>::store(out[item] + at, cnt, g);
    }
  }
};

// add_grad_: g += c1·sign(d) + coef·d, coef = 2·c2 + c3/‖d_g‖ (0 for a zero group).
template <typename T>
struct AddGradOp : GradientOp<T> {
  using typename GradientOp<T>::O;
  static constexpr bool kReduce = true;
  double c3;
  GradKind kind;
  std::vector<void*> grad;
  O group_coef(double norm) const {
    return static_cast<O>(static_cast<double>(this->two_c2) + (norm > 0.0 ? c3 / norm : 0.0));
  }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    Vectorized<O> g[Traits<T>::kM];
    this->gradients(x, coef, g);
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
// with groups; w = c + s/den for the others (an IEEE division, as the formula says). t, den, c3:
// the Prox::THRESHOLD, Prox::DENOMINATOR, Prox::GROUP_THRESHOLD slots of coeffs.
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

}  // namespace detail
}  // namespace fastreg_cpu
