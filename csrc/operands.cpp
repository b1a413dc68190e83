// What the eager fast paths keep in C++ between calls, so that a call hands over one integer
// instead of lists that torch.ops converts tensor by tensor (about 0.1 µs a tensor: 200 µs a call
// on 2,000 tensors, more than the kernel reading them). A TorchScript custom class would do the
// same, but torch.ops takes 8 µs to accept one as an argument; an integer costs nothing.
//   - Operands: a kernel group's params, centers and structure (group_dims, group_sizes), bound
//     once per kernel group and structure (bind_operands; fastreg/backends/cpu.py keeps the handle
//     in the kernel group's Workspace, which the Penalty owns, and releases it when that entry
//     dies), and the ops that take it: penalty_value_of (value_node.cpp's penalty_value) and
//     add_to_grad_of (add_to_grad.cpp's add_to_grad), the same functions on the same operands.
//   - Layout: the plan's per-call check (fastreg/_plan.py Plan.current) that no parameter changed
//     dtype or device, nor (those whose shape the plan depends on) shape: watch_layout,
//     layout_changed, released by its Plan.
//   - Memory: the Triton backend's cache-hit check (fastreg/backends/triton/tables.py) that the
//     tensors a cached table points into are still where it was built for (data pointer, shape,
//     strides): watch_memory, memory_changed, released with the table; and its per-call check
//     that a call's write targets (gradients) are where the last call's were, through weak
//     references (no old gradient kept alive): watch_targets, targets_changed.
// Both hold the tensors themselves: `p.data = x` swaps what a tensor holds in place (the same
// TensorImpl), so a held tensor always reads what the Python one does; a dtype, device or shape
// change makes the plan regroup, which drops its kernel groups' workspaces and these with them.
// A handle that was released (or never made) is an error, never a read of freed memory.

#include <c10/util/intrusive_ptr.h>
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <unordered_map>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

namespace {

struct Operands {
  std::vector<at::Tensor> params, centers;
  std::vector<int64_t> dims, sizes;
};

struct Layout {
  std::vector<at::Tensor> tensors, shaped;
  std::vector<at::ScalarType> dtypes;
  std::vector<c10::Device> devices;
  std::vector<std::vector<int64_t>> shapes;

  // Whether any tensor's dtype or device, or any shaped tensor's shape, differs from when it was
  // watched.
  bool changed() const {
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (tensors[k].scalar_type() != dtypes[k] || tensors[k].device() != devices[k]) return true;
    }
    for (size_t k = 0; k < shaped.size(); ++k) {
      if (shaped[k].sizes() != at::IntArrayRef(shapes[k])) return true;
    }
    return false;
  }
};

// Tensors and where their elements are (fastreg/backends/triton/tables.py: a cached table's params
// and centers, whose addresses it holds): data pointer, shape and strides at the time of watching.
struct Memory {
  std::vector<at::Tensor> tensors;
  std::vector<const void*> pointers;
  std::vector<std::vector<int64_t>> sizes, strides;

  bool changed() const {
    for (size_t k = 0; k < tensors.size(); ++k) {
      const at::Tensor& t = tensors[k];
      if (t.data_ptr() != pointers[k] || t.sizes() != at::IntArrayRef(sizes[k]) ||
          t.strides() != at::IntArrayRef(strides[k])) {
        return true;
      }
    }
    return false;
  }
};

// A call's write targets (the Triton backend's gradients) by weak reference: a gradient that is
// gone (its TensorImpl freed) counts as changed, and none is kept alive.
struct Targets {
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>> tensors;
  std::vector<const void*> pointers;
  std::vector<std::vector<int64_t>> strides;

  // (Read without taking a strong reference, whose atomics cost 0.1 µs a tensor: a weak reference
  // keeps the TensorImpl's memory, if not its storage, until it is released, so its fields can be
  // read; one whose last strong reference is gone has changed.)
  bool changed() const {
    for (size_t k = 0; k < tensors.size(); ++k) {
      if (tensors[k].expired()) return true;
      const c10::TensorImpl* impl = tensors[k]._unsafe_get_target();
      if (impl->data() != pointers[k] || impl->strides() != at::IntArrayRef(strides[k])) return true;
    }
    return false;
  }
};

// Handle -> object, for each kind; the entries live until their owner releases them.
template <typename T>
class Registry {
 public:
  int64_t add(std::shared_ptr<const T> object) {
    std::lock_guard<std::mutex> guard(mutex_);
    const int64_t handle = next_++;
    entries_.emplace(handle, std::move(object));
    return handle;
  }
  std::shared_ptr<const T> get(int64_t handle, const char* what) const {
    std::lock_guard<std::mutex> guard(mutex_);
    const auto found = entries_.find(handle);
    TORCH_CHECK(found != entries_.end(), "fastreg_cpu: no ", what, " with handle ", handle,
                " (released, or never made)");
    return found->second;
  }
  void release(int64_t handle) {
    std::shared_ptr<const T> dropped;  // (destroyed after the lock is let go)
    std::lock_guard<std::mutex> guard(mutex_);
    const auto found = entries_.find(handle);
    if (found == entries_.end()) return;
    dropped = std::move(found->second);
    entries_.erase(found);
  }
  int64_t size() const {
    std::lock_guard<std::mutex> guard(mutex_);
    return static_cast<int64_t>(entries_.size());
  }

