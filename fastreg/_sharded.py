"""Sharded parameters (DTensor, as FSDP2's ``fully_shard`` makes them).

Each rank works on its local shards only (which may be empty). The value used in the loss
must be the global penalty, while each shard's gradient must be exactly its own penalty
gradient — not multiplied by the world size. So the value is

    all_reduce(counted local value).detach()  +  (own local value - own local value.detach())

whose forward is the global sum and whose backward is the local gradient. A replicated mesh
dimension holds the same data on every coordinate: only coordinate 0 is counted in the value,
but every replica gets the gradient, so replicas stay in sync.

The group term. When the parameter is sharded along its group dimension (``Shard(0)`` with
``group_dim=0``), every group lives on one rank and nothing changes. Otherwise (``Shard(0)``
with ``group_dim=1``: a column spans every shard) a group's squared norm is the sum of the
ranks' local ones: the local ``group_sq`` vectors are all-reduced together with the scalar
value, in the same single collective, and every rank then computes the same global norms
``N_g``. The group term's gradient on a shard is ``group · d_g / N_g``: the gradient of the
surrogate ``group · Σ_g local_sq_g / (2 N_g)`` with ``N_g`` held constant, which is how the
value carries it. One all-reduce per mesh dimension is the only communication.
"""

import torch

from fastreg import _dtensor, _ops
from fastreg._coefficients import add_values, term
from fastreg.backends._geometry import fixed_order_sum
from fastreg.backends._terms import Sum


def value(plan, part, coefficients, group_dim):
    """The global penalty of one mesh's parameters, whose gradient is each shard's own."""
    counted, own, spanning = None, None, []
    detached = coefficients.detached()
    for kg in part.groups:
        result, group_sq = _ops.penalty_sums(kg.local(), kg.centers, group_dim, plan.backend, kg.workspace)
        if kg.reduce_groups and group_dim >= 0:  # the local Σ‖d_g‖ is meaningless: the global norms replace it
            result = _without_norm_sum(result)
            spanning.append((kg, group_sq))
        own = add_values(own, detached.value(result))
        if kg.counted:
            counted = add_values(counted, result.detach().to(plan.result_dtype))
    reduced = _dtensor.all_reduce_sum(_reduction_vector(plan, part, counted, spanning), part.mesh)
    totals, norms = reduced[:len(Sum)], _global_norms(reduced[len(Sum):], spanning)
    for (kg, group_sq), n in zip(spanning, norms):
        totals = totals + _norm_sum_only(totals, fixed_order_sum(n))
        # The surrogate whose gradient is group·d_g/N_g on this shard (N_g held constant).
        safe = torch.where(n > 0, n, 1)
        surrogate = (group_sq * torch.where(n > 0, 0.5 / safe, 0).to(group_sq.dtype)).sum()
        own = add_values(own, term(detached.group, surrogate, surrogate.dtype))
    global_value = coefficients.value(totals)
    if own is None:
        return global_value
    own = own.to(global_value.dtype)
    return global_value + (own - own.detach())


def add_to_grad(plan, part, coefficients, group_dim, grads_of):
    """``p.grad += gradient`` on every local shard of one mesh; returns the global value."""
    counted, spanning, written = None, [], []
    for kg in part.groups:
        params = kg.local()
        sharded_grads = grads_of(kg.names, kg.tensors)
        written += sharded_grads
        grads = [g.to_local() for g in sharded_grads]
        if kg.reduce_groups and group_dim >= 0:  # the global norms first, then the update
            result, group_sq = _ops.plain_sums(plan.backend, params, kg.centers, group_dim, workspace=kg.workspace)
            spanning.append((kg, group_sq, params, grads))
            result = _without_norm_sum(result)
        else:
            result, _ = _add_grad(plan, kg, params, grads, group_dim, coefficients)
        if kg.counted:
            counted = add_values(counted, result.to(plan.result_dtype))
    pairs = [(kg, sq) for kg, sq, _, _ in spanning]
    reduced = _dtensor.all_reduce_sum(_reduction_vector(plan, part, counted, pairs), part.mesh)
    totals = reduced[:len(Sum)]
    for (kg, group_sq, params, grads), n in zip(spanning, _global_norms(reduced[len(Sum):], pairs)):
        # The sums of these came from the first pass: the update reads nothing more for them.
        _add_grad(plan, kg, params, grads, group_dim, coefficients, group_norms=n.to(group_sq.dtype),
                  want_sums=False)
        totals = totals + _norm_sum_only(totals, fixed_order_sum(n))
    # The kernels bumped the local shards' versions; autograd checks the DTensors' own.
    torch.autograd.graph.increment_version(written)
    return coefficients.value(totals)


