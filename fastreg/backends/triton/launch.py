"""The launchers: the four contract calls as kernel launches over a call's tables.

``sums`` / ``grads`` / ``add_grad_`` / ``prox_`` here are the contract's (see
``fastreg/backends/__init__.py``) once the package's face has checked the device, made it
current and asked whether a CUDA graph is being captured (``capturing``). Each finds or builds
the tables (``tables._tables``), forms the per-group coefficients, and launches:

``sums``       stage 1 (``_sums_kernel``, one launch per mode, tile and alignment present),
               the group reduction (``_group_sq_kernel``, with groups), ``_finish_kernel``.
``grads``      ``_elementwise_kernel`` with ``OP_GRADS`` into fresh outputs.
``add_grad_``  with groups, a stage-1 pass over the tensors with groups for the norms first;
               then ``_elementwise_kernel`` with ``OP_ADD_GRAD`` (which also sums the
               ``MODE_FLAT`` tensors) and ``_finish_kernel``.
``prox_``      with groups, the norms of the shrunk values first; then ``_elementwise_kernel``
               with ``OP_PROX``, in place.

* **Coefficients** stay on the device: the per-group coefficients (``group_coef``) are formed
  with tensor ops, never ``.item()``: no host sync, so a step can be CUDA-graph captured (with a
  workspace: see "CUDA-graph capture" in ``tables.py``).
* **Floating-point fusion** is set explicitly on every launch: ``enable_fp_fusion=True``
  (``a * b + c`` is one FMA, rounded once, as in the C++ kernels), so a change of Triton's
  default (off from Triton 3.10) changes no result.
* **Tuning constants** are read from ``tuning`` at every launch.
"""

import torch

from fastreg.backends._geometry import acc_dtype, group_sizes
from fastreg.backends._terms import SUMS, Gradient, Prox

from . import kernels, tables, tuning
from .kernels import _TL_DTYPES, MODE_FLAT, OP_ADD_GRAD, OP_GRADS, OP_PROX


def _constants(plan, launch):
    block = tuning.block(plan.dtype)
    return dict(DTYPE=_TL_DTYPES[plan.dtype], ACC=_TL_DTYPES[acc_dtype(plan.dtype)], MODE=launch.mode,
                BLOCK=block, RUN_TILE=launch.run_tile or block, VEC=tuning.vector(plan.dtype),
                ALIGNED=launch.aligned, HAS_CENTER=plan.has_center, num_warps=tuning.NUM_WARPS,
                enable_fp_fusion=tuning.ENABLE_FP_FUSION)


def _acc_zeros(plan, n):
    return torch.zeros(max(n, 1), dtype=acc_dtype(plan.dtype), device=plan.device)


def _stage1(plan, threshold, shrink, partials, launches):
    """Stage 1 of the sums over ``launches``: partials (in place) and the slots."""
    slots = torch.empty(max(plan.nslots, 1), dtype=acc_dtype(plan.dtype), device=plan.device)
    for launch in launches:
        kernels._sums_kernel[(launch.programs,)](plan.w_ptrs, plan.c_ptrs, plan.info, launch.meta,
                                                 partials[2 * launch.partial_base:], slots, threshold, plan.chunk,
                                                 SHRINK=shrink, **_constants(plan, launch))
    return slots


