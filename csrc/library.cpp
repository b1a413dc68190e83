// fastreg_cpu: the op schemas and their CPU implementations (the fake / meta implementations are
// registered from Python, in fastreg/backends/cpu.py). No pybind module: the library is loaded
// with torch.ops.load_library. term_layout and constants take no tensors: registered with their
// schema as CompositeImplicitAutograd kernels, callable anywhere, read once by cpu.py at load.

#include <torch/library.h>

#include <string>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

// "Sum.ABS=0,Sum.SQUARE=1,...": every slot of terms.h, checked against fastreg/backends/_terms.py.
std::string term_layout() {
  std::string out;
  for (const NamedSlot& slot : kSlots) {
    out += (out.empty() ? "" : ",") + std::string(slot.term) + "." + slot.name + "=" + std::to_string(slot.value);
  }
  return out;
}

// "chunk_elems=65536,...": the schedule's constants (schedule.h), for Python and the tests.
std::string constants() {
  return "chunk_elems=" + std::to_string(detail::kChunk) + ",run_min=" + std::to_string(detail::kRunMin) +
         ",row_max=" + std::to_string(detail::kRowMax) + ",rows_task=" + std::to_string(detail::kRowsTask);
}

}  // namespace fastreg_cpu

TORCH_LIBRARY(fastreg_cpu, m) {
  m.set_python_module("fastreg.backends.cpu");  // where the fake (meta) impls live
  m.def("sums(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor? shrink) "
        "-> (Tensor, Tensor)");
  m.def("grads(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor coeffs, "
        "Tensor? group_scale) -> Tensor[]");
  m.def("add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] centers, int[] group_dims, int[] group_sizes, "
        "Tensor coeffs, Tensor? group_norms, bool want_sums=True) -> (Tensor, Tensor)");
  m.def("prox_(Tensor(a!)[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor coeffs, "
        "Tensor? group_norms) -> ()");
  m.def("metric_prox_(Tensor(a!)[] params, Tensor[] centers, Tensor[] metric, Tensor?[] centered, "
        "int[] group_dims, int[] group_sizes, Tensor coeffs, Tensor metric_table) -> ()");
  m.def("value(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table, "
        "ScalarType dtype) -> (Tensor, Tensor)");
  m.def("penalty_value(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table, "
        "ScalarType dtype) -> Tensor");
  m.def("add_to_grad(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table) "
        "-> Tensor?", &fastreg_cpu::add_to_grad);
  m.def("gradient_routes(Tensor[] params) -> int[]", &fastreg_cpu::gradient_routes);
  m.def("defer_add_grad(Tensor[] params, Tensor[] centers, int[] group_dims, int[] group_sizes, Tensor table, "
        "Tensor grad_value, Tensor group_sq) -> int", &fastreg_cpu::defer_add_grad);
  m.def("deferral_log() -> int[]", &fastreg_cpu::deferral_log);
  m.def("lock_accumulators(Tensor[] params) -> int", &fastreg_cpu::lock_accumulators);
  m.def("unlock_accumulators(int token) -> ()", &fastreg_cpu::unlock_accumulators);
  m.def("term_layout() -> str", &fastreg_cpu::term_layout);
  m.def("constants() -> str", &fastreg_cpu::constants);
}

TORCH_LIBRARY_IMPL(fastreg_cpu, CPU, m) {
  m.impl("sums", &fastreg_cpu::sums);
  m.impl("value", &fastreg_cpu::value);
  m.impl("penalty_value", &fastreg_cpu::penalty_value_cpu);
  m.impl("grads", &fastreg_cpu::grads);
  m.impl("add_grad_", &fastreg_cpu::add_grad_);
  m.impl("prox_", &fastreg_cpu::prox_);
  m.impl("metric_prox_", &fastreg_cpu::metric_prox_);
}

// The value's own autograd node (value_node.cpp).
TORCH_LIBRARY_IMPL(fastreg_cpu, Autograd, m) {
  m.impl("penalty_value", &fastreg_cpu::penalty_value);
}
