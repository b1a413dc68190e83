// fastreg_cpu::add_to_grad: Penalty.add_to_grad_ of one kernel group (fastreg/_operations.py
// add_to_grad, one param group) in one call: each p.grad created where None, the gradient added in
// one add_grad_ pass, the gradients' version counters bumped, and the value, the sums' weighted
// total in the acc dtype (_ops.weighted_total). The Python path costs several times the kernel on a
// small model (a loop over p.grad, three layers of calls, four ATen ops for the total).
//
// It writes nothing, and returns None, where the Python path would refuse a gradient (a sparse
// one, another shape or device, not floating-point, a lazily negated one, an inference tensor
// outside InferenceMode) or a param (not a leaf), or would split the call (gradients of several
// dtypes): fastreg/_operations.py then takes that path,
// which raises the error naming the parameter, or makes one call per gradient dtype.
//
// Registered without a dispatch key (CompositeImplicitAutograd), as deferral.cpp's ops: it reads
// and sets p.grad, the autograd metadata of the params as they are. Eager only: the caller never
// calls it while torch.compile traces.

#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/variable.h>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

namespace {

// The dtype a new p.grad of p takes: p.grad_dtype where one is set (fp32 gradients of bf16
// weights), else p's dtype.
at::ScalarType new_grad_dtype(const at::Tensor& p) {
  const auto* meta = torch::autograd::impl::get_autograd_meta(p);
  const auto dtype = meta != nullptr ? meta->grad_dtype(p) : std::nullopt;
  return dtype.value_or(p.scalar_type());
}

// The dtype p.grad has, or will have once created.
at::ScalarType grad_dtype_of(const at::Tensor& p) {
  const at::Tensor& g = p.grad();
  return g.defined() ? g.scalar_type() : new_grad_dtype(p);
}

}  // namespace

// A fresh p.grad: zeros like p (its strides, as torch.zeros_like keeps them), in new_grad_dtype.
at::Tensor zero_grad_like(const at::Tensor& p) {
  return at::zeros_like(p, p.options().dtype(new_grad_dtype(p)));
}

namespace {

// Whether fastreg/_operations.py grads_of and _ops.check_writable take p.grad as it is (an
// undefined one is created there): strided, p's shape and device, floating-point, writable.
bool acceptable(const at::Tensor& p, const at::Tensor& g) {
  if (!g.defined()) return true;
  if (g.layout() != at::kStrided || g.sizes() != p.sizes() || g.device() != p.device() || !g.is_floating_point()) {
    return false;
  }
  if (g.unsafeGetTensorImpl()->is_python_dispatch()) return false;  // a subclass: the Python path
  if (g.is_neg() || g.is_conj()) return false;  // (a lazy negation: the Python path's op refuses it)
  return c10::InferenceMode::is_enabled() || !g.is_inference();
}

}  // namespace

std::optional<at::Tensor> add_to_grad(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                      at::IntArrayRef group_sizes, const at::Tensor& table) {
  TORCH_CHECK(!params.empty(), "fastreg_cpu::add_to_grad: no params");
  // Every check before any write: None leaves every p.grad as it was.
  const at::ScalarType gdtype = grad_dtype_of(params[0]);
  for (const auto& p : params) {
    // (a non-leaf param: the Python path reads p.grad_dtype, which only a leaf has, and says so)
    if (!p.device().is_cpu() || !p.is_leaf() || grad_dtype_of(p) != gdtype || !acceptable(p, p.grad())) {
      return std::nullopt;
    }
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) {
    at::Tensor& g = const_cast<at::Tensor&>(p).mutable_grad();
    if (!g.defined()) g = zero_grad_like(p);
    grads.push_back(g);
  }
  const auto per_tensor = std::get<0>(add_grad_(params, grads, centers, group_dims, group_sizes, table, std::nullopt,
                                                /*want_sums=*/true));
  for (const auto& g : grads) torch::autograd::impl::bump_version(g);
  return weighted_total(per_tensor, table, per_tensor.scalar_type());
}

}  // namespace fastreg_cpu