def prox(plan, part, coefficients, lr, group_dim):
    """The proximal step on every local shard of one mesh (one all-reduce for spanning groups)."""
    spanning = []
    for kg in part.groups:
        params = kg.local()
        coeffs = coefficients.prox_vector(lr, kg.acc_dtype, kg.device)
        if kg.reduce_groups and group_dim >= 0:  # the global norms of the shrunk values first
            _, shrunk_sq = _ops.plain_sums(plan.backend, params, kg.centers, group_dim,
                                           threshold=lr * coefficients.l1, workspace=kg.workspace)
            spanning.append((kg, shrunk_sq, params, coeffs))
        else:
            _ops.prox_(plan.backend, params, kg.centers, group_dim, coeffs, None, kg.workspace)
    if spanning:
        pairs = [(kg, sq) for kg, sq, _, _ in spanning]
        reduced = _dtensor.all_reduce_sum(_reduction_vector(plan, part, None, pairs), part.mesh)
        for (kg, shrunk_sq, params, coeffs), n in zip(spanning, _global_norms(reduced[len(Sum):], pairs)):
            _ops.prox_(plan.backend, params, kg.centers, group_dim, coeffs, n.to(shrunk_sq.dtype), kg.workspace)
    # The kernels bumped the local shards' versions; autograd checks the DTensors' own.
    torch.autograd.graph.increment_version([t for kg in part.groups for t in kg.tensors])


def _add_grad(plan, kg, params, grads, group_dim, coefficients, group_norms=None, want_sums=True):
    coeffs = coefficients.gradient_vector(kg.acc_dtype, kg.device)
    return _ops.add_grad_(plan.backend, params, grads, kg.centers, group_dim, coeffs, group_norms, kg.workspace,
                          want_sums)


def _reduction_vector(plan, part, counted, spanning):
    """What one all-reduce sends: the counted sums, then every spanning group_sq (zeros from
    ranks that do not count, e.g. replicas other than coordinate 0)."""
    dtype = plan.result_dtype
    if counted is None:
        counted = torch.zeros(len(Sum), dtype=dtype, device=part.mesh.device_type)
    pieces = [counted.to(dtype)]
    for kg, group_sq in spanning:
        piece = group_sq.detach().to(dtype)
        pieces.append(piece if kg.counted else torch.zeros_like(piece))
    return torch.cat(pieces)


def _global_norms(reduced_group_sq, spanning):
    norms, offset = [], 0
    for kg, group_sq in spanning:
        norms.append(reduced_group_sq[offset:offset + group_sq.numel()].sqrt())
        offset += group_sq.numel()
    return norms


def _without_norm_sum(sums):
    """``sums`` with its Σ‖d_g‖ zeroed (for groups whose norms are global, not local)."""
    return torch.cat([sums[:Sum.GROUP_NORM], sums.new_zeros(len(Sum) - Sum.GROUP_NORM)])


def _norm_sum_only(like, norm_sum):
    """A sums vector holding only ``norm_sum`` in the group-norm slot."""
    pieces = [like.new_zeros(()) for _ in Sum]
    pieces[Sum.GROUP_NORM] = norm_sum.to(like.dtype)
    return torch.stack(pieces)
