// fastreg_cpu::sums: per tensor [Σ|s|, Σs², Σ_g ‖s_g‖] and the groups' squared norms, one pass (see
// fastreg_cpu.h); s = d, or the shrunk d of each row of a Prox table.

#include <ATen/ops/mul.h>
#include <ATen/ops/ne.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

std::tuple<at::Tensor, at::Tensor> sums(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                        at::IntArrayRef group_sizes, const std::optional<at::Tensor>& shrink) {
  const at::ScalarType dtype = check_group(params, centers, "sums");
  Prepared p;
  std::vector<at::Tensor> read;
  read.reserve(params.size());
  for (const auto& t : params) read.push_back(t.numel() ? readable(t, p) : t);
  add_items(p, params, centers, group_dims, group_sizes, read);
  p.schedule = make_schedule(p.items);
  const int64_t count = static_cast<int64_t>(params.size());
  const std::optional<Table> k =
      shrink.has_value() ? std::optional<Table>(read_table(*shrink, dtype, count, Prox::kCount, "shrink"))
                         : std::nullopt;
  std::vector<double> partials, slots;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::sums", [&] {
    using T = scalar_t;
    const auto w = typed<T>(p.w);
    const auto c = typed<T>(p.c);
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      const auto diff_of = diff_loaders<T, kCenter>(w, c);
      if (k.has_value()) {  // the sums of the shrunk values
        run_sums<T>(p, [&](int64_t item) { return shrunk_of(diff_of(item), *k, item); }, partials, slots);
      } else {
        run_sums<T>(p, diff_of, partials, slots);
      }
    });
  });
  return finish_sums(p, partials, slots, dtype);
}

// The value of one kernel group in eager mode (fastreg/_ops.py penalty_value): Σ table·sums with
// the zero coefficients' terms dropped (never inf·0), in float64, as `dtype`; and group_sq. The
// same ATen ops as _ops.weighted_total, in the same order (bitwise the same value), in one call.
std::tuple<at::Tensor, at::Tensor> value(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                         at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype) {
  auto [per_tensor, group_sq] = sums(params, centers, group_dims, group_sizes, std::nullopt);
  const at::Tensor coefficients = table.to(at::kDouble);
  const at::Tensor products = per_tensor.to(at::kDouble).mul(coefficients);
  return {at::where(coefficients.ne(0), products, 0).sum().to(dtype), group_sq};
}

}  // namespace fastreg_cpu
