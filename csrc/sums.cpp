// fastreg_cpu::sums: per tensor [Σ|s|, Σs², Σ_g ‖s_g‖] and the groups' squared norms, one pass (see
// fastreg_cpu.h); s = d, or the shrunk d of each row of a Prox table.

#include <ATen/ops/empty.h>
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

// Σ table·sums with the zero coefficients' terms dropped (never inf·0), in float64, as `dtype`: the
// same ATen ops as _ops.weighted_total, in the same order (bitwise the same value), in one call.
// The products are formed here element by element (double(sum) · double(coefficient), or 0 where
// the coefficient is 0: IEEE products, the values ATen's to/mul/ne/where give, in a contiguous
// tensor as theirs) and only their sum is ATen's (its reduction order); a table of another shape,
// layout or dtype takes the ATen ops.
at::Tensor weighted_total(const at::Tensor& per_tensor, const at::Tensor& table, at::ScalarType dtype) {
  // (a contiguous table, or one row expanded, as the plan's tables are: ATen's products of another
  // strided one follow its layout, and so does the sum's order)
  const bool direct = table.device().is_cpu() && table.sizes() == per_tensor.sizes() &&
                      (table.is_contiguous() || (table.stride(0) == 0 && table.stride(1) == 1)) &&
                      (table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble) &&
                      per_tensor.is_contiguous() &&
                      (per_tensor.scalar_type() == at::kFloat || per_tensor.scalar_type() == at::kDouble);
  if (!direct) {
    const at::Tensor coefficients = table.to(at::kDouble);
    const at::Tensor products = per_tensor.to(at::kDouble).mul(coefficients);
    return at::where(coefficients.ne(0), products, 0).sum().to(dtype);
  }
  const int64_t rows = per_tensor.size(0), cols = per_tensor.size(1);
  at::Tensor products = at::empty({rows, cols}, per_tensor.options().dtype(at::kDouble));
  double* out = products.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(table.scalar_type(), "fastreg_cpu::weighted_total", [&] {
    using C = scalar_t;
    const C* coef = table.const_data_ptr<C>();
    const int64_t r_stride = table.stride(0), c_stride = table.stride(1);
    AT_DISPATCH_FLOATING_TYPES(per_tensor.scalar_type(), "fastreg_cpu::weighted_total", [&] {
      const scalar_t* sum = per_tensor.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          const double c = static_cast<double>(coef[i * r_stride + j * c_stride]);
          out[i * cols + j] = c != 0 ? static_cast<double>(sum[i * cols + j]) * c : 0.0;
        }
      }
    });
  });
  const at::Tensor total = products.sum();
  if (dtype == at::kDouble) return total;
  if (dtype == at::kFloat) {  // total.to(kFloat): the same rounding (static_cast), without the op
    at::Tensor out_ = at::empty({}, total.options().dtype(at::kFloat));
    *out_.data_ptr<float>() = static_cast<float>(*total.const_data_ptr<double>());
    return out_;
  }
  return total.to(dtype);
}

// The value of one kernel group in eager mode (fastreg/_ops.py penalty_value): the sums' weighted
// total as `dtype`, and group_sq.
std::tuple<at::Tensor, at::Tensor> value(at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                                         at::IntArrayRef group_sizes, const at::Tensor& table, at::ScalarType dtype) {
  auto [per_tensor, group_sq] = sums(params, centers, group_dims, group_sizes, std::nullopt);
  return {weighted_total(per_tensor, table, dtype), group_sq};
}

}  // namespace fastreg_cpu
