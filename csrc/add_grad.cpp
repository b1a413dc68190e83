// fastreg_cpu::add_grad_: g += the penalty's gradient, in place, and the sums of the same pass
// (see fastreg_cpu.h; coeffs: a table of the Gradient slots of terms.h, one row per param).

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

std::tuple<at::Tensor, at::Tensor> add_grad_(at::TensorList params, at::TensorList grads_, at::TensorList centers,
                                             at::IntArrayRef group_dims, at::IntArrayRef group_sizes,
                                             const at::Tensor& coeffs,
                                             const std::optional<at::Tensor>& group_norms, bool want_sums) {
  const at::ScalarType dtype = check_group(params, centers, "add_grad_");
  TORCH_CHECK(grads_.size() == params.size(), "fastreg_cpu::add_grad_: ", params.size(), " params but ",
              grads_.size(), " grads");
  const at::ScalarType gdtype = grads_[0].scalar_type();
  Prepared p;
  std::vector<at::Tensor> read;
  read.reserve(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& t = params[k];
    const at::Tensor& g = grads_[k];
    TORCH_CHECK(g.device().is_cpu() && g.layout() == at::kStrided, "fastreg_cpu::add_grad_: grads[", k,
                "] must be a strided CPU tensor, got ", g.layout(), " on ", g.device());
    TORCH_CHECK(g.scalar_type() == gdtype, "fastreg_cpu::add_grad_: grads[", k, "] is ", g.scalar_type(),
                ", grads[0] is ", gdtype, " (one gradient dtype per call)");
    TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble || g.scalar_type() == at::kHalf ||
                    g.scalar_type() == at::kBFloat16,
                "fastreg_cpu::add_grad_: grads[", k, "] has unsupported dtype ", g.scalar_type());
    TORCH_CHECK(g.sizes() == t.sizes(), "fastreg_cpu::add_grad_: grads[", k, "] has shape ", g.sizes(),
                ", params[", k, "] has ", t.sizes());
    if (!t.numel()) {
      read.push_back(t);
      p.out.push_back(nullptr);
      continue;
    }
    read.push_back(readable(t, p));
    p.out.push_back(writable(g, read.back(), p).data_ptr());  // the real grad, or a copy written back
  }
  add_items(p, params, centers, group_dims, group_sizes, read);
  p.schedule = make_schedule(p.items);
  const Table k = read_table(coeffs, dtype, static_cast<int64_t>(params.size()), Gradient::kCount, "coeffs");
  const auto norms = read_group_vector(group_norms, p.ngroups, "group_norms");
  std::vector<double> partials(kPartial * p.schedule.npartials(), 0.0), slots(p.schedule.nslots, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::add_grad_", [&] {
    using T = scalar_t;
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      AddGradOp<T> op{{k}, grad_kind(gdtype), p.out};
      auto coefs = group_coefs<T, kCenter>(p, op, norms, partials, slots);
      if (norms.has_value() && !want_sums) {
        // Nothing left to compute for the tensors with groups: marked as done, their tasks skip
        // the visit that reads their elements for the sums (flat tasks' sums come free).
        std::fill(coefs.precomputed.begin(), coefs.precomputed.end(), true);
      }
      apply_tasks<T, kCenter>(p.schedule, p.items, typed<T>(p.w), typed<T>(p.c), op, coefs.group_coef.data(),
                              coefs.precomputed, !norms.has_value(), partials.data(), slots.data());
    });
  });
  for (auto& gt : p.copy_back) gt.first.copy_(gt.second);  // explicit write into the real grad
  return finish_sums(p, partials, slots, dtype);
}

}  // namespace fastreg_cpu
