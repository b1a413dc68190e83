// fastreg_cpu::gradient_routes: inside a backward, where the autograd engine will put the gradient of
// each param, so that the penalty's backward can leave its gradient out of the graph and add it to
// p.grad at the end of the backward (one add_grad_ pass over memory the engine has already handed
// to p.grad) exactly when no one can tell the difference. Reads the engine's state only; no
// device work. Registered without a dispatch key (CompositeImplicitAutograd): the params arrive
// as they are, with their autograd metadata.
//
// Per param, one of (fastreg/_ops.py Route):
//   0 kGraph    the gradient must go through the graph: anything below does not hold
//   1 kDeferred the engine will accumulate this param's gradient into p.grad, with no hook to
//               see it on the way: a leaf, whose AccumulateGrad node is needed by the current
//               backward (not captured by autograd.grad), with no pre / post / tensor / retain /
//               post-accumulate hooks on it
//   2 kUnused   the current backward does not need this param's gradient (backward(inputs=...)
//               without it)

#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

namespace {

constexpr int64_t kGraph = 0;
constexpr int64_t kDeferred = 1;
constexpr int64_t kUnused = 2;

int64_t route(const at::Tensor& p, const std::unordered_map<torch::autograd::Node*,
                                                            torch::autograd::GraphTask::ExecInfo>& exec_info) {
  if (!p.defined() || !p.requires_grad() || !p.is_leaf()) return kGraph;
  const auto accumulator = torch::autograd::impl::try_get_grad_accumulator(p);
  if (!accumulator) return kGraph;
  if (!exec_info.empty()) {  // backward(inputs=...) or autograd.grad: only some nodes run
    const auto found = exec_info.find(accumulator.get());
    if (found == exec_info.end()) return kUnused;
    if (found->second.captures_) return kGraph;  // autograd.grad returns it: it must be in the graph
    if (!found->second.needed_) return kUnused;
  }
  if (!accumulator->pre_hooks().empty() || !accumulator->post_hooks().empty() ||
      !accumulator->tensor_pre_hooks().empty() || !accumulator->retains_grad_hooks().empty() ||
      accumulator->tensor_post_acc_grad_hooks() != nullptr) {
    return kGraph;  // someone watches this gradient (DDP's reducer, a tensor hook, ...)
  }
  return kDeferred;
}

}  // namespace

std::vector<int64_t> gradient_routes(at::TensorList params) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  std::vector<int64_t> out(params.size(), kGraph);
  if (exec_info == nullptr) return out;  // not inside a backward
  for (size_t k = 0; k < params.size(); ++k) out[k] = route(params[k], *exec_info);
  return out;
}

}  // namespace fastreg_cpu
