// fastreg C++ CPU backend: fused multi-tensor kernels for every fastreg term.
//
// Ops (namespace fastreg_cpu, registered with TORCH_LIBRARY in library.cpp; no pybind module).
// With d = w - c (c: the center, when `centers` is not empty) and s = d, or
// s = sign(d)·max(|d| - t, 0):
//   sums(Tensor[] params, Tensor[] centers, int group_dim, float threshold) -> (Tensor, Tensor)
//       ([Σ|s|, Σs², Σ_g ‖s_g‖] in the acc dtype, group_sq = ‖s_g‖² per group)
//   grads(Tensor[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_scale)
//       -> Tensor[]                     c1·sign(d) + (2·c2 + scale_g)·d, fresh tensors
//   add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] centers, int group_dim, Tensor coeffs,
//             Tensor? group_norms, bool want_sums=True) -> (Tensor, Tensor)
//       g += c1·sign(d) + 2·c2·d + c3·d_g/‖d_g‖; returns sums(params, centers, group_dim), or
//       with want_sums=False and given norms zeros (no extra read of the tensors with groups)
//   prox_(Tensor(a!)[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_norms) -> ()
//       w = c + max(0, 1 - c3/‖s_g‖)·s/c2 (tensors with groups), c + s/c2 (others), t = c1
//   term_layout() -> str   the slots of the sums and coefficient vectors (terms.h), by name
//   constants() -> str     the schedule's constants (schedule.h), by name
// The slots of `coeffs` and of the sums are named in terms.h (Gradient, Prox, Sum), mirrored
// from fastreg/backends/_terms.py. See fastreg/backends/__init__.py for the contract,
// fastreg/backends/_geometry.py for groups.
//
// The headers, each including the ones it builds on (read them in this order):
//   vec.h       the ISA layer: vector widths, accumulator counts, float -> double widening, pin
//   traits.h    per dtype: loading / storing as opmath vectors, accumulators, mixed-dtype gradients
//   span.h      the vectorized loops: one contiguous span, a block of rows
//   terms.h     the terms: slot enums (Sum, Gradient, Prox), operands d and shrunk s, the
//               gradient and prox formulas, one Op per element-wise op
//   schedule.h  items, tasks and the chunk schedule; fixed-order slot reduction
//   prepare.h   tensor preparation: checks, dense views, copies in the param's order, copy-back
//   passes.h    the passes over a schedule (sums, element-wise updates, group norms first),
//               finish_sums, with_center
// and one translation unit per op (sums.cpp, grads.cpp, add_grad.cpp, prox.cpp: ninja compiles
// them in parallel), which prepares the tensors, picks the dtype and center instantiation, and
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

std::tuple<at::Tensor, at::Tensor> sums(at::TensorList params, at::TensorList centers, int64_t group_dim,
                                        double threshold);
std::vector<at::Tensor> grads(at::TensorList params, at::TensorList centers, int64_t group_dim,
                              const at::Tensor& coeffs, const std::optional<at::Tensor>& group_scale);
std::tuple<at::Tensor, at::Tensor> add_grad_(at::TensorList params, at::TensorList grads_, at::TensorList centers,
                                             int64_t group_dim, const at::Tensor& coeffs,
                                             const std::optional<at::Tensor>& group_norms, bool want_sums);
void prox_(at::TensorList params, at::TensorList centers, int64_t group_dim, const at::Tensor& coeffs,
           const std::optional<at::Tensor>& group_norms);
std::string term_layout();
std::string constants();

}  // namespace fastreg_cpu
