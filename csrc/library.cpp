// fastreg_cpu: the op schemas and their CPU implementations (the fake / meta implementations are
// registered from Python, in fastreg/backends/cpu.py). No pybind module: the library is loaded
// with torch.ops.load_library.

#include <torch/library.h>

#include "fastreg_cpu.h"

TORCH_LIBRARY(fastreg_cpu, m) {
  m.set_python_module("fastreg.backends.cpu");  // where the fake (meta) impls live
  m.def("sums(Tensor[] params, Tensor[] centers, int group_dim, float threshold) -> (Tensor, Tensor)");
  m.def("grads(Tensor[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_scale) -> Tensor[]");
  m.def("add_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] centers, int group_dim, Tensor coeffs, "
        "Tensor? group_norms) -> (Tensor, Tensor)");
  m.def("prox_(Tensor(a!)[] params, Tensor[] centers, int group_dim, Tensor coeffs, Tensor? group_norms) -> ()");
}

TORCH_LIBRARY_IMPL(fastreg_cpu, CPU, m) {
  m.impl("sums", &fastreg_cpu::sums);
  m.impl("grads", &fastreg_cpu::grads);
  m.impl("add_grad_", &fastreg_cpu::add_grad_);
  m.impl("prox_", &fastreg_cpu::prox_);
}
