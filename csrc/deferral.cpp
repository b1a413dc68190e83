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
//               read this p.grad before the end of the backward); and the tensor given is that
//               node's own variable (not a copy a saved-tensor hook made)
//   2 kUnused   the current backward does not need this param's gradient (backward(inputs=...)
//               without it)

//
// defer_add_grad is the value's backward when every param's gradient can be deferred: it queues,
// on the engine, a callback that adds the penalty's gradient to p.grad once the backward is over
// (the C++ twin of fastreg/_ops.py's _add_deferred, for the cpu backend's kernels: no Python in
// the callback), and returns how many params it queued (0: this backward needs none of them), or
// -1 where the gradient must go through the graph.

#include <ATen/core/grad_mode.h>
#include <ATen/record_function.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros_like.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/variable.h>

#include <algorithm>
#include <deque>
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
  // The engine accumulates into its AccumulateGrad's own variable. A saved-tensor hook
  // (save_on_cpu, non-reentrant checkpointing, saved_tensors_hooks that copy what they save) hands
  // the backward another tensor with the same accumulator: the addition would write that copy's
  // .grad, never seen. The graph then.
  const auto* accumulate = dynamic_cast<const torch::autograd::AccumulateGrad*>(accumulator.get());
  if (accumulate == nullptr || !accumulate->variable.is_same(p)) return kGraph;
  return kDeferred;
}

// The lock AccumulateGrad::apply holds while it writes p.grad (Node::mutex_, protected: reached
// through a pointer to member formed in a derived class, never instantiated).
struct NodeMutex : Node {
  static std::mutex& of(Node& node) { return node.*(&NodeMutex::mutex_); }
};

// Locked accumulators by token: the nodes are kept alive until unlocked.
using NodePtr = decltype(torch::autograd::impl::try_get_grad_accumulator(std::declval<const at::Tensor&>()));
// The AccumulateGrad nodes of `params`, locked in address order (no deadlock with another thread
// doing the same), each once; the caller unlocks them in reverse order.
std::vector<NodePtr> lock_nodes(at::TensorList params) {
  std::vector<NodePtr> nodes;
  nodes.reserve(params.size());
  for (const auto& p : params) {
    if (!p.defined() || !p.requires_grad()) continue;
    auto node = torch::autograd::impl::try_get_grad_accumulator(p);
    if (node) nodes.push_back(std::move(node));
  }
  std::sort(nodes.begin(), nodes.end(), [](const NodePtr& a, const NodePtr& b) { return a.get() < b.get(); });
  nodes.erase(std::unique(nodes.begin(), nodes.end(), [](const NodePtr& a, const NodePtr& b) { return a.get() == b.get(); }),
              nodes.end());
  for (auto& node : nodes) NodeMutex::of(*node).lock();
  return nodes;
}

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
  std::vector<NodePtr> nodes = lock_nodes(params);
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

namespace {

// The additions run so far, and the params of each of the last kLogged (tests/test_deferred_backward.py
// counts them): integers only, nothing of the user's.
constexpr size_t kLogged = 1024;
std::mutex log_mutex;
int64_t additions = 0;
std::deque<int64_t> logged;

void log_addition(int64_t params) {
  std::lock_guard<std::mutex> guard(log_mutex);
  ++additions;
  logged.push_back(params);
  if (logged.size() > kLogged) logged.pop_front();
}

// Each param's number of groups (fastreg/backends/_geometry.py group_sizes).
std::vector<int64_t> group_counts(at::TensorList params, at::IntArrayRef dims, at::IntArrayRef sizes) {
  std::vector<int64_t> out(params.size(), 0);
  for (size_t k = 0; k < params.size(); ++k) {
    if (dims[k] == detail::kWhole) out[k] = 1;
    else if (dims[k] >= 0) out[k] = params[k].size(dims[k]) / sizes[k];
  }
  return out;
}

// One add_grad_ call's operands: the params `index` of a call (or all), with their rows of the
// coefficient table and their entries of the group norms.
struct Addition {
  std::vector<at::Tensor> params, centers;
  std::vector<int64_t> dims, sizes;
  at::Tensor coeffs;
  std::optional<at::Tensor> norms;

