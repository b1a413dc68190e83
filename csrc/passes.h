// passes.h: the passes that walk a schedule (schedule.h) with the loops of span.h and the
// maths of terms.h. sums_tasks: (Σ|s|, Σs²) per task or flat segment, and group partials;
// apply_tasks: the element-wise update of grads / add_grad_ / prox_ with each item's own
// coefficients (with the group norms computed in the same task where its groups allow);
// group_coefs: the first pass for groups that span tasks; finish_sums: partials and slots added
// per item in a fixed order into the returned per-tensor sums. And
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
// The sums pass: (Σ|s|, Σs²) per task (per segment of a flat chunk), and the group partials.
// `loader_of(item)` is the loader of what is summed (d, or the shrunk values).

template <typename T, typename LoaderOf>
C10_NOINLINE void sums_tasks(const Schedule& s, const std::vector<Item>& items, const LoaderOf& loader_of,
                             double* partials, double* slots, const std::vector<bool>* only_items = nullptr) {
  using O = typename Traits<T>::opmath;
  auto none = [](int64_t, int64_t, const Vectorized<O>*) {};
  parallel_tasks(static_cast<int64_t>(s.tasks.size()), [&](int64_t ti) {
    const Task& t = s.tasks[ti];
    if (only_items != nullptr && (t.mode == Mode::kFlat || !(*only_items)[t.item])) return;
    double* out = partials + kPartial * t.partial;
    if (t.mode == Mode::kFlat) {
      for_each_segment(s.flat, t.begin, [&](int64_t entry, int64_t off, int64_t len) {
        Acc<T> acc;
        span<T, true>(loader_of(s.flat_items[entry]), off, len, acc, none);
        acc.finish(out);
        out += kPartial;
      });
      return;
    }
    out[Sum::ABS] = out[Sum::SQUARE] = 0.0;
    const Item& it = items[t.item];
    const auto ld = loader_of(t.item);
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
// a flat segment or a run, one value per position for Rows; its per-item constants (op.segment)
// are formed once per segment: a flat chunk's piece of one item, or a whole task of one item.
// `group_coef(item, norm)` turns a group's norm into that coefficient; for items with whole
// groups per task and no norms given, the norm comes from a first visit of the run (or rows) in
// the same task.

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
      double* out = kReduce ? partials + kPartial * t.partial : nullptr;
      for_each_segment(s.flat, t.begin, [&](int64_t entry, int64_t off, int64_t len) {
        const int64_t item = s.flat_items[entry];
        const auto seg = op.segment(item);
        const Vectorized<O> coef(op.flat_coef(item));
        Acc<T> acc;
        span<T, kReduce>(diff_of(item), off, len, acc, [&](int64_t i, int64_t cnt, const Vectorized<O>* x) {
          Vectorized<O> k[kM];
          for (int m = 0; m < kM; ++m) k[m] = coef;
          op.template elem<true>(seg, item, off + i, cnt, x, k);
        });
        if constexpr (kReduce) {
          acc.finish(out);
          out += kPartial;
        }
      });
      return;
    }
    const Item& it = items[t.item];
    const auto ld = diff_of(t.item);
    const auto seg = op.segment(t.item);
    const auto visit_loader = op.norm_loader(t.item, ld);
    const bool in_task = allow_in_task && it.whole_groups;
    // A visit reads the task's elements first (then in cache for the update): for norms
    // computed here, or for the sums of a task whose first pass did not compute them.
    const bool visit = in_task || (kReduce && !precomputed[t.item]);
    double* out = kReduce && visit ? partials + kPartial * t.partial : nullptr;
    if (out != nullptr) out[Sum::ABS] = out[Sum::SQUARE] = 0.0;
    if (t.mode == Mode::kRuns || t.mode == Mode::kRunPart) {
      for (int64_t r = t.begin; r < t.end; ++r) {
        const int64_t off = r * it.K + t.lo;
        const int64_t len = t.hi - t.lo;
        O coef_value = in_task ? O(0) : static_cast<O>(group_coef[it.group_base + r % it.G]);
        if (visit) {
          double run[kPartial];
          reduce_span<T>(visit_loader, off, len, run);
          if (in_task) coef_value = op.group_coef(t.item, std::sqrt(run[Sum::SQUARE]));
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
          op.template elem<false>(seg, t.item, off + i, cnt, x, k);
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
          const O value = op.group_coef(t.item, std::sqrt(group_sums[j]));
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
        op.template elem<false>(seg, t.item, off + i, cnt, x, k);
      });
    }
  });
}

// ----------------------------------------------------------------------------------------
// Turning a call's partials into its results, and the passes the ops run.

