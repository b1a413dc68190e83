// fastreg_cpu::metric_prox_: the proximal step in a diagonal metric D per tensor (an optimizer's
// preconditioner: Adam's sqrt(v̂) + eps), in place, with exact zeros (see fastreg_cpu.h, and the
// contract in fastreg/backends/__init__.py; the torch backend's _metric_prox is the reference).
//
// With y = w - c, per element D (terms.h metric_d), u = sign(y)·max(D|y| - t1, 0) (NONNEG:
// max(D·y - t1, 0)) and a = D + den - 1:
//   no groups: x = u / a, one pass reading w, c, v (and RMSprop's m) and writing w;
//   a group:   x = 0 when ‖u_g‖ <= t3, else x = u / (a + μ), μ the root of μ·‖u/(a + μ)‖ = t3
//              (0 without a group term), raised to the root of ‖u/(a + μ)‖ = hi where the norm
//              is over MAX_NORM; where it is under MIN_NORM = lo (or the group would be zero),
//              x = u / ((a - min a) + σ) with σ the root of ‖u/((a - min a) + σ)‖ = lo, or
//              in the hard case σ = 0 and the group's spread where a = min a (_terms.py says
//              why this is the exact step). One task per group: a pass for ‖u‖, min a and
//              max a, a few safeguarded Newton steps on the bracket (each a pass over the
//              group, which is in cache), then the pass that writes.
// Groups are computed in double (the root-finding), tensors without groups in the acc dtype
// (vectorized: span_loop), from the operands as stored (no copies of the optimizer's state when
// its layout matches the param's): a group's result depends on that group alone and a flat
// chunk's on its elements, so the step is bitwise the same for any thread count.

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

