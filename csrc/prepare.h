// prepare.h: the tensor side of a call, before and after the kernels. The input checks, which
// memory each operand is read from and written to (the tensor itself, or a dense temporary in
// the param's memory order, copied back after an in-place op), and the Items the schedule is
// made from (schedule.h), with the coefficient tables read as doubles. The kernels below this
// see raw pointers only.
//
// Layout. A tensor that is non-overlapping and dense (contiguous, transposed, channels-last,
// ...) occupies exactly [data_ptr, data_ptr + numel) and is processed in memory order; its
// groups are located from its strides (fastreg/backends/_geometry.py). Anything else (slices,
// expanded tensors) is read through a dense temporary; in-place ops then copy the temporary
// back explicitly. Centers and gradients are used directly when their strides match the
// parameter's (as read), otherwise through a temporary in that layout.

#pragma once

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include "schedule.h"
#include "terms.h"

namespace fastreg_cpu {
namespace detail {

inline bool direct(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() && !t.is_neg() && !t.is_conj();
}

// Same element order in memory: equal strides on every dimension of size > 1.
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.dim() != b.dim()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// at::empty_like(t), without the dispatcher round trip when t is dense (its strides are then
// exactly what empty_like would choose): 2000 of these per call add up.
inline at::Tensor fresh_like(const at::Tensor& t) {
  if (t.is_non_overlapping_and_dense()) {
    return at::Tensor(at::detail::empty_strided_cpu(t.sizes(), t.strides(), t.scalar_type()));
  }
  return at::empty_like(t);
}

// A dense copy of `t` (in its own dtype) laid out like at::empty_like(like).
inline at::Tensor copy_like(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor tmp = at::empty_like(like, like.options().dtype(t.scalar_type()));
  tmp.copy_(t);
  return tmp;
}

inline at::ScalarType acc_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::ScalarType check_group(at::TensorList params, at::TensorList centers, const char* op) {
  TORCH_CHECK(!params.empty(), "fastreg_cpu::", op, ": params must not be empty");
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastreg_cpu::", op, ": unsupported dtype ", dtype);
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    TORCH_CHECK(p.device().is_cpu(), "fastreg_cpu::", op, ": params[", k, "]: expected a CPU tensor, got ",
                p.device());
    TORCH_CHECK(p.scalar_type() == dtype, "fastreg_cpu::", op, ": params[", k, "] is ", p.scalar_type(),
                ", params[0] is ", dtype, " (one dtype per call)");
    TORCH_CHECK(p.layout() == at::kStrided, "fastreg_cpu::", op, ": params[", k, "]: expected a strided tensor");
  }
  TORCH_CHECK(centers.empty() || centers.size() == params.size(), "fastreg_cpu::", op, ": ", params.size(),
              " params but ", centers.size(), " centers");
  for (size_t k = 0; k < centers.size(); ++k) {
    const auto& c = centers[k];
    TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == dtype && c.layout() == at::kStrided &&
                    c.sizes() == params[k].sizes(),
                "fastreg_cpu::", op, ": centers[", k, "] must be a strided CPU ", dtype, " tensor of shape ",
                params[k].sizes(), ", got ", c.scalar_type(), " ", c.sizes(), " on ", c.device());
  }
  return dtype;
}

// A (rows, width) coefficient table of the acc dtype (or double), one row per param, as doubles
// (terms.h Table). cpu.py hands every caller's coefficients over in this form (_terms.as_table).
inline Table read_table(const at::Tensor& table, at::ScalarType dtype, int64_t rows, int64_t width,
                        const char* name) {
  TORCH_CHECK(table.device().is_cpu() && table.dim() == 2 && table.size(0) == rows && table.size(1) == width,
              "fastreg_cpu: ", name, " must be a (", rows, ", ", width, ") CPU table, got shape ", table.sizes(),
              " on ", table.device());
  TORCH_CHECK(table.scalar_type() == acc_type(dtype) || table.scalar_type() == at::kDouble, "fastreg_cpu: ", name,
              " must be ", acc_type(dtype), " (or double) for ", dtype, " params, got ", table.scalar_type());
  const at::Tensor values = table.to(at::kDouble).contiguous();
  return {std::vector<double>(values.data_ptr<double>(), values.data_ptr<double>() + rows * width), width};
}

// A group vector argument (group_scale / group_norms) as doubles, or nullopt.
inline std::optional<std::vector<double>> read_group_vector(const std::optional<at::Tensor>& v, int64_t ngroups,
                                                     const char* name) {
  if (!v.has_value()) return std::nullopt;
  TORCH_CHECK(v->device().is_cpu() && v->dim() == 1 && v->size(0) == ngroups, "fastreg_cpu: ", name,
              " must be a (", ngroups, ",) CPU tensor, got shape ", v->sizes(), " on ", v->device());
  const at::Tensor values = v->to(at::kDouble).contiguous();
  return std::vector<double>(values.data_ptr<double>(), values.data_ptr<double>() + ngroups);
}