  Addition subset(const std::vector<int64_t>& index) const {
    if (index.size() == params.size()) return *this;
    Addition out;
    const auto counts = group_counts(params, dims, sizes);
    std::vector<int64_t> starts(counts.size() + 1, 0);
    for (size_t k = 0; k < counts.size(); ++k) starts[k + 1] = starts[k] + counts[k];
    std::vector<at::Tensor> pieces;
    for (const int64_t k : index) {
      out.params.push_back(params[k]);
      if (!centers.empty()) out.centers.push_back(centers[k]);
      out.dims.push_back(dims[k]);
      out.sizes.push_back(sizes[k]);
      if (norms.has_value()) pieces.push_back(norms->slice(0, starts[k], starts[k + 1]));
    }
    out.coeffs = coeffs.index_select(0, at::tensor(index));
    if (norms.has_value()) out.norms = at::cat(pieces);
    return out;
  }
};

// The end of the backward: p.grad += the penalty's gradient for every param, p.grad as the engine
// left it (created, zeros, where the task did not reach the param; a sparse one made dense, as
// adding a dense gradient to it in the graph would), under AccumulateGrad's locks; the gradients'
// version counters bumped, as a PyTorch in-place op does. One add_grad_ per gradient dtype.
void add_deferred(const Addition& a) {
  RECORD_FUNCTION("fastreg::deferred_add_grad", std::vector<c10::IValue>());  // (a profiler's row: bench.step)
  at::NoGradGuard no_grad;
  // AccumulateGrad's locks, held for this scope.
  std::vector<NodePtr> nodes = lock_nodes(a.params);
  struct Unlock {
    std::vector<NodePtr>& nodes;
    ~Unlock() {
      for (auto it = nodes.rbegin(); it != nodes.rend(); ++it) NodeMutex::of(**it).unlock();
    }
  } unlock{nodes};
  std::vector<at::Tensor> grads;
  grads.reserve(a.params.size());
  for (const auto& p : a.params) {
    at::Tensor& g = const_cast<at::Tensor&>(p).mutable_grad();
    if (!g.defined()) {
      g = zero_grad_like(p);
    } else if (g.layout() != at::kStrided) {
      g = g.to_dense();
    }
    grads.push_back(g);
  }
  // What a PyTorch in-place op refuses, raw kernels must refuse too (fastreg/_ops.py _check_writable).
  if (!c10::InferenceMode::is_enabled()) {
    for (const auto& g : grads) {
      TORCH_CHECK(!g.is_inference(), "fastreg: inplace update to an inference tensor outside InferenceMode is not "
                  "allowed (as for any PyTorch in-place op); clone it, or call this inside torch.inference_mode()");
    }
  }
  const at::ScalarType first = grads.front().scalar_type();
  if (std::all_of(grads.begin(), grads.end(), [&](const at::Tensor& g) { return g.scalar_type() == first; })) {
    add_grad_(a.params, grads, a.centers, a.dims, a.sizes, a.coeffs, a.norms, false);
  } else {
    // One add_grad_ per gradient dtype, in a fixed order (each call writes its own gradients).
    std::map<std::string, std::vector<int64_t>> by_dtype;
    for (size_t k = 0; k < grads.size(); ++k) by_dtype[c10::toString(grads[k].scalar_type())].push_back(k);
    for (const auto& entry : by_dtype) {
      const Addition part = a.subset(entry.second);
      std::vector<at::Tensor> part_grads;
      for (const int64_t k : entry.second) part_grads.push_back(grads[k]);
      add_grad_(part.params, part_grads, part.centers, part.dims, part.sizes, part.coeffs, part.norms, false);
    }
  }
  for (const auto& g : grads) torch::autograd::impl::bump_version(g);
  log_addition(static_cast<int64_t>(a.params.size()));
}

// (double(table) · double(grad_value)) as group_sq's dtype: the values of
// table.to(kDouble).mul(grad_value.to(kDouble)).to(dtype), element by element, for a float or
// double table (else those ATen ops).
at::Tensor deferred_coeffs(const at::Tensor& table, const at::Tensor& grad_value, at::ScalarType dtype) {
  const bool direct = table.device().is_cpu() && table.dim() == 2 && grad_value.device().is_cpu() &&
                      grad_value.numel() == 1 &&
                      (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble) &&
                      (dtype == at::kFloat || dtype == at::kDouble);
  if (!direct) return table.to(at::kDouble).mul(grad_value.to(at::kDouble)).to(dtype);
  double g = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_value.scalar_type(), "fastreg_cpu::defer_add_grad",
                                  [&] { g = static_cast<double>(*grad_value.const_data_ptr<scalar_t>()); });
  const int64_t rows = table.size(0), cols = table.size(1);
  at::Tensor out = at::empty({rows, cols}, table.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "fastreg_cpu::defer_add_grad", [&] {
    using C = scalar_t;
    const C* t = table.const_data_ptr<C>();
    const int64_t r_stride = table.stride(0), c_stride = table.stride(1);
    AT_DISPATCH_FLOATING_TYPES(dtype, "fastreg_cpu::defer_add_grad", [&] {
      scalar_t* o = out.data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          o[i * cols + j] = static_cast<scalar_t>(static_cast<double>(t[i * r_stride + j * c_stride]) * g);
        }
      }
    });
  });
  return out;
}

}  // namespace

int64_t defer_add_grad(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                       at::IntArrayRef group_sizes, const at::Tensor& table, const at::Tensor& grad_value,
                       const at::Tensor& group_sq) {
  // (create_graph: the gradient must carry its own graph; anomaly mode checks every node's
  // returned gradient for NaN: both keep the graph. fastreg/_ops.py checks them first too.)
  if (at::GradMode::is_enabled() || torch::autograd::AnomalyMode::is_enabled()) return -1;
  const auto routes = gradient_routes(params);
  std::vector<int64_t> index;
  for (size_t k = 0; k < routes.size(); ++k) {
    if (routes[k] == kGraph) return -1;
    if (routes[k] == kDeferred) index.push_back(static_cast<int64_t>(k));
  }
  if (index.empty()) return 0;  // this backward needs none of these gradients
  Addition all;
  all.params = params.vec();
  all.centers = centers.vec();
  all.dims = group_dims.vec();
  all.sizes = group_sizes.vec();
  // _ops._EagerValue.backward's grad_sums, and the norms of _ops._defer_to_end_of_backward: the same values.
  all.coeffs = deferred_coeffs(table, grad_value, group_sq.scalar_type());
  if (group_sq.numel()) all.norms = group_sq.sqrt();
  if (index.size() < params.size()) all = all.subset(index);
  torch::autograd::Engine::get_default_engine().queue_callback(
      [addition = std::move(all)]() { add_deferred(addition); });
  return static_cast<int64_t>(index.size());
}

std::vector<int64_t> deferral_log() {
  std::lock_guard<std::mutex> guard(log_mutex);
  std::vector<int64_t> out{additions};
  out.insert(out.end(), logged.begin(), logged.end());
  return out;
}

}  // namespace fastreg_cpu
