"""The launchers: the four contract calls as kernel launches over a call's tables.

``sums`` / ``grads`` / ``add_grad_`` / ``prox_`` here are the contract's (see
``fastreg/backends/__init__.py``) once the package's face has checked the device, made it
current and asked whether a CUDA graph is being captured (``capturing``). Each takes the
structures as a ``Groups`` (``_geometry.as_groups``: an int is one group_dim for every tensor),
finds or builds the tables (``tables._tables``), makes its coefficients a contiguous ``(T,
SLOTS)`` acc table on the device (``_terms.as_table``: a vector is every tensor's row), forms the
per-group coefficients, and launches:

``sums``       stage 1 (``_sums_kernel``, one launch per mode, tile and alignment present),
               the group reduction (``_group_sq_kernel``, with groups), ``_finish_kernel``
               (one row of sums per tensor: ``(T, 3)``).
``grads``      ``_elementwise_kernel`` with ``OP_GRADS`` into fresh outputs.
``add_grad_``  with groups, a stage-1 pass over the tensors with groups for the norms first;
               then ``_elementwise_kernel`` with ``OP_ADD_GRAD`` (which also sums the
               ``MODE_FLAT`` tensors) and ``_finish_kernel``.
``prox_``      with groups, the norms of the shrunk values first (stage 1 with the prox table
               as ``shrink``: each tensor's THRESHOLD and NONNEG); then
               ``_elementwise_kernel`` with ``OP_PROX``, in place. With ``metric``: the step in
               that metric (``_metric_prox_kernel``), one launch per ``MODE_FLAT`` launch of the
               tables (the tensors without groups) and one of a program per group; no norms
               first (each group's program finds its own).

* **Coefficients** stay on the device: the per-group coefficients (``group_coef``) are formed
  with tensor ops, never ``.item()``: no host sync, so a step can be CUDA-graph captured (with a
  workspace: see "CUDA-graph capture" in ``tables.py``). Each group takes its own tensor's row:
  the tables hold the group -> tensor index (``group_owner``), and a column of a coefficient
  table is gathered with it (``_per_group``); the prox factor is ``_terms.prox_group_factor``
  (the terms and the norm bounds in one exact step) on those columns.
* **Floating-point fusion** is set explicitly on every launch: ``enable_fp_fusion=True``
  (``a * b + c`` is one FMA, rounded once, as in the C++ kernels), so a change of Triton's
  default (off from Triton 3.10) changes no result.
* **Tuning constants** are read from ``tuning`` at every launch.
"""

import torch

from fastreg.backends._geometry import acc_dtype, group_sizes
from fastreg.backends._terms import SUMS, Gradient, Prox, as_table, prox_group_factor

from . import kernels, tables, tuning
from .kernels import _TL_DTYPES, MODE_FLAT, MODE_GROUP, OP_ADD_GRAD, OP_GRADS, OP_PROX


def _constants(plan, launch):
    block = tuning.block(plan.dtype)
    return dict(DTYPE=_TL_DTYPES[plan.dtype], ACC=_TL_DTYPES[acc_dtype(plan.dtype)], MODE=launch.mode,
                BLOCK=block, RUN_TILE=launch.run_tile or block, VEC=tuning.vector(plan.dtype),
                ALIGNED=launch.aligned, HAS_CENTER=plan.has_center, num_warps=tuning.NUM_WARPS,
                enable_fp_fusion=tuning.ENABLE_FP_FUSION)


def _acc_zeros(plan, n):
    return torch.zeros(max(n, 1), dtype=acc_dtype(plan.dtype), device=plan.device)


def _stage1(plan, shrink, partials, launches):
    """Stage 1 of the sums over ``launches``: partials (in place) and the slots; ``shrink``: a
    prox table (its THRESHOLD and NONNEG shrink the values), or ``None``."""
    slots = torch.empty(max(plan.nslots, 1), dtype=acc_dtype(plan.dtype), device=plan.device)
    for launch in launches:
        kernels._sums_kernel[(launch.programs,)](plan.w_ptrs, plan.c_ptrs, plan.info, launch.meta,
                                                 partials[2 * launch.partial_base:], slots,
                                                 plan.zero if shrink is None else shrink, plan.chunk,
                                                 SHRINK=shrink is not None, **_constants(plan, launch))
    return slots


