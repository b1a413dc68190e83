// fastreg_cpu::grads: fresh gradients c1·sign(d) + (2·c2 + scale_g)·d (see fastreg_cpu.h), with
// c1, c2 the Gradient::L1, Gradient::L2 slots of each param's row of coeffs; the group term comes
// as group_scale.

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

std::vector<at::Tensor> grads(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                              at::IntArrayRef group_sizes, const at::Tensor& coeffs,
                              const std::optional<at::Tensor>& group_scale) {
  const at::ScalarType dtype = check_group(params, centers, "grads");
  Prepared p;
  std::vector<at::Tensor> outs;
  std::vector<at::Tensor> read;
  outs.reserve(params.size());
  read.reserve(params.size());
  for (const auto& t : params) {
    at::Tensor out = fresh_like(t);  // the layout of empty_like(t), as the fake impl promises
    outs.push_back(out);
    if (!t.numel()) {
      read.push_back(t);
      p.out.push_back(nullptr);
      continue;
    }
    if (direct(t) && same_layout(t, out)) {
      read.push_back(t);
    } else {
      read.push_back(copy_like(t, out));  // empty_like(t) layout == out's layout
      p.keep.push_back(read.back());
    }
    p.out.push_back(out.data_ptr());
  }
  add_items(p, params, centers, group_dims, group_sizes, read);
  p.schedule = make_schedule(p.items);
  const Table k = read_table(coeffs, dtype, static_cast<int64_t>(params.size()), Gradient::kCount, "coeffs");
  const auto scale = read_group_vector(group_scale, p.ngroups, "group_scale");
  std::vector<double> group_coef(p.ngroups, 0.0);
  for (size_t i = 0; i < p.items.size(); ++i) {  // GROUP is ignored: the group term is the scale
    const Item& it = p.items[i];
    for (int64_t g = it.group_base; g < it.group_base + it.G; ++g) {
      group_coef[g] = 2.0 * k(static_cast<int64_t>(i), Gradient::L2) + (scale.has_value() ? (*scale)[g] : 0.0);
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::grads", [&] {
    GradsOp<scalar_t> op{{k}, typed<scalar_t>(p.out)};
    const auto w = typed<scalar_t>(p.w);
    const std::vector<bool> none(p.items.size(), false);
    const auto c = typed<scalar_t>(p.c);
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      apply_tasks<scalar_t, kCenter>(p.schedule, p.items, w, c, op, group_coef.data(), none, false, nullptr, nullptr);
    });
  });
  return outs;
}

}  // namespace fastreg_cpu
