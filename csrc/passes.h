// passes.h: the passes that walk a schedule (schedule.h) with the loops of span.h and the
// maths of terms.h. sums_tasks: (Σ|s|, Σs²) and group partials per task; apply_tasks: the
// element-wise update of grads / add_grad_ / prox_ (with the group norms computed in the same
// task where its groups allow); group_coefs: the first pass for groups that span tasks;
// finish_sums: partials and slots added in a fixed order into the returned sums. And
// with_center, the one switch from "were centers given" to the kCenter the kernels are
// instantiated on.

#pragma once

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "prepare.h"
#include "schedule.h"
#include "span.h"
#include "terms.h"

namespace fastreg_cpu {
namespace detail {

// The with/without-center switch of every op: runs fn(center), `center` a std::true_type when
// centers were given, else std::false_type, so that fn (a generic lambda) instantiates the
// kernels with `constexpr bool kCenter = decltype(center)::value;`.
template <typename Fn>
inline void with_center(bool has_center, const Fn& fn) {
  if (has_center) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

// item -> the loader of its d = w - c.
template <typename T, bool kCenter>
auto diff_loaders(const std::vector<const T*>& w, const std::vector<const T*>& c) {
  return [&w, &c](int64_t item) { return Diff<T, kCenter>{w[item], kCenter ? c[item] : nullptr}; };
}

// ----------------------------------------------------------------------------------------
// The sums pass: (Σ|s|, Σs²) per task, and the group partials.

template <typename T, typename Loader, typename LoaderOf>
C10_NOINLINE void sums_tasks(const Schedule& s, const std::vector<Item>& items, const LoaderOf& loader_of,
                             double* partials, double* slots, const std::vector<bool>* only_items = nullptr) {
  using O = typename Traits<T>::opmath;
  auto none = [](int64_t, int64_t, const Vectorized<O>*) {};
  parallel_tasks(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[ti];
    if (only_items != nullptr && (t.mode == Mode::kFlat || !(*only_items)[t.item])) return;
    double* out = partials + kPartial * ti;
    out[Sum::ABS] = out[Sum::SQUARE] = 0.0;
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
        double run[kPartial];
        reduce_span<T>(ld, r * it.K + t.lo, t.hi - t.lo, run);
        out[Sum::ABS] += run[Sum::ABS];
        out[Sum::SQUARE] += run[Sum::SQUARE];
        slots[t.slot + (r - t.begin)] = run[Sum::SQUARE];
      }
      return;
    }
    const int64_t width = t.hi - t.lo;
    double* pos = scratch<double>(width + Traits<T>::kStep, 0);
    std::fill(pos, pos + width + Traits<T>::kStep, 0.0);
    rows_sums<T>(ld, t.begin, t.end, it.G * it.K, t.lo, width, pos, &out[Sum::ABS]);
    out[Sum::SQUARE] = fold_positions(pos, width, it.K, slots + t.slot);
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
  const auto diff_of = diff_loaders<T, kCenter>(w, c);
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
      if constexpr (kReduce) acc.finish(partials + kPartial * ti);
      return;
    }
    const Item& it = items[t.item];
    const auto ld = diff_of(t.item);
    const auto visit_loader = op.norm_loader(ld);
    const bool in_task = allow_in_task && it.whole_groups;
    // A visit reads the task's elements first (then in cache for the update): for norms
    // computed here, or for the sums of a task whose first pass did not compute them.
    const bool visit = in_task || (kReduce && !precomputed[t.item]);
    double* out = kReduce && visit ? partials + kPartial * ti : nullptr;
    if (out != nullptr) out[Sum::ABS] = out[Sum::SQUARE] = 0.0;
    if (t.mode == Mode::kRuns || t.mode == Mode::kRunPart) {
      for (int64_t r = t.begin; r < t.end; ++r) {
        const int64_t off = r * it.K + t.lo;
        const int64_t len = t.hi - t.lo;
        O coef_value = in_task ? O(0) : static_cast<O>(group_coef[it.group_base + r % it.G]);
        if (visit) {
          double run[kPartial];
          reduce_span<T>(visit_loader, off, len, run);
          if (in_task) coef_value = op.group_coef(std::sqrt(run[Sum::SQUARE]));
          if (out != nullptr) {
            out[Sum::ABS] += run[Sum::ABS];
            out[Sum::SQUARE] += run[Sum::SQUARE];
            slots[t.slot + (r - t.begin)] = run[Sum::SQUARE];
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
        out[Sum::ABS] = abs_total;
        out[Sum::SQUARE] = total;
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

// ----------------------------------------------------------------------------------------
// Turning a call's partials into its results, and the passes the ops run.

// (Σ|s|, Σs², Σ_g‖s_g‖, group_sq) from task partials and slots.
inline std::tuple<at::Tensor, at::Tensor> finish_sums(const Prepared& p, const std::vector<double>& partials,
                                               const std::vector<double>& slots, at::ScalarType dtype) {
  double a = 0.0, s = 0.0;
  for (size_t t = 0; t < p.schedule.tasks.size(); ++t) {  // fixed order
    a += partials[kPartial * t + Sum::ABS];
    s += partials[kPartial * t + Sum::SQUARE];
  }
  std::vector<double> group_sq(p.ngroups, 0.0);
  add_slots(p.schedule, p.items, slots, group_sq);
  double norms = 0.0;
  for (double v : group_sq) norms += std::sqrt(v);  // fixed order
  const auto options = at::TensorOptions().dtype(acc_type(dtype)).device(at::kCPU);
  at::Tensor out = at::empty({Sum::kCount}, options);
  at::Tensor groups = at::empty({p.ngroups}, options);
  if (out.scalar_type() == at::kDouble) {
    double* o = out.data_ptr<double>();
    o[Sum::ABS] = a;
    o[Sum::SQUARE] = s;
    o[Sum::GROUP_NORM] = norms;
    std::copy(group_sq.begin(), group_sq.end(), groups.data_ptr<double>());
  } else {
    float* o = out.data_ptr<float>();
    o[Sum::ABS] = static_cast<float>(a);
    o[Sum::SQUARE] = static_cast<float>(s);
    o[Sum::GROUP_NORM] = static_cast<float>(norms);
    float* g = groups.data_ptr<float>();
    for (int64_t i = 0; i < p.ngroups; ++i) g[i] = static_cast<float>(group_sq[i]);
  }
  return {out, groups};
}

// The sums pass over (a subset of) the schedule: of d, or of the shrunk values (kShrink).
template <typename T, bool kCenter, bool kShrink>
void run_sums(const Prepared& p, double thr, std::vector<double>& partials, std::vector<double>& slots,
              const std::vector<bool>* only_items = nullptr) {
  using O = typename Traits<T>::opmath;
  const auto w = typed<T>(p.w);
  const auto c = typed<T>(p.c);
  partials.resize(kPartial * p.schedule.tasks.size(), 0.0);
  slots.resize(p.schedule.nslots, 0.0);
  if constexpr (kShrink) {
    const Vectorized<O> t(static_cast<O>(thr));
    const auto diff_of = diff_loaders<T, kCenter>(w, c);
    auto loader_of = [&](int64_t item) { return Shrunk<T, kCenter>{diff_of(item), t}; };
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
}  // namespace fastreg_cpu
