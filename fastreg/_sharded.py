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

The step in a diagonal metric (``metric_prox``) has no closed form per group: a group's
multiplier is the root of a scalar equation over all its elements. Groups within a shard step
in the fused kernels; a group that spans shards runs the float64 reference maths
(``_terms.metric_multiplier``) with every per-group sum, minimum and maximum all-reduced over
the mesh, once per Newton iteration — identical values on every rank, so identical decisions.

Per-parameter settings: the counted sums are reduced per *class* (``fastreg._plan``: a param
group, and whether its own group term counts), one row of the reduced vector each, so every
param group's global value comes out of the same single collective.
"""

import torch

from fastreg import _dtensor, _ops
from fastreg._coefficients import add_class_values, add_values, term
from fastreg.backends._geometry import NO_GROUPS, fixed_order_sum, group_sizes
from fastreg.backends._terms import Sum


def value(plan, part, coefficients, call):
    """Each param group's global penalty over one mesh's parameters, whose gradient is each
    shard's own."""
    calls = _calls_of(plan, call)
    classes = _classes(part)
    counted = torch.zeros(len(classes), len(Sum), dtype=plan.result_dtype, device=part.mesh.device_type)
    own, spanning = [None] * len(coefficients), []
    detached = [c.detached() for c in coefficients]
    for kg in part.groups:
        groups, _ = calls[id(kg)]
        result, group_sq = _ops.penalty_sums(kg.local(), kg.centers, groups, plan.backend, kg.workspace)
        if kg.reduce_groups and groups.any:  # the local Σ‖d_g‖ is meaningless: the global norms replace it
            result = _without_norm_sums(result)
            spanning.append((kg, groups, group_sq))
        add_class_values(own, kg.classes, result, detached)
        if kg.counted:
            counted = counted + _class_sums(kg, result.detach(), classes, counted)
    reduced = _dtensor.all_reduce_sum(_reduction_vector(counted, spanning), part.mesh)
    totals = reduced[:counted.numel()].view_as(counted)
    norms = _global_norms(reduced[counted.numel():], spanning)
    for (kg, groups, group_sq), n in zip(spanning, norms):
        totals = totals + _norm_sums(kg, groups, n, classes, totals)
        # The surrogate whose gradient is group·d_g/N_g on this shard (N_g held constant).
        safe = torch.where(n > 0, n, 1)
        weighted = group_sq * torch.where(n > 0, 0.5 / safe, 0).to(group_sq.dtype)
        for (g, counts, _), start, end in kg.classes:
            if not counts:
                continue
            lo, hi = _entries(kg, groups, start, end)
            surrogate = weighted[lo:hi].sum()
            own[g] = add_values(own[g], term(detached[g].group, surrogate, surrogate.dtype))
    out = [None] * len(coefficients)
    for (g, counts, _), k in classes.items():
        out[g] = add_values(out[g], coefficients[g].value(totals[k], with_groups=counts))
    for g in range(len(out)):
        if out[g] is not None and own[g] is not None:
            mine = own[g].to(out[g].dtype)
            out[g] = out[g] + (mine - mine.detach())
    return out


def add_to_grad(plan, part, coefficients, call, grads_of):
    """``p.grad += gradient`` on every local shard of one mesh; returns each param group's global value."""
    calls = _calls_of(plan, call)
    classes = _classes(part)
    counted = torch.zeros(len(classes), len(Sum), dtype=plan.result_dtype, device=part.mesh.device_type)
    spanning, written = [], []
    for kg in part.groups:
        groups, table = calls[id(kg)]
        params = kg.local()
        sharded_grads = grads_of(kg.names, kg.tensors)
        written += sharded_grads
        grads = [g.to_local() for g in sharded_grads]
        if kg.reduce_groups and groups.any:  # the global norms first, then the update
            result, group_sq = _ops.plain_sums(plan.backend, params, kg.centers, groups, workspace=kg.workspace)
            spanning.append((kg, groups, group_sq, params, grads, table))
            result = _without_norm_sums(result)
        else:
            result, _ = _ops.add_grad_(plan.backend, params, grads, kg.centers, groups, table, None, kg.workspace)
        if kg.counted:
            counted = counted + _class_sums(kg, result, classes, counted)
    pairs = [(kg, groups, sq) for kg, groups, sq, _, _, _ in spanning]
    reduced = _dtensor.all_reduce_sum(_reduction_vector(counted, pairs), part.mesh)
    totals = reduced[:counted.numel()].view_as(counted)
    for (kg, groups, group_sq, params, grads, table), n in zip(spanning, _global_norms(reduced[counted.numel():],
                                                                                       pairs)):
        # The sums of these came from the first pass: the update reads nothing more for them.
        _ops.add_grad_(plan.backend, params, grads, kg.centers, groups, table, n.to(group_sq.dtype), kg.workspace,
                       want_sums=False)
        totals = totals + _norm_sums(kg, groups, n, classes, totals)
    # The kernels bumped the local shards' versions; autograd checks the DTensors' own.
    torch.autograd.graph.increment_version(written)
    out = [None] * len(coefficients)
    for (g, counts, _), k in classes.items():
        out[g] = add_values(out[g], coefficients[g].value(totals[k], with_groups=counts))
    return out


