// fastreg_cpu::prox_: the proximal step, in place, with exact zeros (see fastreg_cpu.h; coeffs:
// the Prox slots of terms.h).

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

void prox_(at::TensorList params, at::TensorList centers, int64_t group_dim, const at::Tensor& coeffs,
           const std::optional<at::Tensor>& group_norms) {
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
  add_items(p, params, centers, group_dim, read);
  p.schedule = make_schedule(p.items);
  const auto k = read_coeffs(coeffs, dtype, Prox::kCount);
  const auto norms = read_group_vector(group_norms, p.ngroups, "group_norms");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::prox_", [&] {
    using T = scalar_t;
    using O = typename Traits<T>::opmath;
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      ProxOp<T, kCenter> op{Vectorized<O>(static_cast<O>(k[Prox::THRESHOLD])),
                            Vectorized<O>(static_cast<O>(k[Prox::DENOMINATOR])), k[Prox::GROUP_THRESHOLD],
                            k[Prox::DENOMINATOR], typed<T>(p.out), typed<T>(p.c)};
      std::vector<double> partials, slots;
      const auto coefs = group_coefs<T, kCenter, true>(
          p, k[Prox::THRESHOLD], [&](double n) { return static_cast<double>(op.group_coef(n)); }, norms, partials,
          slots);
      apply_tasks<T, kCenter>(p.schedule, p.items, typed<T>(p.w), typed<T>(p.c), op, coefs.group_coef.data(),
                              coefs.precomputed, !norms.has_value(), nullptr, nullptr);
    });
  });
  for (auto& pt : p.copy_back) pt.first.copy_(pt.second);  // explicit write into the real param
}

}  // namespace fastreg_cpu
