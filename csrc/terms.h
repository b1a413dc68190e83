// terms.h: the penalty's terms, as named data and as maths. With d = w - c (c the center, 0
// without one) and s = d, or the shrunk s = sign(d)·max(|d| - t, 0) of a proximal step
// (max(d - t, 0) for a tensor constrained to d >= 0):
//
//   Sum       the slots of the per-tensor sums every sums / add_grad_ returns (one row per
//             tensor): [Σ|s|, Σs², Σ_g ‖s_g‖].
//   Gradient  the coefficients of grads / add_grad_: L1·sign(d) + 2·L2·d + GROUP·d_g/‖d_g‖.
//   Prox      the coefficients of prox_: THRESHOLD = lr·l1, DENOMINATOR = 1 + 2·lr·l2,
//             GROUP_THRESHOLD = lr·group, and the constraints MIN_NORM, MAX_NORM (on each
//             group's norm) and NONNEG (1: d >= 0); the step is prox_group_factor below.
//
// Every coefficient operand is a table, one row per tensor of the call (Table): each item has
// its own coefficients, which the Op structs below keep per item and hand to the passes once
// per segment (a flat chunk's piece of one item, or a whole Runs / Rows task).
//
// These enums mirror fastreg/backends/_terms.py (the one place that says what each slot means);
// fastreg_cpu::term_layout() (library.cpp) reports kSlots, and fastreg/backends/cpu.py checks
// it against _terms.py when the library loads. Then the maths: the operands (Diff, Shrunk),
// the element-wise formulas (gradient, shrink) and, per op, what a pass does with d on one step
// (GradsOp, AddGradOp, ProxOp: the Op interface of apply_tasks, passes.h).
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
  enum Slot : int { THRESHOLD = 0, DENOMINATOR = 1, GROUP_THRESHOLD = 2, MIN_NORM = 3, MAX_NORM = 4, NONNEG = 5 };
  static constexpr int kCount = 6;
};

// The columns of a metric table (prox_ in a metric, metric_prox.cpp): D = sqrt((v - m²)·SCALE) + EPS,
// or v (ROOT = 0), or 1 (IDENTITY = 1); m given where CENTERED = 1.
struct MetricSlot {
  enum Slot : int { SCALE = 0, EPS = 1, ROOT = 2, IDENTITY = 3, CENTERED = 4 };
  static constexpr int kCount = 5;
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
    {"Prox", "MIN_NORM", Prox::MIN_NORM},
    {"Prox", "MAX_NORM", Prox::MAX_NORM},
    {"Prox", "NONNEG", Prox::NONNEG},
    {"MetricSlot", "SCALE", MetricSlot::SCALE},
    {"MetricSlot", "EPS", MetricSlot::EPS},
    {"MetricSlot", "ROOT", MetricSlot::ROOT},
    {"MetricSlot", "IDENTITY", MetricSlot::IDENTITY},
    {"MetricSlot", "CENTERED", MetricSlot::CENTERED},
};

// The accumulators (Acc::finish, rows_sums) and the partials hold the first two sums as a pair
// in this order.
static_assert(Sum::ABS == 0 && Sum::SQUARE == 1, "the (Σ|s|, Σs²) pairs are laid out as Sum's first slots");

// A coefficient table as doubles (prepare.h reads it): row `item` holds the Gradient or Prox
// slots of that tensor of the call.
struct Table {
  std::vector<double> values;  // row-major, `width` values per row
  int64_t width = 0;
  double operator()(int64_t item, int slot) const { return values[item * width + slot]; }
};

// The factor on the shrunk s of one group, given n = ‖s_g‖: clip((n - t3)/den, lo, hi) / n, 0 for
// n = 0 (fastreg/backends/_terms.py prox_group_factor, where the maths is). Written as
// max(0, 1 - t3/n)/den bounded by lo/n and hi/n, so that without constraints (lo = 0, hi = inf)
// it is bitwise the unconstrained step.
inline double prox_group_factor(double n, double t3, double den, double lo, double hi) {
  if (!(n > 0.0)) return 0.0;
  const double base = std::max(0.0, 1.0 - t3 / n) / den;
  return std::min(std::max(base, lo / n), hi / n);
}