 private:
  mutable std::mutex mutex_;
  std::unordered_map<int64_t, std::shared_ptr<const T>> entries_;
  int64_t next_ = 1;
};

Registry<Operands>& operands() {
  static auto* registry = new Registry<Operands>();  // (never destroyed: no teardown-order hazard)
  return *registry;
}

Registry<Layout>& layouts() {
  static auto* registry = new Registry<Layout>();
  return *registry;
}

Registry<Memory>& memories() {
  static auto* registry = new Registry<Memory>();
  return *registry;
}

Registry<Targets>& targets() {
  static auto* registry = new Registry<Targets>();
  return *registry;
}

int64_t bind_operands(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                      at::IntArrayRef group_sizes) {
  TORCH_CHECK(!params.empty() && group_dims.size() == params.size() && group_sizes.size() == params.size() &&
                  (centers.empty() || centers.size() == params.size()),
              "fastreg_cpu::bind_operands: ", params.size(), " params, ", centers.size(), " centers, ",
              group_dims.size(), " group_dims, ", group_sizes.size(), " group_sizes");
  return operands().add(std::make_shared<const Operands>(
      Operands{params.vec(), centers.vec(), group_dims.vec(), group_sizes.vec()}));
}

void release_operands(int64_t handle) { operands().release(handle); }

at::Tensor penalty_value_of(int64_t handle, const at::Tensor& table, at::ScalarType dtype) {
  const auto o = operands().get(handle, "operands");
  return penalty_value(o->params, o->centers, o->dims, o->sizes, table, dtype);
}

std::optional<at::Tensor> add_to_grad_of(int64_t handle, const at::Tensor& table) {
  const auto o = operands().get(handle, "operands");
  return add_to_grad(o->params, o->centers, o->dims, o->sizes, table);
}

int64_t watch_layout(at::TensorList tensors, at::TensorList shaped) {
  auto layout = std::make_shared<Layout>();
  layout->tensors = tensors.vec();
  layout->shaped = shaped.vec();
  for (const auto& t : tensors) {
    layout->dtypes.push_back(t.scalar_type());
    layout->devices.push_back(t.device());
  }
  for (const auto& t : shaped) layout->shapes.push_back(t.sizes().vec());
  return layouts().add(std::move(layout));
}

bool layout_changed(int64_t handle) { return layouts().get(handle, "layout")->changed(); }

void release_layout(int64_t handle) { layouts().release(handle); }

int64_t watch_memory(at::TensorList tensors) {
  auto memory = std::make_shared<Memory>();
  memory->tensors = tensors.vec();
  for (const auto& t : tensors) {
    memory->pointers.push_back(t.data_ptr());
    memory->sizes.push_back(t.sizes().vec());
    memory->strides.push_back(t.strides().vec());
  }
  return memories().add(std::move(memory));
}

bool memory_changed(int64_t handle) { return memories().get(handle, "memory watch")->changed(); }

void release_memory(int64_t handle) { memories().release(handle); }

int64_t watch_targets(at::TensorList tensors) {
  auto watched = std::make_shared<Targets>();
  for (const auto& t : tensors) {
    watched->tensors.emplace_back(t.getIntrusivePtr());
    watched->pointers.push_back(t.data_ptr());
    watched->strides.push_back(t.strides().vec());
  }
  return targets().add(std::move(watched));
}

bool targets_changed(int64_t handle) { return targets().get(handle, "targets watch")->changed(); }

void release_targets(int64_t handle) { targets().release(handle); }

// [operands bound, layouts watched, memories watched, targets watched] now (the ownership tests
// count them).
std::vector<int64_t> handles_held() {
  return {operands().size(), layouts().size(), memories().size(), targets().size()};
}

}  // namespace

}  // namespace fastreg_cpu

// A second block of the library's definitions (library.cpp holds the first). Registered without
// a dispatch key (CompositeImplicitAutograd): penalty_value_of calls the Autograd kernel of
// penalty_value itself (its node), add_to_grad_of sets p.grad, as their list forms do.
TORCH_LIBRARY_FRAGMENT(fastreg_cpu, m) {
  m.def("bind_operands(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes) -> int",
        &fastreg_cpu::bind_operands);
  m.def("release_operands(int handle) -> ()", &fastreg_cpu::release_operands);
  m.def("penalty_value_of(int operands, Tensor table, ScalarType dtype) -> Tensor", &fastreg_cpu::penalty_value_of);
  m.def("add_to_grad_of(int operands, Tensor table) -> Tensor?", &fastreg_cpu::add_to_grad_of);
  m.def("watch_layout(Tensor[] tensors, Tensor[] shaped) -> int", &fastreg_cpu::watch_layout);
  m.def("layout_changed(int layout) -> bool", &fastreg_cpu::layout_changed);
  m.def("release_layout(int handle) -> ()", &fastreg_cpu::release_layout);
  m.def("watch_memory(Tensor[] tensors) -> int", &fastreg_cpu::watch_memory);
  m.def("memory_changed(int memory) -> bool", &fastreg_cpu::memory_changed);
  m.def("release_memory(int handle) -> ()", &fastreg_cpu::release_memory);
  m.def("watch_targets(Tensor[] tensors) -> int", &fastreg_cpu::watch_targets);
  m.def("targets_changed(int targets) -> bool", &fastreg_cpu::targets_changed);
  m.def("release_targets(int handle) -> ()", &fastreg_cpu::release_targets);
  m.def("handles_held() -> int[]", &fastreg_cpu::handles_held);
}
