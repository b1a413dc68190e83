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
//               backward (not captured by autograd.grad), and no node of this backward's graph
//               has a pre / post / tensor / retain / post-accumulate hook (a hook anywhere could
//               read this p.grad before the end of the backward)
//   2 kUnused   the current backward does not need this param's gradient (backward(inputs=...)
//               without it)

#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

namespace {

using torch::autograd::Node;

bool watched(Node& node) {  // (the hook lists have non-const accessors)
  return !node.pre_hooks().empty() || !node.post_hooks().empty() || !node.tensor_pre_hooks().empty() ||
         !node.retains_grad_hooks().empty() || node.tensor_post_acc_grad_hooks() != nullptr;
}

// Whether any node of the current backward's graph has a hook (checked once per backward).
bool graph_is_watched() {
  const auto* nodes = torch::autograd::get_current_graph_task_nodes_in_graph();
  if (nodes == nullptr) return true;
  return std::any_of(nodes->begin(), nodes->end(), [](Node* n) { return n != nullptr && watched(*n); });
}

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
  if (watched(*accumulator)) return kGraph;  // someone watches this gradient (DDP's reducer, a tensor hook)
  return kDeferred;
}

// The lock AccumulateGrad::apply holds while it writes p.grad (Node::mutex_, protected: reached
// through a pointer to member formed in a derived class, never instantiated).
struct NodeMutex : Node {
  static std::mutex& of(Node& node) { return node.*(&NodeMutex::mutex_); }
};

// Locked accumulators by token: the nodes are kept alive until unlocked.
using NodePtr = decltype(torch::autograd::impl::try_get_grad_accumulator(std::declval<const at::Tensor&>()));
std::mutex registry_mutex;
std::map<int64_t, std::vector<NodePtr>> registry;
int64_t next_token = 1;

}  // namespace

std::vector<int64_t> gradient_routes(at::TensorList params) {
  const auto* exec_info = torch::autograd::get_current_graph_task_exec_info();
  std::vector<int64_t> out(params.size(), kGraph);
  if (exec_info == nullptr || graph_is_watched()) return out;  // not inside a backward, or hooks
  for (size_t k = 0; k < params.size(); ++k) out[k] = route(params[k], *exec_info);
  return out;
}

// The deferred addition writes p.grad outside the engine: it takes the locks the engine's
// AccumulateGrad takes for the same params (in address order: no deadlock with another thread
// doing the same), so that a concurrent backward on shared params (Hogwild-style threads) never
// interleaves with it. Returns a token for unlock_accumulators.
int64_t lock_accumulators(at::TensorList params) {
  std::vector<NodePtr> nodes;
  for (const auto& p : params) {
    if (!p.defined() || !p.requires_grad()) continue;
    auto node = torch::autograd::impl::try_get_grad_accumulator(p);
    if (node) nodes.push_back(std::move(node));
  }
  std::sort(nodes.begin(), nodes.end(), [](const NodePtr& a, const NodePtr& b) { return a.get() < b.get(); });
  nodes.erase(std::unique(nodes.begin(), nodes.end(), [](const NodePtr& a, const NodePtr& b) { return a.get() == b.get(); }),
              nodes.end());
  for (auto& node : nodes) NodeMutex::of(*node).lock();
  std::lock_guard<std::mutex> guard(registry_mutex);
  const int64_t token = next_token++;
  registry.emplace(token, std::move(nodes));
  return token;
}

void unlock_accumulators(int64_t token) {
  std::vector<NodePtr> nodes;
  {
    std::lock_guard<std::mutex> guard(registry_mutex);
    auto found = registry.find(token);
    TORCH_CHECK(found != registry.end(), "fastreg_cpu::unlock_accumulators: unknown token ", token);
    nodes = std::move(found->second);
    registry.erase(found);
  }
  for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) NodeMutex::of(**it).unlock();
}

}  // namespace fastreg_cpu