namespace detail {

constexpr int kPartial = 2;  // partial sums per task or segment: Sum::ABS, Sum::SQUARE

// All lanes' bits set (`on`) or all clear: a blend mask that is constant over a segment.
template <typename O>
C10_ALWAYS_INLINE Vectorized<O> lanes(bool on) {
  const Vectorized<O> zero(O(0));
  return on ? zero == zero : zero != zero;
}

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

// |s|: max(|d| - thr, 0), or max(d - thr, 0) where `signed_` is clear (a NONNEG item: only the
// positive part survives the constraint d >= 0). One blend instead of a branch per item kind,
// so that a flat chunk mixing both kinds runs one loop. NaN propagates (a diverged weight is not
// silently zeroed).
template <typename O>
C10_ALWAYS_INLINE Vectorized<O> shrunk_magnitude(const Vectorized<O>& d, const Vectorized<O>& thr,
                                                 const Vectorized<O>& signed_) {
  const Vectorized<O> x = Vectorized<O>::blendv(d, d.abs(), signed_);
  return at::vec::maximum(x - thr, Vectorized<O>(O(0)));
}

// s: the magnitude with d's sign, or positive for a NONNEG item (its negative d give +0).
template <typename O>
C10_ALWAYS_INLINE Vectorized<O> shrink(const Vectorized<O>& d, const Vectorized<O>& thr, const Vectorized<O>& signed_) {
  const Vectorized<O> r = shrunk_magnitude(d, thr, signed_);
  return Vectorized<O>::blendv(r, r.neg(), (d < Vectorized<O>(O(0))) & signed_);
}

// The loader of |s| for one item (all the sums of shrunk values need).
template <typename T, bool kCenter>
struct Shrunk {
  using O = typename Traits<T>::opmath;
  static constexpr int kM = Traits<T>::kM;
  Diff<T, kCenter> d;
  Vectorized<O> thr;
  Vectorized<O> signed_;  // lanes(!NONNEG)
  C10_ALWAYS_INLINE void load(int64_t i, Vectorized<O>* x) const {
    d.load(i, x);
    for (int m = 0; m < kM; ++m) x[m] = shrunk_magnitude(x[m], thr, signed_);
  }
  C10_ALWAYS_INLINE void load(int64_t i, int64_t n, Vectorized<O>* x) const {
    d.load(i, n, x);
    for (int m = 0; m < kM; ++m) x[m] = shrunk_magnitude(x[m], thr, signed_);
  }
};

// Item `item`'s shrunk loader from the THRESHOLD and NONNEG slots of its row of a Prox table.
template <typename T, bool kCenter>
Shrunk<T, kCenter> shrunk_of(const Diff<T, kCenter>& d, const Table& k, int64_t item) {
  using O = typename Traits<T>::opmath;
  return {d, Vectorized<O>(static_cast<O>(k(item, Prox::THRESHOLD))), lanes<O>(k(item, Prox::NONNEG) == 0.0)};
}

// ----------------------------------------------------------------------------------------
// Per op: the coefficients of each item and what is done with d on a step (the Op interface of
// apply_tasks, passes.h):
//   Seg segment(item)            the item's coefficients as vectors, formed once per segment
//                                (each piece of a flat chunk, each Runs / Rows task)
//   O flat_coef(item)            the coefficient of d on an item without groups
//   O group_coef(item, norm)     the coefficient of d on a group of that norm
//   norm_loader(item, d)         what a group's norm is taken of (d, or the shrunk values)
//   elem<kFlat>(seg, item, at, cnt, x, coef)   the update of one step

// What grads and add_grad_ share: the gradient of a step, c1·sign(d) + coef·d, with coef = 2·c2
// on flat steps, and group norms taken of d itself. c1, c2 (and c3 below): the Gradient::L1,
// Gradient::L2 (and Gradient::GROUP) slots of the item's row of the table.
template <typename T>
struct GradientOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kNormOfD = true;  // a norm visit's sums are the sums of d
  const Table& k;
  struct Seg {
    Vectorized<O> c1;
  };
  Seg segment(int64_t item) const { return {Vectorized<O>(static_cast<O>(k(item, Gradient::L1)))}; }
  O two_c2(int64_t item) const { return static_cast<O>(2.0 * k(item, Gradient::L2)); }
  O flat_coef(int64_t item) const { return two_c2(item); }
  template <typename D>
  D norm_loader(int64_t, const D& d) const { return d; }
  C10_ALWAYS_INLINE void gradients(const Seg& seg, const Vectorized<O>* x, const Vectorized<O>* coef,
                                   Vectorized<O>* g) const {
    for (int m = 0; m < Traits<T>::kM; ++m) g[m] = gradient(x[m], seg.c1, coef[m]);
  }
};