// The operands of a call, once the layouts are settled.
struct Prepared {
  std::vector<Item> items;
  std::vector<const void*> w;       // what is read as w
  std::vector<const void*> c;       // what is read as c (nullptr without centers)
  std::vector<void*> out;           // what is written (grads: outputs; add_grad_: gradients; prox_: w)
  std::vector<at::Tensor> keep;     // temporaries alive for the call
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;  // (destination, temporary)
  int64_t ngroups = 0;
  Schedule schedule;
};

// The structures of the params (_geometry.py Groups: per param a dim, or kNoGroups / kWhole, and
// the slices per group along that dim).
constexpr int64_t kNoGroups = -1;
constexpr int64_t kWhole = -2;  // the whole tensor is one group

// Fills items / w / c for params (with centers) and their group geometry; `read[k]` is the
// tensor actually read as params[k] (dense). Item k's (A, G, K) is _geometry.memory_geometry of
// its structure: WHOLE (1, 1, numel); k slices per group along dim j: G = size(j) / k groups,
// runs of K = k·stride(j) elements, repeated A times (a tensor with one group: (1, 1, numel)).
inline void add_items(Prepared& p, at::TensorList params, at::TensorList centers, at::IntArrayRef group_dims,
                      at::IntArrayRef group_sizes, std::vector<at::Tensor>& read) {
  TORCH_CHECK(group_dims.size() == params.size() && group_sizes.size() == params.size(), "fastreg_cpu: ",
              params.size(), " params but ", group_dims.size(), " group_dims and ", group_sizes.size(),
              " group_sizes");
  for (size_t k = 0; k < params.size(); ++k) {
    const at::Tensor& wv = read[k];
    const int64_t dim = group_dims[k];
    Item it;
    it.numel = wv.numel();
    if (dim != kNoGroups) {
      TORCH_CHECK(dim == kWhole || (dim >= 0 && dim < wv.dim()), "fastreg_cpu: group_dims[", k, "] = ", dim,
                  " for a tensor of ", wv.dim(), " dimensions");
      const int64_t size = group_sizes[k];
      TORCH_CHECK(dim == kWhole || (size >= 1 && wv.size(dim) % size == 0), "fastreg_cpu: group_sizes[", k,
                  "] = ", size, " does not divide dimension ", dim, " of params[", k, "] (", wv.sizes(), ")");
      const int64_t groups = dim == kWhole ? 1 : wv.size(dim) / size;
      it.group_base = p.ngroups;
      p.ngroups += groups;
      if (it.numel > 0) {
        it.G = groups;
        if (groups == 1) {
          it.A = 1;
          it.K = it.numel;
        } else {
          it.K = wv.stride(dim) * size;
          it.A = it.numel / (groups * it.K);
        }
      }
    }
    p.items.push_back(it);
    p.w.push_back(it.numel ? wv.const_data_ptr() : nullptr);
    if (centers.empty()) {
      p.c.push_back(nullptr);
    } else if (!it.numel) {
      p.c.push_back(nullptr);
    } else if (direct(centers[k]) && same_layout(centers[k], wv)) {
      p.c.push_back(centers[k].const_data_ptr());
    } else {
      p.keep.push_back(copy_like(centers[k], wv));
      p.c.push_back(p.keep.back().const_data_ptr());
    }
  }
}

// The dense tensor read as w: the param itself, or a copy laid out like empty_like(param).
inline at::Tensor readable(const at::Tensor& t, Prepared& p) {
  if (direct(t)) return t;
  at::Tensor tmp = at::empty_like(t);
  tmp.copy_(t);
  p.keep.push_back(tmp);
  return tmp;
}

// The dense tensor an in-place op writes for `target`, in the memory order of `like`: the target
// itself when it is dense in that order, else a copy of it that is copied back after the call
// (Prepared::copy_back).
inline at::Tensor writable(const at::Tensor& target, const at::Tensor& like, Prepared& p) {
  if (direct(target) && same_layout(target, like)) return target;
  at::Tensor tmp = copy_like(target, like);
  p.copy_back.emplace_back(target, tmp);
  return tmp;
}

template <typename T>
std::vector<T*> typed(const std::vector<void*>& v) {
  std::vector<T*> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = static_cast<T*>(v[k]);
  return out;
}

template <typename T>
std::vector<const T*> typed(const std::vector<const void*>& v) {
  std::vector<const T*> out(v.size());
  for (size_t k = 0; k < v.size(); ++k) out[k] = static_cast<const T*>(v[k]);
  return out;
}

}  // namespace detail
}  // namespace fastreg_cpu