namespace {

// One tensor of the call as raw pointers, with its Prox row and metric row read once.
struct MetricItem {
  int64_t numel = 0, A = 1, G = 0, K = 0;  // G == 0: no groups (prepare.h geometry otherwise)
  void* w = nullptr;
  const void* c = nullptr;  // nullptr: no center
  const void* v = nullptr;  // nullptr: D = 1 (IDENTITY)
  const void* m = nullptr;  // nullptr: no running mean (CENTERED = 0)
  double t1 = 0, c2 = 0, t3 = 0, lo = 0, hi = 0, scale = 1, eps = 0;
  bool nonneg = false, root = true;
};

// One element's (u, a) from the stored operands: the formulas of the file's header.
template <typename T, typename V>
struct Element {
  const MetricItem& it;
  inline double y(int64_t i) const {
    const double w = static_cast<double>(static_cast<const T*>(it.w)[i]);
    return it.c == nullptr ? w : w - static_cast<double>(static_cast<const T*>(it.c)[i]);
  }
  inline double d(int64_t i) const {
    if (it.v == nullptr) return 1.0;
    double base = static_cast<double>(static_cast<const V*>(it.v)[i]);
    if (!it.root) return base;
    if (it.m != nullptr) {
      const double mean = static_cast<double>(static_cast<const V*>(it.m)[i]);
      base -= mean * mean;
    }
    return std::sqrt(base * it.scale) + it.eps;
  }
  // u and a of element i.
  inline void operator()(int64_t i, double& u, double& a) const {
    const double yi = y(i), di = d(i);
    const double magnitude = it.nonneg ? std::max(yi, 0.0) : std::abs(yi);
    const double shrunk = std::max(di * magnitude - it.t1, 0.0);
    u = (it.nonneg || yi >= 0.0) ? shrunk : -shrunk;
    a = di + it.c2;
  }
  inline void write(int64_t i, double x) const {
    const double c = it.c == nullptr ? 0.0 : static_cast<double>(static_cast<const T*>(it.c)[i]);
    // Rounded through the acc dtype as the other backends round (float for fp32/fp16/bf16).
    using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    static_cast<T*>(it.w)[i] = static_cast<T>(static_cast<Acc>(x + c));
  }
};

// fn(i) for every element of group g of an item, in memory order.
template <typename Fn>
inline void for_group(const MetricItem& it, int64_t g, const Fn& fn) {
  for (int64_t r = 0; r < it.A; ++r) {
    const int64_t start = (r * it.G + g) * it.K;
    for (int64_t i = start; i < start + it.K; ++i) fn(i);
  }
}

// The root of an increasing fn (value, slope) in [lower, upper]: Newton steps that stay inside
// the bracket, bisection otherwise, until the iterate stops moving (as _newton in torch.py).
template <typename Fn>
double newton(const Fn& fn, double lower, double upper) {
  constexpr int kIterations = 60;
  constexpr double kEps = std::numeric_limits<double>::epsilon();
  double x = (lower + upper) / 2;
  for (int k = 0; k < kIterations; ++k) {
    double value, slope;
    fn(x, value, slope);
    if (value < 0) lower = x;
    if (value > 0) upper = x;
    const double step = x - value / (slope > 0 ? slope : 1.0);
    const double next = (step > lower && step < upper && slope > 0) ? step : (lower + upper) / 2;
    if (std::abs(next - x) <= 4 * kEps * std::abs(next)) return next;
    x = next;
  }
  return x;
}

template <typename T, typename V>
void step_group(const MetricItem& it, int64_t g) {
  const Element<T, V> el{it};
  double norm_sq = 0.0, a_min = std::numeric_limits<double>::infinity(), a_max = -a_min;
  for_group(it, g, [&](int64_t i) {
    double u, a;
    el(i, u, a);
    norm_sq += u * u;
    a_min = std::min(a_min, a);
    a_max = std::max(a_max, a);
  });
  const double norm_u = std::sqrt(norm_sq);
  const bool zero = norm_u <= it.t3;
  if (zero && !(it.lo > 0.0 && norm_u > 0.0)) {  // the whole group is exactly zero (w = c)
    for_group(it, g, [&](int64_t i) { el.write(i, 0.0); });
    return;
  }
  // f(μ) = ‖u/(base + μ)‖ and its slope, one pass over the group (base: a, or a - min a). A zero
  // u is 0 whatever the divisor is (0 in the hard case of a lower bound).
  auto f_and_slope = [&](double mu, double base_shift, double& f, double& slope) {
    double sq = 0.0, cube = 0.0;
    for_group(it, g, [&](int64_t i) {
      double u, a;
      el(i, u, a);
      if (u == 0.0) return;
      const double q = (a - base_shift) + mu, r = u / q;
      sq += r * r;
      cube += r * r / q;
    });
    f = std::sqrt(sq);
    slope = -cube / (f > 0 ? f : 1.0);
  };
  double mu = 0.0, shift = 0.0, spread = 0.0;
  if (!zero && it.t3 > 0) {  // μ·f(μ) = t3 on [t3·a_min/(‖u‖ - t3), t3·a_max/(‖u‖ - t3)]
    const double gap = norm_u - it.t3;
    mu = newton([&](double x, double& value, double& slope) {
      double f, df;
      f_and_slope(x, 0.0, f, df);
      value = x * f - it.t3;
      slope = f + x * df;
    }, it.t3 * a_min / gap, it.t3 * a_max / gap);
  }
  if (!zero && std::isfinite(it.hi)) {
    double f, df;
    f_and_slope(mu, 0.0, f, df);
    if (f > it.hi) {  // f(μ) = hi on [max(μ, ‖u‖/hi - a_max), ‖u‖/hi - a_min]
      const double lower = std::max(mu, norm_u / it.hi - a_max);
      const double upper = std::max(lower, norm_u / it.hi - a_min);
      mu = newton([&](double x, double& value, double& slope) {
        double fx, dfx;
        f_and_slope(x, 0.0, fx, dfx);
        value = it.hi - fx;
        slope = -dfx;
      }, lower, upper);
    }
  }
  if (it.lo > 0.0) {
    double f = 0.0, df;
    if (!zero) f_and_slope(mu, 0.0, f, df);
    if (zero || f < it.lo) {  // held at the lower bound: solved in σ = λ + min a
      double mass_at_min = 0.0, limit_sq = 0.0;
      int64_t count_at_min = 0;
      for_group(it, g, [&](int64_t i) {
        double u, a;
        el(i, u, a);
        const double above = a - a_min;
        if (above == 0.0) {
          mass_at_min += u * u;
          ++count_at_min;
        } else {
          limit_sq += (u / above) * (u / above);
        }
      });
      const double f_limit = std::sqrt(limit_sq);
      shift = a_min;
      if (mass_at_min == 0.0 && f_limit <= it.lo) {  // the hard case: σ = 0, the rest of the norm spread
        mu = 0.0;
        spread = std::sqrt(std::max(it.lo * it.lo - limit_sq, 0.0) / static_cast<double>(count_at_min));
      } else {  // 1/f(σ) = 1/lo on [max(0, ‖u‖/lo - (a_max - a_min)), min(μ + a_min, ‖u‖/lo)]
        const double lower = std::max(0.0, norm_u / it.lo - (a_max - a_min));
        const double upper = zero ? norm_u / it.lo : std::min(norm_u / it.lo, mu + a_min);
        mu = newton([&](double x, double& value, double& slope) {
          double fx, dfx;
          f_and_slope(x, a_min, fx, dfx);
          value = 1.0 / fx - 1.0 / it.lo;
          slope = -dfx / (fx * fx);
        }, lower, upper);
      }
    }
  }
  for_group(it, g, [&](int64_t i) {
    double u, a;
    el(i, u, a);
    const double q = (a - shift) + mu;
    el.write(i, q == 0.0 ? spread : u / q);
  });
}

// Elements [begin, end) of an item without groups: the branches of Element hoisted into the
// template (the kind of D, centers), and the arithmetic in the acc dtype (float for fp32 / fp16 /
// bf16, as the other kernels), so that the compiler vectorizes the loop: the step is then bound
// by memory, not by a scalar sqrt and division per element.
enum class DKind { kOne, kGiven, kRoot, kRootCentered };

template <typename T, typename V, DKind kD, bool kCenter>
void span_loop(const MetricItem& it, int64_t begin, int64_t end) {
  using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
  T* __restrict__ w = static_cast<T*>(it.w);
  const T* __restrict__ c = static_cast<const T*>(it.c);
  const V* __restrict__ v = static_cast<const V*>(it.v);
  const V* __restrict__ m = static_cast<const V*>(it.m);
  const Acc t1 = static_cast<Acc>(it.t1), c2 = static_cast<Acc>(it.c2), scale = static_cast<Acc>(it.scale),
            eps = static_cast<Acc>(it.eps);
  const bool nonneg = it.nonneg;
  for (int64_t i = begin; i < end; ++i) {
    const Acc center = kCenter ? static_cast<Acc>(c[i]) : Acc(0);
    const Acc y = static_cast<Acc>(w[i]) - center;
    Acc d;
    if constexpr (kD == DKind::kOne) {
      d = Acc(1);
    } else if constexpr (kD == DKind::kGiven) {
      d = static_cast<Acc>(v[i]);
    } else if constexpr (kD == DKind::kRoot) {
      d = std::sqrt(static_cast<Acc>(v[i]) * scale) + eps;
    } else {
      const Acc mean = static_cast<Acc>(m[i]);
      d = std::sqrt((static_cast<Acc>(v[i]) - mean * mean) * scale) + eps;
    }
    const Acc magnitude = nonneg ? std::max(y, Acc(0)) : std::abs(y);
    const Acc shrunk = std::max(d * magnitude - t1, Acc(0));
    const Acc u = (nonneg || y >= Acc(0)) ? shrunk : -shrunk;
    w[i] = static_cast<T>(u / (d + c2) + center);
  }
}

template <typename T, typename V>
void step_span(const MetricItem& it, int64_t begin, int64_t end) {
  auto with_kind = [&](auto center) {
    constexpr bool kCenter = decltype(center)::value;
    if (it.v == nullptr) {
      span_loop<T, V, DKind::kOne, kCenter>(it, begin, end);
    } else if (!it.root) {
      span_loop<T, V, DKind::kGiven, kCenter>(it, begin, end);
    } else if (it.m == nullptr) {
      span_loop<T, V, DKind::kRoot, kCenter>(it, begin, end);
    } else {
      span_loop<T, V, DKind::kRootCentered, kCenter>(it, begin, end);
    }
  };
  with_center(it.c != nullptr, with_kind);
}

// A unit of work: a group of an item (g >= 0), or elements [begin, end) of an item without groups.
struct Unit {
  int64_t item, g, begin, end;
};

// The operand read for `t` in the memory order of `like` (the param as written): `t` itself when
// it is dense in that order, else a temporary kept alive in p.
const void* read_like(const at::Tensor& t, const at::Tensor& like, Prepared& p) {
  if (direct(t) && same_layout(t, like)) return t.const_data_ptr();
  p.keep.push_back(copy_like(t, like));
  return p.keep.back().const_data_ptr();
}

}  // namespace