def prox(plan, part, call):
    """The proximal step on every local shard of one mesh (one all-reduce for spanning groups)."""
    calls = _calls_of(plan, call)
    spanning = []
    for kg in part.groups:
        groups, table = calls[id(kg)]
        params = kg.local()
        if kg.reduce_groups and groups.any:  # the global norms of the shrunk values first
            _, shrunk_sq = _ops.plain_sums(plan.backend, params, kg.centers, groups, table, workspace=kg.workspace)
            spanning.append((kg, groups, shrunk_sq, params, table))
        else:
            _ops.prox_(plan.backend, params, kg.centers, groups, table, None, kg.workspace)
    if spanning:
        pairs = [(kg, groups, sq) for kg, groups, sq, _, _ in spanning]
        empty = torch.zeros(0, dtype=plan.result_dtype, device=part.mesh.device_type)
        reduced = _dtensor.all_reduce_sum(_reduction_vector(empty, pairs), part.mesh)
        for (kg, groups, shrunk_sq, params, table), n in zip(spanning, _global_norms(reduced, pairs)):
            _ops.prox_(plan.backend, params, kg.centers, groups, table, n.to(shrunk_sq.dtype), kg.workspace)
    # The kernels bumped the local shards' versions; autograd checks the DTensors' own.
    torch.autograd.graph.increment_version([t for kg in part.groups for t in kg.tensors])


def local_metrics(part, metric):
    """``{id(parameter): Metric}`` of one mesh's parameters, their tensors replaced by their local
    shards (``_local_metric``); a parameter absent from ``metric`` is absent here too (D = 1)."""
    return {id(t): _local_metric(name, t, metric[id(t)]) for kg in part.groups
            for name, t in zip(kg.names, kg.tensors) if metric.get(id(t)) is not None}


def metric_prox(plan, part, call, metric):
    """The step in a diagonal metric (``metric``: ``{id(parameter): Metric}`` of local shards, from
    ``local_metrics``; a parameter absent from it gets D = 1) on every local shard of one mesh.

    The tensors whose groups lie within a shard (or that have none in this call) go through the
    fused kernels, their local shards with the local shards of their metrics. A group that spans
    shards has one multiplier, a root over all its elements: each spanning tensor's local shard
    takes the float64 torch path of coupled groups (``_ops.coupled_metric_prox_``) with a
    ``reduce`` hook that all-reduces every per-group sum, minimum and maximum over the mesh
    (``_terms.metric_multiplier``): a few collectives to start, one per Newton iteration. Every
    rank gets the same values, so every rank takes the same branches and iterations, and each
    writes its own shard. The spanning tensors are stepped in the plan's order of parameters,
    the same on every rank."""
    calls = _calls_of(plan, call)
    position = {id(m): i for i, m in enumerate(plan.members)}
    spanning = []
    for kg in part.groups:
        groups, table = calls[id(kg)]
        params = kg.local()
        metrics = [metric.get(id(t)) for t in kg.tensors]
        span = [i for i, dim in enumerate(groups.dims) if dim != NO_GROUPS] if kg.reduce_groups else []
        fused = [i for i in range(len(params)) if i not in span]
        if len(fused) == len(params):
            _ops.prox_(plan.backend, params, kg.centers, groups, table, None, kg.workspace, metrics)
        elif fused:
            _ops.prox_(plan.backend, [params[i] for i in fused],
                       None if kg.centers is None else [kg.centers[i] for i in fused], groups.subset(fused),
                       table[fused], None, kg.workspace, [metrics[i] for i in fused])
        for i in span:
            piece = (params[i], None if kg.centers is None else kg.centers[i], metrics[i], table[i], groups.dims[i],
                     groups.sizes[i])
            spanning.append((position[id(kg.members[i])], kg.counted, piece))
    for _, counted, piece in sorted(spanning, key=lambda entry: entry[0]):
        _ops.coupled_metric_prox_([piece], _mesh_reduce(part.mesh, counted))
    # The kernels and copy_ bumped the local shards' versions; autograd checks the DTensors' own.
    torch.autograd.graph.increment_version([t for kg in part.groups for t in kg.tensors])


