// fastreg_cpu::sums: [Σ|s|, Σs², Σ_g ‖s_g‖] and the groups' squared norms, one pass (see fastreg_cpu.h).

#include "fastreg_cpu.h"

namespace fastreg_cpu {

using namespace detail;

std::tuple<at::Tensor, at::Tensor> sums(at::TensorList params, at::TensorList centers, int64_t group_dim,
                                        double threshold) {
  const at::ScalarType dtype = check_group(params, centers, "sums");
  TORCH_CHECK(threshold >= 0.0, "fastreg_cpu::sums: threshold must be >= 0, got ", threshold);
  Prepared p;
  std::vector<at::Tensor> read;
  read.reserve(params.size());
  for (const auto& t : params) read.push_back(t.numel() ? readable(t, p) : t);
  add_items(p, params, centers, group_dim, read);
  p.schedule = make_schedule(p.items);
  std::vector<double> partials, slots;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fastreg_cpu::sums", [&] {
    with_center(!centers.empty(), [&](auto center) {
      constexpr bool kCenter = decltype(center)::value;
      if (threshold > 0.0) {  // the sums of the shrunk values
        run_sums<scalar_t, kCenter, true>(p, threshold, partials, slots);
      } else {
        run_sums<scalar_t, kCenter, false>(p, threshold, partials, slots);
      }
    });
  });
  return finish_sums(p, partials, slots, dtype);
}

}  // namespace fastreg_cpu