// The per-item sums [Σ|s|, Σs², Σ_g‖s_g‖] ((T, 3), acc dtype) and group_sq from the partials and
// slots: each item's partials added in double in task order, its groups' norms in group order,
// so bitwise the same for any thread count.
inline std::tuple<at::Tensor, at::Tensor> finish_sums(const Prepared& p, const std::vector<double>& partials,
                                                      const std::vector<double>& slots, at::ScalarType dtype) {
  const int64_t count = static_cast<int64_t>(p.items.size());
  std::vector<double> sums(count * Sum::kCount, 0.0);
  const auto& owners = p.schedule.partial_items;
  for (int64_t q = 0; q < p.schedule.npartials(); ++q) {  // task order
    double* row = sums.data() + owners[q] * Sum::kCount;
    row[Sum::ABS] += partials[kPartial * q + Sum::ABS];
    row[Sum::SQUARE] += partials[kPartial * q + Sum::SQUARE];
  }
  std::vector<double> group_sq(p.ngroups, 0.0);
  add_slots(p.schedule, p.items, slots, group_sq);
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = p.items[k];
    double norms = 0.0;
    for (int64_t g = 0; g < it.G; ++g) norms += std::sqrt(group_sq[it.group_base + g]);  // fixed order
    sums[k * Sum::kCount + Sum::GROUP_NORM] = norms;
  }
  const auto options = at::TensorOptions().dtype(acc_type(dtype)).device(at::kCPU);
  at::Tensor out = at::empty({count, Sum::kCount}, options);
  at::Tensor groups = at::empty({p.ngroups}, options);
  if (out.scalar_type() == at::kDouble) {
    std::copy(sums.begin(), sums.end(), out.data_ptr<double>());
    std::copy(group_sq.begin(), group_sq.end(), groups.data_ptr<double>());
  } else {
    std::transform(sums.begin(), sums.end(), out.data_ptr<float>(), [](double v) { return static_cast<float>(v); });
    std::transform(group_sq.begin(), group_sq.end(), groups.data_ptr<float>(),
                   [](double v) { return static_cast<float>(v); });
  }
  return {out, groups};
}

// The sums pass over (a subset of) the schedule, of what `loader_of(item)` loads (d, or the
// shrunk values).
template <typename T, typename LoaderOf>
void run_sums(const Prepared& p, const LoaderOf& loader_of, std::vector<double>& partials,
              std::vector<double>& slots, const std::vector<bool>* only_items = nullptr) {
  partials.resize(kPartial * p.schedule.npartials(), 0.0);
  slots.resize(p.schedule.nslots, 0.0);
  sums_tasks<T>(p.schedule, p.items, loader_of, partials.data(), slots.data(), only_items);
}

// The per-group coefficients of an in-place update (add_grad_, prox_), before it runs.
//   group_coef[g]  the coefficient of d for group g (op.group_coef(item, norm)), for every group
//                  whose norm is given or spans tasks; in-task groups are computed by the update.
//   precomputed[k] item k's sums already came from this first pass (partials and slots written).
// Without given norms, the items whose groups span tasks get a first sums pass (of what the op
// takes norms of: d, or prox_'s shrunk values) over their tasks only, into `partials` / `slots`.
struct GroupCoefs {
  std::vector<double> group_coef;
  std::vector<bool> precomputed;
};

template <typename T, bool kCenter, typename Op>
GroupCoefs group_coefs(const Prepared& p, const Op& op, const std::optional<std::vector<double>>& given_norms,
                       std::vector<double>& partials, std::vector<double>& slots) {
  GroupCoefs out{std::vector<double>(p.ngroups, 0.0), std::vector<bool>(p.items.size(), false)};
  const int64_t count = static_cast<int64_t>(p.items.size());
  if (given_norms.has_value()) {
    for (int64_t k = 0; k < count; ++k) {
      const Item& it = p.items[k];
      for (int64_t g = it.group_base; g < it.group_base + it.G; ++g) {
        out.group_coef[g] = op.group_coef(k, (*given_norms)[g]);
      }
    }
    return out;
  }
  bool any = false;
  for (int64_t k = 0; k < count; ++k) {
    out.precomputed[k] = p.items[k].G > 0 && !p.items[k].whole_groups;
    any = any || out.precomputed[k];
  }
  if (!any) return out;
  const auto w = typed<T>(p.w);
  const auto c = typed<T>(p.c);
  const auto diff_of = diff_loaders<T, kCenter>(w, c);
  run_sums<T>(p, [&](int64_t item) { return op.norm_loader(item, diff_of(item)); }, partials, slots,
              &out.precomputed);
  std::vector<double> group_sq(p.ngroups, 0.0);
  add_slots(p.schedule, p.items, slots, group_sq, &out.precomputed);
  for (int64_t k = 0; k < count; ++k) {
    const Item& it = p.items[k];
    if (!out.precomputed[k]) continue;
    for (int64_t g = it.group_base; g < it.group_base + it.G; ++g) {
      out.group_coef[g] = op.group_coef(k, std::sqrt(group_sq[g]));
    }
  }
  return out;
}

}  // namespace detail
}  // namespace fastreg_cpu