def _group_sq(plan, slots):
    group_sq = _acc_zeros(plan, plan.ngroups)
    if plan.group_programs:
        kernels._group_sq_kernel[(plan.group_programs,)](slots, plan.ginfo, plan.gmap, group_sq,
                                                         GROUP_BLOCK=tuning.GROUP_BLOCK, num_warps=tuning.FINISH_WARPS,
                                                         enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    return group_sq


def _finish(plan, partials, group_sq):
    """The per-tensor sums ``(T, SUMS)`` from the partial pairs and the groups' squared norms."""
    out = torch.empty(plan.ntensors, SUMS, dtype=acc_dtype(plan.dtype), device=plan.device)
    programs = -(-plan.ntensors // tuning.FINISH_TENSORS)
    kernels._finish_kernel[(programs,)](partials, group_sq, plan.finfo, plan.ntensors, out,
                                        TENSORS=tuning.FINISH_TENSORS, BLOCK=tuning.FINISH_BLOCK,
                                        num_warps=tuning.FINISH_WARPS, enable_fp_fusion=tuning.ENABLE_FP_FUSION)
    return out, group_sq[:plan.ngroups]


def _empty_result(params, groups):
    acc = acc_dtype(params[0].dtype)
    n = sum(group_sizes(params, groups))
    return (torch.zeros(len(params), SUMS, dtype=acc, device=params[0].device),
            torch.zeros(n, dtype=acc, device=params[0].device))


def _grouped_launches(plan):
    return [launch for launch in plan.launches if launch.mode != MODE_FLAT]


def _table(coeffs, plan, kind):
    """``coeffs`` (a table, or a vector for every tensor) as a contiguous ``(T, len(kind))`` acc
    table on the device: row ``t`` is what the kernels of ``params[t]`` load. A vector without
    its trailing slots takes them from the tables' device copy of the defaults: no host copy."""
    coeffs = coeffs.to(device=plan.device, dtype=acc_dtype(plan.dtype))
    if coeffs.ndim == 1 and coeffs.numel() < len(kind):
        coeffs = torch.cat([coeffs, plan.defaults[kind][coeffs.numel():]])
    return as_table(coeffs, plan.ntensors, kind).contiguous()


def _shrink_table(shrink, plan):
    """``sums``' ``shrink`` as a prox table (only THRESHOLD and NONNEG are read), or ``None``
    for no shrinking. A float (the sharded prox's lr * l1) is every tensor's threshold: a
    zero fill and a column fill, no host-to-device copy, nothing kept."""
    if isinstance(shrink, torch.Tensor):
        return _table(shrink, plan, Prox)
    if not shrink:
        return None
    table = torch.zeros(plan.ntensors, len(Prox), dtype=acc_dtype(plan.dtype), device=plan.device)
    table[:, Prox.THRESHOLD] = float(shrink)
    return table


def _per_group(table, plan, slot):
    """Column ``slot`` of a coefficient table, one entry per group: its tensor's row."""
    return table[:, slot].index_select(0, plan.group_owner)


def sums(params, centers, groups, shrink, workspace, capturing):
    if not any(p.numel() for p in params):
        return _empty_result(params, groups)
    plan = tables._tables(params, centers, groups, workspace, capturing)
    partials = _acc_zeros(plan, 2 * plan.programs)
    slots = _stage1(plan, _shrink_table(shrink, plan), partials, plan.launches)
    return _finish(plan, partials, _group_sq(plan, slots))


def _norms(plan, shrink, given, partials, want_sums=True):
    """The groups' norms (of d, or of the values ``shrink`` shrinks), from a stage-1 pass over
    the tensors with groups (its sums land in ``partials``); ``given`` norms replace the computed
    ones, and then, unless the sums are wanted, no pass is made."""
    if given is not None and not want_sums:
        return given.to(device=plan.device, dtype=acc_dtype(plan.dtype))[:plan.ngroups], _acc_zeros(plan, plan.ngroups)
    group_sq = _group_sq(plan, _stage1(plan, shrink, partials, _grouped_launches(plan)))
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


def grads(params, centers, groups, coeffs, group_scale, workspace, capturing):
    outputs = list(map(torch.empty_like, params))  # fresh, as the contract says: the caller keeps them
    if not any(p.numel() for p in params):
        return outputs
    pointers = list(map(torch.Tensor.data_ptr, outputs))
    plan = tables._tables(params, centers, groups, workspace, capturing, pointers)
    coeffs = _table(coeffs, plan, Gradient)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # the coefficient of d per group: 2·L2 of its tensor + scale_g
        group_coef = 2 * _per_group(coeffs, plan, Gradient.L2)
        if group_scale is not None:
            group_coef = group_coef + group_scale.to(device=plan.device, dtype=coeffs.dtype)
    targets, copy_back = tables._targets_of(plan, params, outputs, pointers, workspace, capturing, like_params=True)
    _elementwise(plan, OP_GRADS, targets.table, coeffs, group_coef, plan.dtype, group_coef)
    for target, work in copy_back:
        target.copy_(work)
    return outputs


def add_grad_(params, grads_, centers, groups, coeffs, group_norms, workspace, capturing, want_sums=True):
    if not any(p.numel() for p in params):
        return _empty_result(params, groups) if want_sums else None
    pointers, strides = tables.target_layout(grads_, workspace, capturing)
    plan = tables._tables(params, centers, groups, workspace, capturing, pointers)
    coeffs = _table(coeffs, plan, Gradient)
    partials = _acc_zeros(plan, 2 * plan.programs)
    group_sq = _acc_zeros(plan, plan.ngroups)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # norms first (a pass over the tensors with groups), then the update
        norms, group_sq = _norms(plan, None, group_norms, partials, want_sums)
        positive = norms > 0
        group = torch.where(positive, _per_group(coeffs, plan, Gradient.GROUP) / torch.where(positive, norms, 1), 0)
        group_coef = (2 * _per_group(coeffs, plan, Gradient.L2) + group).to(coeffs.dtype)
    targets, copy_back = tables._targets_of(plan, params, grads_, pointers, workspace, capturing, strides=strides)
    _elementwise(plan, OP_ADD_GRAD, targets.table, coeffs, group_coef, grads_[0].dtype, partials)
    for target, work in copy_back:
        target.copy_(work)
    return _finish(plan, partials, group_sq) if want_sums else None


def prox_(params, centers, groups, coeffs, group_norms, workspace, capturing, metric=None):
    if not any(p.numel() for p in params):
        return None
    plan = tables._tables(params, centers, groups, workspace, capturing)
    if metric is not None:
        # The metric step needs 2·lr·l2 = DENOMINATOR − 1, which float32 rounds away next to 1:
        # formed from the float64 table here, its kernel reads it in the DENOMINATOR slot.
        table64 = as_table(coeffs.to(device=plan.device, dtype=torch.float64), plan.ntensors, Prox).clone()
        table64[:, Prox.DENOMINATOR] -= 1
        _metric_prox(plan, params, table64.to(acc_dtype(plan.dtype)).contiguous(), metric, workspace, capturing)
        for param, read in plan.copies:
            param.copy_(read)
        return
    coeffs = _table(coeffs, plan, Prox)
    group_coef = plan.zero  # unused without groups
    if plan.grouped:  # the factor on the shrunk values per group, from its tensor's row
        partials = _acc_zeros(plan, 2 * plan.programs)
        norms, _ = _norms(plan, coeffs, group_norms, partials, want_sums=False)
        group_coef = prox_group_factor(norms, *(_per_group(coeffs, plan, slot) for slot in (
            Prox.GROUP_THRESHOLD, Prox.DENOMINATOR, Prox.MIN_NORM, Prox.MAX_NORM))).to(coeffs.dtype)
    # In place: the target of each param is what its w is read from (the param, or a copy).
    _elementwise(plan, OP_PROX, plan.w_ptrs, coeffs, group_coef, plan.dtype, group_coef)
    for param, read in plan.copies:
        param.copy_(read)
    return None


def _metric_prox(plan, params, coeffs, metric, workspace, capturing):
    """The step in the metric ``metric`` (a ``_terms.MetricOperand``), in place on what the
    tables read as ``w``: the tensors without groups in the tables' ``MODE_FLAT`` programs, those
    with groups in one program per group (``MODE_GROUP``: the grid is the group vector, whose
    entries name their param, ``group_owner``; the groups of an empty param have nothing to do)."""
    operands, v_dtype, aligned = tables._metric_of(plan, params, metric, workspace, capturing)
    acc = acc_dtype(plan.dtype)
    table = metric.table.to(device=plan.device, dtype=acc).contiguous()
    records = len(plan.index)
    v_ptrs, m_ptrs = operands.table[:records], operands.table[records:]
    block = tuning.block(plan.dtype)
    constants = {"DTYPE": _TL_DTYPES[plan.dtype], "V_DTYPE": _TL_DTYPES[v_dtype], "ACC": _TL_DTYPES[acc],
                 "BLOCK": block, "VEC": tuning.vector(plan.dtype), "HAS_CENTER": plan.has_center,
                 "F64": acc == torch.float64, "num_warps": tuning.NUM_WARPS,
                 "enable_fp_fusion": tuning.ENABLE_FP_FUSION}
    for launch in plan.launches:
        if launch.mode == MODE_FLAT:  # the metric tensors' alignment too, for 128-bit loads of them
            kernels._metric_prox_kernel[(launch.programs,)](
                plan.w_ptrs, plan.c_ptrs, v_ptrs, m_ptrs, plan.info, launch.meta, plan.tensor_of, coeffs, table,
                plan.chunk, MODE=MODE_FLAT, ALIGNED=launch.aligned and aligned, **constants)
    if plan.grouped:
        kernels._metric_prox_kernel[(plan.ngroups,)](
            plan.w_ptrs, plan.c_ptrs, v_ptrs, m_ptrs, plan.info, plan.group_owner, plan.tensor_of, coeffs, table,
            plan.chunk, MODE=MODE_GROUP, ALIGNED=False, **dict(constants, BLOCK=tuning.group_block(plan.dtype)))
