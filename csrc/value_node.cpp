// fastreg_cpu::penalty_value: the eager value of one kernel group (fastreg/_ops.py penalty_value) as
// one op with its own autograd node, in C++: the Python autograd.Function (_ops._EagerValue) costs
// more than the whole penalty of a small model. Forward: the `value` op (the sums and their
// weighted total: bitwise the same value). Backward (ValueBackward::apply), the three ways of
// _EagerValue.backward, in the same order:
//   - create_graph (GradMode on in the backward): fastreg::value_graph_backward, registered in
//     Python by fastreg/_ops.py (the value formed again through the differentiable sums over
//     aliases of the params, differentiated with a graph): exactly the Python path;
//   - else, outside anomaly mode, defer_add_grad (deferral.cpp): the gradient added to p.grad at
//     the end of the backward where no one can tell;
//   - else the gradient through the graph: the `grads` op with the coefficients of
//     _ops._backward_coeffs (the same ATen ops, in the same order).
// The node keeps the params and centers (Saved: SavedVariables only under saved-tensor hooks) and
// group_sq (a SavedVariable), released after a backward without retain_graph and checked against
// in-place changes when unpacked, and the call's table.
// The ops it calls go through the dispatcher, so that fake tensors reach their fake kernels.

#include <ATen/SavedTensorHooks.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ValueOp = std::tuple<at::Tensor, at::Tensor>(at::TensorList, at::TensorList, at::IntArrayRef, at::IntArrayRef,
                                                   const at::Tensor&, at::ScalarType);
using GradsOp = std::vector<at::Tensor>(at::TensorList, at::TensorList, at::IntArrayRef, at::IntArrayRef,
                                        const at::Tensor&, const std::optional<at::Tensor>&);
using GraphBackwardOp = c10::List<std::optional<at::Tensor>>(at::TensorList, at::TensorList, at::IntArrayRef,
                                                            at::IntArrayRef, const at::Tensor&, const at::Tensor&);

const c10::TypedOperatorHandle<ValueOp>& value_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastreg_cpu::value", "").typed<ValueOp>();
  return op;
}

const c10::TypedOperatorHandle<GradsOp>& grads_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fastreg_cpu::grads", "").typed<GradsOp>();
  return op;
}

// Registered from Python (fastreg/_ops.py) when fastreg._ops is imported, which is before any value.
c10::TypedOperatorHandle<GraphBackwardOp> graph_backward_op() {
  const auto handle = c10::Dispatcher::singleton().findSchema({"fastreg::value_graph_backward", ""});
  TORCH_CHECK(handle.has_value(), "fastreg_cpu::penalty_value: fastreg::value_graph_backward is not registered "
              "(import fastreg._ops)");
  return handle->typed<GraphBackwardOp>();
}

// The params and centers a node keeps for its backward. Without saved-tensor hooks, the tensors
// themselves and their versions: what a SavedVariable of a leaf (an input, never an output) keeps
// and checks, without its per-tensor bookkeeping (the grad accumulator looked up under a lock,
// the hooks consulted), which costs 0.15 µs a tensor: 300 µs a call on 2,000 tensors. Under
// saved-tensor hooks (save_on_cpu, non-reentrant checkpointing, any saved_tensors_hooks), as
// SavedVariables, so that the hooks see them as they see any node's.
class Saved {
 public:
  explicit Saved(at::TensorList tensors) {
    // (an inference tensor has no version: SavedVariable refuses it, with its own message)
    if (!at::SavedTensorDefaultHooks::get_tls_state().stack.empty() ||
        std::any_of(tensors.begin(), tensors.end(), [](const at::Tensor& t) { return t.is_inference(); })) {
      hooked_.reserve(tensors.size());
      for (const auto& t : tensors) hooked_.emplace_back(t, false);
      return;
    }
    tensors_ = tensors.vec();
    versions_.reserve(tensors.size());
    for (const auto& t : tensors) versions_.push_back(t._version());
  }

  // The tensors, as SavedVariable::unpack gives them (the same errors: a second backward after
  // release, an in-place change since the forward).
  std::vector<at::Tensor> unpack() const {
    if (!hooked_.empty()) {
      std::vector<at::Tensor> out;
      out.reserve(hooked_.size());
      for (const auto& s : hooked_) out.push_back(s.unpack());
      return out;
    }
    TORCH_CHECK(!released_, torch::autograd::ERR_BACKWARD_TWICE);
    for (size_t k = 0; k < tensors_.size(); ++k) {
      const auto version = tensors_[k]._version();
      TORCH_CHECK(version == versions_[k],
                  "one of the variables needed for gradient computation has been modified by an inplace "
                  "operation: [", tensors_[k].toString(), " ", tensors_[k].sizes(), "] is at version ", version,
                  "; expected version ", versions_[k], " instead (saved by fastreg::PenaltyValueBackward). Hint: "
                  "do not change a regularized parameter in place between the penalty's forward and its backward.");
    }
    return tensors_;
  }