// grads: out = c1·sign(d) + coef·d, coef = 2·c2 (+ the group's scale).
template <typename T>
struct GradsOp : GradientOp<T> {
  using typename GradientOp<T>::O;
  using typename GradientOp<T>::Seg;
  static constexpr bool kReduce = false;
  std::vector<T*> out;
  O group_coef(int64_t item, double) const { return this->two_c2(item); }  // never in-task: the scale is given
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(const Seg& seg, int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    Vectorized<O> g[Traits<T>::kM];
    this->gradients(seg, x, coef, g);
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
  using typename GradientOp<T>::Seg;
  static constexpr bool kReduce = true;
  GradKind kind;
  std::vector<void*> grad;
  O group_coef(int64_t item, double norm) const {
    const double c3 = this->k(item, Gradient::GROUP);
    return static_cast<O>(2.0 * this->k(item, Gradient::L2) + (norm > 0.0 ? c3 / norm : 0.0));
  }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(const Seg& seg, int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    Vectorized<O> g[Traits<T>::kM];
    this->gradients(seg, x, coef, g);
    void* target = grad[item];
    switch (kind) {
      case GradKind::kFloat: add_into<T, float>(static_cast<float*>(target) + at, cnt, g); break;
      case GradKind::kDouble: add_into<T, double>(static_cast<double*>(target) + at, cnt, g); break;
      case GradKind::kHalf: add_into<T, at::Half>(static_cast<at::Half*>(target) + at, cnt, g); break;
      case GradKind::kBFloat16: add_into<T, at::BFloat16>(static_cast<at::BFloat16*>(target) + at, cnt, g); break;
    }
  }
};

// prox_: w = c + s·f with s = shrink(d) and f = prox_group_factor(‖s_g‖, ...) for items with
// groups; w = c + s/den for the others (an IEEE division, as the formula says). The item's row
// of the Prox table gives t (THRESHOLD), den (DENOMINATOR), NONNEG and the factor's slots.
template <typename T, bool kCenter>
struct ProxOp {
  using O = typename Traits<T>::opmath;
  static constexpr bool kReduce = false;
  static constexpr bool kNormOfD = false;
  const Table& k;
  std::vector<T*> w;
  std::vector<const T*> c;
  struct Seg {
    Vectorized<O> thr;
    Vectorized<O> den;
    Vectorized<O> signed_;  // lanes(!NONNEG)
  };
  Seg segment(int64_t item) const {
    return {Vectorized<O>(static_cast<O>(k(item, Prox::THRESHOLD))),
            Vectorized<O>(static_cast<O>(k(item, Prox::DENOMINATOR))), lanes<O>(k(item, Prox::NONNEG) == 0.0)};
  }
  O flat_coef(int64_t) const { return O(0); }  // unused: flat steps divide
  O group_coef(int64_t item, double norm) const {
    return static_cast<O>(prox_group_factor(norm, k(item, Prox::GROUP_THRESHOLD), k(item, Prox::DENOMINATOR),
                                            k(item, Prox::MIN_NORM), k(item, Prox::MAX_NORM)));
  }
  Shrunk<T, kCenter> norm_loader(int64_t item, const Diff<T, kCenter>& d) const { return shrunk_of(d, k, item); }
  template <bool kFlat>
  C10_ALWAYS_INLINE void elem(const Seg& seg, int64_t item, int64_t at, int64_t cnt, const Vectorized<O>* x,
                              const Vectorized<O>* coef) const {
    using Tr = Traits<T>;
    constexpr int kM = Tr::kM;
    Vectorized<O> r[kM];
    for (int m = 0; m < kM; ++m) {
      const Vectorized<O> s = shrink(x[m], seg.thr, seg.signed_);
      r[m] = kFlat ? s / seg.den : s * coef[m];
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