def _mesh_reduce(mesh, counted):
    """The ``reduce`` hook of ``_terms.metric_multiplier`` over ``mesh``: sums of the counted
    shards (a replica other than coordinate 0 adds zeros), minima and maxima over every rank."""

    def reduce(op, values):
        if op == "sum" and not counted:
            values = torch.zeros_like(values)
        return _dtensor.all_reduce(values, mesh, op)

    return reduce


def _local_metric(name, param, metric):
    """A ``Metric`` of a sharded parameter with its tensors replaced by their local shards: a
    DTensor laid out as the parameter (an optimizer's state is) as its local shard, a plain
    tensor of the parameter's full shape as this rank's part of it (a view; nothing copied)."""
    if metric is None:
        return None
    centered = None if metric.centered is None else _local_part(name, param, metric.centered)
    return metric._replace(v=_local_part(name, param, metric.v), centered=centered)


def _local_part(name, param, tensor):
    if _dtensor.is_sharded(tensor):
        if not _dtensor.same_placement(tensor, param):
            raise ValueError(f"fastreg: the metric of parameter {name!r} is a DTensor of shape {tuple(tensor.shape)} "
                             f"with placements {tuple(tensor.placements)} on {tensor.device_mesh}; the parameter has "
                             f"shape {tuple(param.shape)}, placements {tuple(param.placements)} on "
                             f"{param.device_mesh}: redistribute the metric to the parameter's placements")
        return tensor.to_local()
    if tuple(tensor.shape) != tuple(param.shape):
        raise ValueError(f"fastreg: the metric of sharded parameter {name!r} has shape {tuple(tensor.shape)}; give "
                         f"a DTensor laid out as the parameter, or a tensor of its full shape {tuple(param.shape)}")
    return tensor[_dtensor.local_slices(param)]


def _calls_of(plan, call):
    return dict(zip(map(id, plan.kernel_groups()), call))


def _classes(part):
    """Every class of the mesh's kernel groups, in a fixed order: class -> row of the reduction."""
    keys = sorted({cls for kg in part.groups for cls, _, _ in kg.classes})
    return {cls: k for k, cls in enumerate(keys)}


def _class_sums(kg, sums, classes, like):
    """``(classes, 3)``: this kernel group's per-tensor sums added per class (float64 rows)."""
    out = torch.zeros_like(like)
    for cls, start, end in kg.classes:
        out[classes[cls]] = sums[start:end].double().sum(dim=0).to(out.dtype)
    return out


def _entries(kg, groups, start, end):
    """The group-vector range of rows [start, end) of a kernel group."""
    sizes = group_sizes(kg.local(), groups)
    return sum(sizes[:start]), sum(sizes[:end])


def _norm_sums(kg, groups, norms, classes, like):
    """``(classes, 3)`` holding, per class, the sum of its global group norms in the group-norm slot."""
    out = torch.zeros_like(like)
    for cls, start, end in kg.classes:
        lo, hi = _entries(kg, groups, start, end)
        out[classes[cls], Sum.GROUP_NORM] = fixed_order_sum(norms[lo:hi].double()).to(out.dtype)
    return out


def _reduction_vector(counted, spanning):
    """What one all-reduce sends: the counted per-class sums, then every spanning group_sq (zeros
    from ranks that do not count, e.g. replicas other than coordinate 0)."""
    dtype = counted.dtype
    pieces = [counted.reshape(-1)]
    for kg, _, group_sq in spanning:
        piece = group_sq.detach().to(dtype)
        pieces.append(piece if kg.counted else torch.zeros_like(piece))
    return torch.cat(pieces)


def _global_norms(reduced_group_sq, spanning):
    norms, offset = [], 0
    for _, _, group_sq in spanning:
        norms.append(reduced_group_sq[offset:offset + group_sq.numel()].sqrt())
        offset += group_sq.numel()
    return norms


def _without_norm_sums(sums):
    """Per-tensor ``sums`` with the Σ‖d_g‖ column zeroed (for groups whose norms are global)."""
    return torch.cat([sums[:, :Sum.GROUP_NORM], sums.new_zeros(sums.shape[0], len(Sum) - Sum.GROUP_NORM)], dim=1)
