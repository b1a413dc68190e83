// fastreg_cpu::prox_: the proximal step, in place, with exact zeros (see fastreg_cpu.h; coeffs: a
// table of the Prox slots of terms.h, one row per param: its thresholds and constraints).

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

void prox_(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims, at::IntArrayRef group_sizes,
           const at::Tensor& coeffs, const std::optional<at::Tensor>& group_norms) {
  const at::ScalarType dtype = check_group(params, centers, "prox_");
  Prepared p;
  std::vector<at::Tensor> read;
  read.reserve(params.size());
  for (const auto& t : params) {
    if (!t.numel()) {
      read.push_back(t);
      p.out.push_back(nullptr);
      continue;
    }
    read.push_back(writable(t, t, p));  // read and written: the param, or a copy written back
    p.out.push_back(read.back().data_ptr());
  }
  add_items(p, params, centers, group_dims, group_sizes, read);
  p.schedule = make_schedule(p.items);
  const Table k = read_table(coeffs, dtype, static_cast<int64_t>(params.size()), Prox::kCount, "coeffs");
  const auto norms = read_group_vector(group_norms, p.ngroups, "group_norms");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::prox_", [&] {
    using T = scalar_t;
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      ProxOp<T, kCenter> op{k, typed<T>(p.out), typed<T>(p.c)};
      std::vector<double> partials, slots;
      const auto coefs = group_coefs<T, kCenter>(p, op, norms, partials, slots);
      apply_tasks<T, kCenter>(p.schedule, p.items, typed<T>(p.w), typed<T>(p.c), op, coefs.group_coef.data(),
                              coefs.precomputed, !norms.has_value(), nullptr, nullptr);
    });
  });
  for (auto& pt : p.copy_back) pt.first.copy_(pt.second);  // explicit write into the real param
}

}  // namespace fastreg_cpu
