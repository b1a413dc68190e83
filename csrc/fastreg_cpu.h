// fastreg C++ CPU backend: fused multi-tensor kernels for every fastreg term.
//
// Ops (namespace fastreg_cpu, registered with TORCH_LIBRARY in library.cpp; no pybind module).
// Every op takes T params and, per param, its structure: group_dims[t] (-1: no groups, -2: the
// whole tensor is one group, else a dim) and group_sizes[t] (k: group i is the k slices i·k ..
// i·k + k - 1 along that dim). Coefficients are (T, slots) tables of the acc dtype (or double),
// row t for params[t]. With d = w - c (c: the center, when `centers` is not empty) and s = d, or
// the shrunk s = sign(d)·max(|d| - t, 0) (max(d - t, 0) for a NONNEG row):
//   sums(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor? shrink)
//       -> (Tensor, Tensor)         per param [Σ|s|, Σs², Σ_g ‖s_g‖] ((T, 3), acc dtype) and
//                                   group_sq = ‖s_g‖² per group; shrink: a Prox table (its
//                                   THRESHOLD and NONNEG), or none for s = d
//   grads(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor coeffs,
//         Tensor? group_scale) -> Tensor[]     c1·sign(d) + (2·c2 + scale_g)·d, fresh tensors
//   add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] centers, int[] group_dims,
//             int[] group_sizes, Tensor coeffs, Tensor? group_norms, bool want_sums=True)
//       -> (Tensor, Tensor)
//       g += c1·sign(d) + 2·c2·d + c3·d_g/‖d_g‖; returns sums(params, centers, ...), or with
//       want_sums=False and given norms only the flat params' (no extra read of the tensors with
//       groups: their rows are zeros)
//   prox_(Tensor(a!)[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor coeffs,
//         Tensor? group_norms) -> ()
//       w = c + f_g·s (params with groups: f_g = prox_group_factor(‖s_g‖, ...), terms.h, with the
//       row's norm bounds), c + s/den (others)
//   metric_prox_(Tensor(a!)[] params, Tensor[] centers, Tensor[] metric, Tensor?[] centered,
//                int[] group_dims, int[] group_sizes, Tensor coeffs, Tensor metric_table) -> ()
//       the step in the diagonal metric D of each param (metric_table: its MetricSlot row,
//       metric[t] its v, centered[t] RMSprop's running mean): see metric_prox.cpp
//   value(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table,
//         ScalarType dtype) -> (Tensor, Tensor)
//       the eager value of a kernel group, Σ table·sums in float64 as dtype, and group_sq (sums.cpp)
//   penalty_value(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table,
//                 ScalarType dtype) -> Tensor
//       value's total with its own autograd node (an Autograd kernel: the backward defers, or
//       hands autograd the gradient, or under create_graph calls fastreg::value_graph_backward,
//       registered in Python): value_node.cpp
//   add_to_grad(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table)
//       -> Tensor?                  Penalty.add_to_grad_ of one kernel group: p.grad created where
//                                   None, add_grad_, versions bumped, Σ table·sums in the acc dtype;
//                                   None (nothing written) where the Python path must take the call
//                                   (add_to_grad.cpp)
//   defer_add_grad(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes,
//                  Tensor table, Tensor grad_value, Tensor group_sq) -> int
//       inside the value's backward: queues p.grad += its gradient at the end of the backward
//       where no one can tell (deferral.cpp); -1 where the gradient must go through the graph
//   deferral_log() -> int[]    [additions run so far, then the params of each of the last ones]
//   gradient_routes(Tensor[] params) -> int[]   inside a backward, where the engine puts each
//       param's gradient (deferral.cpp): the graph, p.grad with no one watching, or nowhere
//   lock_accumulators(Tensor[] params) -> int, unlock_accumulators(int token) -> ()
//       hold the locks the engine's AccumulateGrad takes for these params (deferral.cpp)
//   bind_operands, penalty_value_of, add_to_grad_of; watch_layout, watch_memory, watch_targets
//       and their *_changed / release_*; handles_held: what the eager calls keep between calls,
//       by integer handle (operands.cpp, which registers them in a library fragment of its own)
//   term_layout() -> str   the slots of the sums and coefficient tables (terms.h), by name
//   constants() -> str     the schedule's constants (schedule.h), by name
// The slots of the coefficient tables and of the sums are named in terms.h (Gradient, Prox,
// Sum), mirrored from fastreg/backends/_terms.py. See fastreg/backends/__init__.py for the
// contract, fastreg/backends/_geometry.py for structures and groups.
//
// The headers, each including the ones it builds on (read them in this order):
//   vec.h       the ISA layer: vector widths, accumulator counts, float -> double widening, pin
//   traits.h    per dtype: loading / storing as opmath vectors, accumulators, mixed-dtype gradients
//   span.h      the vectorized loops: one contiguous span, a block of rows
//   terms.h     the terms: slot enums (Sum, Gradient, Prox), coefficient tables, operands d and
//               shrunk s, the gradient and prox formulas, one Op per element-wise op
//   schedule.h  items, tasks and the chunk schedule, partials per task or flat segment;
//               fixed-order slot reduction
//   prepare.h   tensor preparation: checks, dense views, copies in the param's order, copy-back,
//               each item's group geometry from its structure, coefficient tables
//   passes.h    the passes over a schedule (sums, element-wise updates, group norms first),
//               finish_sums (per-tensor sums), with_center
// and one translation unit per op (sums.cpp, grads.cpp, add_grad.cpp, prox.cpp, metric_prox.cpp, and the
// ops built on them: ninja compiles them in parallel), which prepares the tensors, picks the dtype and center instantiation, and
// runs the passes. fastreg/backends/cpu.py lists every file here (HEADER_FILES, SOURCE_FILES):
// they all enter the hash that names the build.