void metric_prox_(at::TensorList params, at::TensorList centers, at::TensorList metric,
                  const c10::List<std::optional<at::Tensor>>& centered, at::IntArrayRef group_dims,
                  at::IntArrayRef group_sizes, const at::Tensor& coeffs, const at::Tensor& metric_table) {
  const at::ScalarType dtype = check_group(params, centers, "metric_prox_");
  const auto count = static_cast<int64_t>(params.size());
  TORCH_CHECK(static_cast<int64_t>(metric.size()) == count && static_cast<int64_t>(centered.size()) == count,
              "fastreg_cpu::metric_prox_: ", count, " params but ", metric.size(), " metric tensors and ",
              centered.size(), " centered");
  const Table k = read_table(coeffs, dtype, count, Prox::kCount, "coeffs");
  const Table mt = read_table(metric_table, dtype, count, MetricSlot::kCount, "metric_table");
  Prepared p;
  std::vector<at::Tensor> read;
  read.reserve(params.size());
  for (const auto& t : params) read.push_back(t.numel() ? writable(t, t, p) : t);
  add_items(p, params, centers, group_dims, group_sizes, read);
  std::optional<at::ScalarType> metric_dtype;
  std::vector<MetricItem> items(count);
  std::vector<Unit> units;
  for (int64_t t = 0; t < count; ++t) {
    const Item& geometry = p.items[t];
    MetricItem& it = items[t];
    it.numel = geometry.numel;
    if (!it.numel) continue;
    it.A = geometry.A;
    it.G = geometry.G;
    it.K = geometry.K;
    it.w = read[t].data_ptr();
    it.c = p.c[t];
    it.t1 = k(t, Prox::THRESHOLD);
    it.c2 = k(t, Prox::DENOMINATOR) - 1.0;
    it.t3 = k(t, Prox::GROUP_THRESHOLD);
    it.lo = k(t, Prox::MIN_NORM);
    it.hi = k(t, Prox::MAX_NORM);
    it.nonneg = k(t, Prox::NONNEG) != 0.0;
    TORCH_CHECK(it.lo == 0.0 || (it.t1 == 0.0 && !it.nonneg), "fastreg_cpu::metric_prox_: params[", t,
                "]: a lower norm bound with L1 or nonneg has no exact step (the plan refuses it)");
    if (mt(t, MetricSlot::IDENTITY) == 0.0) {
      const at::Tensor& v = metric[t];
      TORCH_CHECK(v.device().is_cpu() && v.layout() == at::kStrided && v.sizes() == params[t].sizes() &&
                      at::isFloatingType(v.scalar_type()),
                  "fastreg_cpu::metric_prox_: metric[", t, "] must be a floating strided CPU tensor of shape ",
                  params[t].sizes(), ", got ", v.scalar_type(), " ", v.sizes(), " on ", v.device());
      TORCH_CHECK(!metric_dtype.has_value() || *metric_dtype == v.scalar_type(), "fastreg_cpu::metric_prox_: metric[",
                  t, "] is ", v.scalar_type(), ", an earlier one ", *metric_dtype, " (one metric dtype per call)");
      metric_dtype = v.scalar_type();
      it.v = read_like(v, read[t], p);
      it.scale = mt(t, MetricSlot::SCALE);
      it.eps = mt(t, MetricSlot::EPS);
      it.root = mt(t, MetricSlot::ROOT) != 0.0;
      const std::optional<at::Tensor> mean = centered.get(t);
      if (mt(t, MetricSlot::CENTERED) != 0.0) {
        TORCH_CHECK(mean.has_value() && mean->scalar_type() == v.scalar_type() && mean->sizes() == v.sizes(),
                    "fastreg_cpu::metric_prox_: centered[", t, "] must be a ", v.scalar_type(),
                    " tensor of shape ", v.sizes());
        it.m = read_like(*mean, read[t], p);
      }
    }
    if (it.G == 0) {
      for (int64_t begin = 0; begin < it.numel; begin += kChunk) {
        units.push_back({t, -1, begin, std::min(it.numel, begin + kChunk)});
      }
    } else {
      for (int64_t g = 0; g < it.G; ++g) units.push_back({t, g, 0, 0});
    }
  }
  const at::ScalarType v_dtype = metric_dtype.value_or(dtype);  // no metric tensor read: any type
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::metric_prox_", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v_dtype, "fastreg_cpu::metric_prox_ metric", [&] {
      using V = scalar_t;
      parallel_tasks(static_cast<int64_t>(units.size()), [&](int64_t u) {
        const Unit& unit = units[u];
        const MetricItem& it = items[unit.item];
        if (unit.g >= 0) {
          step_group<T, V>(it, unit.g);
        } else {
          step_span<T, V>(it, unit.begin, unit.end);
        }
      });
    });
  });
  for (auto& pt : p.copy_back) pt.first.copy_(pt.second);  // explicit write into the real param
}

}  // namespace fastreg_cpu