def _group_sq(plan, slots):
    group_sq = _acc_zeros(plan, plan.ngroups)
    if plan.group_programs:
        kernels._group_sq_kernel[(plan.group_programs,)](slots, plan.ginfo, plan.gmap, group_sq,
                                                         GROUP_BLOCK=tuning.GROUP_BLOCK, num_warps=tuning.FINISH_WARPS,
                                                         enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    return group_sq


def _finish(plan, partials, group_sq):
    out = torch.empty(SUMS, dtype=acc_dtype(plan.dtype), device=plan.device)
    kernels._finish_kernel[(1,)](partials, plan.programs, group_sq, plan.ngroups, out, BLOCK=tuning.FINISH_BLOCK,
                                 num_warps=tuning.FINISH_WARPS, enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    return out, group_sq[:plan.ngroups]


def _empty_result(params, group_dim):
    acc = acc_dtype(params[0].dtype)
    n = sum(group_sizes(params, group_dim))
    return torch.zeros(SUMS, dtype=acc, device=params[0].device), torch.zeros(n, dtype=acc, device=params[0].device)


def _grouped_launches(plan):
    return [launch for launch in plan.launches if launch.mode != MODE_FLAT]


def sums(params, centers, group_dim, threshold, workspace, capturing):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim)
    plan = tables._tables(params, centers, group_dim, workspace, capturing)
    shrink = isinstance(threshold, torch.Tensor) or threshold != 0
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.reshape(1).to(acc_dtype(plan.dtype))
    elif shrink:  # a float (the sharded prox's lr * l1): one fill kernel, no copy, nothing kept
        threshold = torch.full((1,), float(threshold), dtype=acc_dtype(plan.dtype), device=plan.device)
    else:
        threshold = plan.zero
    partials = _acc_zeros(plan, 2 * plan.programs)
    slots = _stage1(plan, threshold, shrink, partials, plan.launches)
    return _finish(plan, partials, _group_sq(plan, slots))


def _coeffs(coeffs, plan):
    acc = acc_dtype(plan.dtype)
    if coeffs.dtype == acc and coeffs.device == plan.device and coeffs.numel() >= 3 and coeffs.is_contiguous():
        return coeffs  # the usual case: the caller's (3,) vector as is
    coeffs = coeffs.to(device=plan.device, dtype=acc).reshape(-1)
    if coeffs.numel() < 3:
        coeffs = torch.cat([coeffs, coeffs.new_zeros(3 - coeffs.numel())])
    return coeffs.contiguous()


def _norms(plan, threshold, shrink, given, partials, want_sums=True):
    """The groups' norms (of d, or of the shrunk values), from a stage-1 pass over the tensors
    with groups (its sums land in ``partials``); ``given`` norms replace the computed ones, and
    then, unless the sums are wanted, no pass is made."""
    if given is not None and not want_sums:
        return given.to(device=plan.device, dtype=acc_dtype(plan.dtype))[:plan.ngroups], _acc_zeros(plan, plan.ngroups)
    group_sq = _group_sq(plan, _stage1(plan, threshold, shrink, partials, _grouped_launches(plan)))
    if given is not None:
        return given.to(device=plan.device, dtype=acc_dtype(plan.dtype))[:plan.ngroups], group_sq
    return group_sq[:plan.ngroups].sqrt(), group_sq


def _elementwise(plan, op, targets, coeffs, group_coef, out_dtype, partials):
    acc = acc_dtype(plan.dtype)
    promote = torch.float64 if torch.float64 in (acc, out_dtype) else torch.float32
    for launch in plan.launches:
        reduce = bool(op == OP_ADD_GRAD and launch.mode == MODE_FLAT)
        kernels._elementwise_kernel[(launch.programs,)](
            plan.w_ptrs, plan.c_ptrs, targets, plan.info, launch.meta, coeffs, group_coef,
            partials[2 * launch.partial_base:] if reduce else partials, plan.chunk,
            OUT_DTYPE=_TL_DTYPES[out_dtype], PROMOTE=_TL_DTYPES[promote], OP=op, REDUCE=reduce,
            F64=acc == torch.float64, **_constants(plan, launch))


def grads(params, centers, group_dim, coeffs, group_scale, workspace, capturing):
    outputs = [torch.empty_like(p) for p in params]
    if not any(p.numel() for p in params):
        return outputs
    pointers = list(map(torch.Tensor.data_ptr, outputs))
    plan = tables._tables(params, centers, group_dim, workspace, capturing, tables._misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # the coefficient of d per group: 2·c2 + scale_g
        scale = 0 if group_scale is None else group_scale.to(device=plan.device, dtype=coeffs.dtype)
        group_coef = (2 * coeffs[Gradient.L2] + scale).expand(plan.ngroups).contiguous()
    targets, copy_back = tables._targets_of(plan, params, outputs, pointers, workspace, capturing)
    _elementwise(plan, OP_GRADS, targets.table, coeffs, group_coef, plan.dtype, group_coef)
    for target, work in copy_back:
        target.copy_(work)
    return outputs


def add_grad_(params, grads_, centers, group_dim, coeffs, group_norms, workspace, capturing, want_sums=True):
    if not any(p.numel() for p in params):
        return _empty_result(params, group_dim) if want_sums else None
    pointers = list(map(torch.Tensor.data_ptr, grads_))
    plan = tables._tables(params, centers, group_dim, workspace, capturing, tables._misaligned(pointers))
    coeffs = _coeffs(coeffs, plan)
    partials = _acc_zeros(plan, 2 * plan.programs)
    group_sq = _acc_zeros(plan, plan.ngroups)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # norms first (a pass over the tensors with groups), then the update
        norms, group_sq = _norms(plan, plan.zero, False, group_norms, partials, want_sums)
        positive = norms > 0
        group = torch.where(positive, coeffs[Gradient.GROUP] / torch.where(positive, norms, 1), 0)
        group_coef = (2 * coeffs[Gradient.L2] + group).to(coeffs.dtype).contiguous()
    targets, copy_back = tables._targets_of(plan, params, grads_, pointers, workspace, capturing)
    _elementwise(plan, OP_ADD_GRAD, targets.table, coeffs, group_coef, grads_[0].dtype, partials)
    for target, work in copy_back:
        target.copy_(work)
    return _finish(plan, partials, group_sq) if want_sums else None


def prox_(params, centers, group_dim, coeffs, group_norms, workspace, capturing):
    if not any(p.numel() for p in params):
        return None
    plan = tables._tables(params, centers, group_dim, workspace, capturing)
    coeffs = _coeffs(coeffs, plan)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # the factor max(0, 1 - group_threshold / ‖s_g‖) / denominator per group
        partials = _acc_zeros(plan, 2 * plan.programs)
        norms, _ = _norms(plan, coeffs.narrow(0, Prox.THRESHOLD, 1), True, group_norms, partials, want_sums=False)
        positive = norms > 0
        factor = torch.clamp(1 - coeffs[Prox.GROUP_THRESHOLD] / torch.where(positive, norms, 1), min=0)
        factor = factor / coeffs[Prox.DENOMINATOR]
        group_coef = torch.where(positive, factor, 0).to(coeffs.dtype).contiguous()
    # In place: the target of each param is what its w is read from (the param, or a copy).
    _elementwise(plan, OP_PROX, plan.w_ptrs, coeffs, group_coef, plan.dtype, group_coef)
    for param, read in plan.copies:
        param.copy_(read)
    return None
