// fastreg_cpu::prox_: the proximal step, in place, with exact zeros (see fastreg_cpu.h).

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
    } else if (direct(t)) {
      read.push_back(t);
      p.out.push_back(t.data_ptr());
    } else {
      at::Tensor tmp = at::empty_like(t);
      tmp.copy_(t);
      read.push_back(tmp);
      p.out.push_back(tmp.data_ptr());
      p.copy_back.emplace_back(t, tmp);
    }
  }
  add_items(p, params, centers, group_dim, read);
  p.schedule = make_schedule(p.items);
  const auto k = read_coeffs(coeffs, dtype, 3);
  const auto norms = read_group_vector(group_norms, p.ngroups, "group_norms");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::prox_", [&] {
    using T = scalar_t;
    using O = typename Traits<T>::opmath;
    auto run = [&](auto center_tag) {
      constexpr bool kCenter = decltype(center_tag)::value;
      ProxOp<T, kCenter> op{Vectorized<O>(static_cast<O>(k[0])), Vectorized<O>(static_cast<O>(k[1])), k[2], k[1],
                            typed<T>(p.out), typed<T>(p.c)};
      std::vector<double> partials, slots;
      const auto coefs = group_coefs<T, kCenter, true>(
          p, k[0], [&](double n) { return static_cast<double>(op.group_coef(n)); }, norms, partials, slots);
      apply_tasks<T, kCenter>(p.schedule, p.items, typed<T>(p.w), typed<T>(p.c), op, coefs.group_coef.data(),
                              coefs.precomputed, !norms.has_value(), nullptr, nullptr);
    };
    if (centers.empty()) {
      run(std::false_type{});
    } else {
      run(std::true_type{});
    }
  });
  for (auto& pt : p.copy_back) pt.first.copy_(pt.second);  // explicit write into the real param
}

}  // namespace fastreg_cpu