  void release() {
    for (auto& s : hooked_) s.reset_data();
    tensors_.clear();
    released_ = true;
  }

 private:
  std::vector<SavedVariable> hooked_;
  std::vector<at::Tensor> tensors_;
  std::vector<uint32_t> versions_;
  bool released_ = false;
};

// _ops._backward_coeffs and _ops.group_scale with grad_group_sq None: the per-group coefficient of
// d in the backward, or nullopt without groups.
std::optional<at::Tensor> group_scale(const at::Tensor& grad_sums, at::TensorList params, at::IntArrayRef dims,
                                      at::IntArrayRef sizes, const at::Tensor& group_sq) {
  if (group_sq.numel() == 0) return std::nullopt;
  std::vector<int64_t> counts(params.size(), 0);
  for (size_t k = 0; k < params.size(); ++k) {
    if (dims[k] == detail::kWhole) counts[k] = 1;
    else if (dims[k] >= 0) counts[k] = params[k].size(dims[k]) / sizes[k];
  }
  const at::Tensor per_group = at::repeat_interleave(grad_sums.select(1, Sum::GROUP_NORM),
                                                     at::tensor(counts).to(group_sq.device()), std::nullopt,
                                                     group_sq.numel());
  const at::Tensor positive = group_sq.gt(0);
  const at::Tensor scale = at::where(positive, per_group.div(at::where(positive, group_sq, 1).sqrt()), 0);
  return scale.to(group_sq.scalar_type());
}

struct ValueBackward : Node {
  ValueBackward(at::TensorList params_, at::TensorList centers_) : params(params_), centers(centers_) {}
  Saved params, centers;
  SavedVariable group_sq;
  at::Tensor table;  // the call's coefficient table (the plan's; the Python node keeps it too)
  std::vector<int64_t> dims, sizes;
  at::ScalarType dtype = at::kFloat;

  std::string name() const override { return "fastreg::PenaltyValueBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    params.release();
    centers.release();
    group_sq.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const std::vector<at::Tensor> ps = params.unpack();
    const std::vector<at::Tensor> cs = centers.unpack();
    const at::Tensor sq = group_sq.unpack();
    // (an undefined gradient materialized, as autograd.Function's default)
    const at::Tensor grad_value = grads[0].defined() ? grads[0] : at::zeros({}, at::TensorOptions().dtype(dtype));
    variable_list out(ps.size() + cs.size());
    if (at::GradMode::is_enabled()) {  // create_graph=True: the Python path, for the second derivative
      const auto result = graph_backward_op().call(ps, cs, dims, sizes, table, grad_value);
      for (size_t k = 0; k < ps.size(); ++k) {
        const std::optional<at::Tensor> g = result.get(k);
        if (g.has_value()) out[k] = *g;
      }
      return out;
    }
    if (!torch::autograd::AnomalyMode::is_enabled() &&
        defer_add_grad(ps, cs, dims, sizes, table, grad_value, sq) >= 0) {
      return out;  // added at the end of the backward, or not needed by it
    }
    const at::Tensor grad_sums = table.mul(grad_value.to(at::kDouble)).to(sq.scalar_type());
    const auto scale = group_scale(grad_sums, ps, dims, sizes, sq);
    const std::vector<at::Tensor> gs = grads_op().call(ps, cs, dims, sizes, grad_sums.contiguous(), scale);
    for (size_t k = 0; k < gs.size(); ++k) out[k] = gs[k];
    return out;
  }
};

}  // namespace

// The Autograd kernel: the value below autograd, and the node where a param or center needs a gradient.
at::Tensor penalty_value(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                         at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype) {
  // (forward-mode AD: the node has no jvp, as the autograd.Function it replaces has none)
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefinedTensorList(params) &&
                                  !torch::autograd::isFwGradDefinedTensorList(centers),
                              "fastreg: the penalty's value does not support forward-mode AD (no jvp)");
  at::Tensor total, sq;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    std::tie(total, sq) = value_op().call(params, centers, group_dims, group_sizes, table, dtype);
  }
  if (torch::autograd::compute_requires_grad(params, centers)) {
    auto node = c10::make_intrusive<ValueBackward>(params, centers);
    node->set_next_edges(torch::autograd::collect_next_edges(params, centers));
    node->group_sq = SavedVariable(sq, false);
    node->table = table;
    node->dims = group_dims.vec();
    node->sizes = group_sizes.vec();
    node->dtype = dtype;
    torch::autograd::set_history(total, node);
  }
  return total;
}

// Below autograd (fake and meta tensors have their own kernel, registered from Python): the value alone.
at::Tensor penalty_value_cpu(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                             at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype) {
  return std::get<0>(value(params, centers, group_dims, group_sizes, table, dtype));
}

}  // namespace fastreg_cpu