#pragma once

#include <ATen/Dispatch.h>  // AT_DISPATCH_*, in every op's translation unit
#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "passes.h"

namespace fastreg_cpu {

std::tuple<at::Tensor, at::Tensor> sums(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                        at::IntArrayRef group_sizes, const std::optional<at::Tensor>& shrink);
std::vector<at::Tensor> grads(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                              at::IntArrayRef group_sizes, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& group_scale);
std::tuple<at::Tensor, at::Tensor> add_grad_(at::TensorList params, at::TensorList grads_, at::TensorList centers,
                                             at::IntArrayRef group_dims, at::IntArrayRef group_sizes,
                                             const at::Tensor& coeffs, const std::optional<at::Tensor>& group_norms,
                                             bool want_sums);
void prox_(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims, at::IntArrayRef group_sizes,
           const at::Tensor& coeffs, const std::optional<at::Tensor>& group_norms);
void metric_prox_(at::TensorList params, at::TensorList centers, at::TensorList metric,
                  const c10::List<std::optional<at::Tensor>>& centered, at::IntArrayRef group_dims,
                  at::IntArrayRef group_sizes, const at::Tensor& coeffs, const at::Tensor& metric_table);
at::Tensor weighted_total(const at::Tensor& per_tensor, const at::Tensor& table, at::ScalarType dtype);
std::tuple<at::Tensor, at::Tensor> value(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                         at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype);
at::Tensor penalty_value(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                         at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype);
at::Tensor penalty_value_cpu(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                             at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype);
std::optional<at::Tensor> add_to_grad(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                      at::IntArrayRef group_sizes, const at::Tensor& table);
at::Tensor zero_grad_like(const at::Tensor& p);
std::vector<int64_t> gradient_routes(at::TensorList params);
int64_t defer_add_grad(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                       at::IntArrayRef group_sizes, const at::Tensor& table, const at::Tensor& grad_value,
                       const at::Tensor& group_sq);
std::vector<int64_t> deferral_log();
int64_t lock_accumulators(at::TensorList params);
void unlock_accumulators(int64_t token);
std::string term_layout();
std::string constants();

}  // namespace fastreg_cpu
