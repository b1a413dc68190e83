// schedule.h: how one call's work is cut into tasks, whatever the tasks compute: the tensors'
// sizes and group geometry (Items, from prepare.h) become a list of tasks (Schedule), and
// add_slots adds the tasks' group partials in a fixed order (the partial sums: finish_sums,
// passes.h).
//
// Work layout: one schedule of tasks per call, each task's arithmetic a function of the tensor
// sizes only, so results are bitwise identical for any thread count. at::parallel_for runs the
// tasks; every task writes its own partial sums (and group partials, "slots"), which are added
// in task order on the calling thread. (at::parallel_for is a header template: the extension
// must be compiled with -fopenmp, else it silently runs serially.) Task kinds:
//   Flat    the tensors without a group term, laid end to end (int64 prefix offsets) and cut
//           into chunks of kChunk elements: a chunk may span many small tensors, one segment
//           (and one partial, since the sums are per tensor) per tensor it touches.
//   Runs    a tensor whose groups are runs of K >= kRunMin contiguous elements (blocks along
//           dim 0 of a contiguous weight, a WHOLE tensor: one run per group): whole runs, about
//           kChunk elements per task, one slot per run. With A == 1 every run is a whole group,
//           so add_grad_ and prox_ compute its norm and update it in one visit (the second read
//           hits the cache): one pass.
//   RunPart one piece of a run longer than kChunk.
//   Rows    a tensor whose runs are short (blocks of columns of a Linear weight: K = k; a 1-D
//           tensor's element groups): a block of rows of its (A, G*K) memory view, over a window
//           of at most kRowMax positions, with one double accumulator per position, folded into
//           per-group slots at the end.
// Every task but a flat chunk is one item's. Partials: one (Σ|s|, Σs²) pair per task, or one per
// segment of a flat chunk (Task::partial is a task's first pair, Schedule::partial_items the
// item of each pair), so that finish_sums adds each item's own partials in task order.
// add_grad_ and prox_ need a group's norm before they update it: for tensors whose groups span
// tasks (Rows, RunPart, runs with A > 1) a first pass computes the norms (the sums kernel on
// those tasks only), unless the caller passes them (sharded parameters: global norms).
//
// The constants below are reported to Python by fastreg_cpu::constants() (library.cpp).

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastreg_cpu {
namespace detail {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per task (flat chunks, runs per task, rows per task)
constexpr int64_t kRunMin = 64;                // runs at least this long are reduced one by one
constexpr int64_t kRowMax = int64_t{1} << 14;  // positions (double accumulators) per Rows task
constexpr int64_t kRowsTask = int64_t{1} << 18;  // elements per Rows task

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
  int64_t A = 1, G = 0, K = 0;  // memory geometry of its groups (_geometry.py); G == 0: no group term, or empty
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
  int64_t partial;     // its first partial pair: one per segment of a flat chunk, else one
};

struct Schedule {
  Layout flat;                         // the items without groups, end to end
  std::vector<int64_t> flat_items;     // flat layout entry -> item
  std::vector<Task> tasks;             // the flat chunks first, then each item's tasks
  std::vector<int64_t> partial_items;  // partial pair -> its item, in task order
  int64_t nslots = 0;
  int64_t npartials() const { return static_cast<int64_t>(partial_items.size()); }
};

inline Schedule make_schedule(std::vector<Item>& items) {
  Schedule s;
  for (size_t k = 0; k < items.size(); ++k) {
    if (items[k].numel > 0 && items[k].G == 0) {
      s.flat.add(items[k].numel);
      s.flat_items.push_back(static_cast<int64_t>(k));
    }
  }
  for (int64_t c = 0; c < s.flat.chunks(); ++c) {
    s.tasks.push_back({Mode::kFlat, -1, c, c + 1, 0, 0, 0, s.npartials()});
    for_each_segment(s.flat, c,
                     [&](int64_t entry, int64_t, int64_t) { s.partial_items.push_back(s.flat_items[entry]); });
  }
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
          s.tasks.push_back({Mode::kRuns, item, r, e, 0, it.K, s.nslots, s.npartials()});
          s.partial_items.push_back(item);
          s.nslots += e - r;
        }
        it.whole_groups = it.A == 1;
      } else {
        for (int64_t r = 0; r < runs; ++r) {
          for (int64_t lo = 0; lo < it.K; lo += kChunk) {
            s.tasks.push_back({Mode::kRunPart, item, r, r + 1, lo, std::min(it.K, lo + kChunk), s.nslots,
                               s.npartials()});
            s.partial_items.push_back(item);
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
          s.tasks.push_back({Mode::kRows, item, a, std::min(it.A, a + per), lo, hi, s.nslots, s.npartials()});
          s.partial_items.push_back(item);
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

}  // namespace detail
}  // namespace fastreg_cpu
