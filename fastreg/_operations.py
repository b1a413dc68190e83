"""The three operations of a penalty, as functions of (plan, coefficients): its differentiable
value, its gradient added in place, its proximal step. ``Penalty`` (``fastreg.api``) holds the
state; these hold the maths of walking a plan: one call of an ``_ops`` primitive per kernel
group (every setting of its tensors in that one call, through per-tensor coefficient tables),
then one per mesh of sharded parameters (``fastreg._sharded``).

Values are formed per *class* (the tensors of one param group whose own group term counts, or
does not): a class's rows of the per-tensor sums are one slice (the plan orders them so), added
in float64, times that class's coefficients; a Python-zero coefficient drops its term. Each
param group's value is the sum of its classes' and of its couplings'; the penalty is the sum
of the groups' values, in group order.

Couplings (groups made of slices of several tensors) need their norms before any update: their
kernel groups get a norms pass first (``plain_sums``), the slices' squared norms are added
across tensors, and the update takes every norm as given (the path sharded groups take too).
"""

import torch

from fastreg import _ops, _sharded
from fastreg._coefficients import add_class_values, add_values
from fastreg._ops import profiled
from fastreg._plan import GRAD, PROX
from fastreg.backends._geometry import NO_GROUPS, group_sizes


def values(plan, coefficients):
    """Every param group's value (None for a group without tensors), differentiable."""
    call = plan.call(coefficients)
    totals = [None] * len(coefficients)
    group_sq_of = {}
    for kg, (groups, _) in zip(plan.local, call):
        sums, group_sq = _ops.penalty_sums(kg.tensors, kg.centers, groups, plan.backend, kg.workspace)
        add_class_values(totals, kg.classes, sums, coefficients)
        group_sq_of[id(kg)] = (groups, group_sq)
    _add_coupling_values(totals, plan, coefficients, group_sq_of)
    for part in plan.meshes:
        for g, v in enumerate(_sharded.value(plan, part, coefficients, call)):
            totals[g] = add_values(totals[g], v)
    return totals


def value(plan, coefficients):
    """The penalty, differentiable with respect to every selected parameter."""
    calls = _one_node_calls(plan, coefficients)
    if calls is not None:
        result = None
        for kg, groups, table in calls:
            result = add_values(result, _ops.penalty_value(kg.tensors, kg.centers, groups, table, plan.backend,
                                                           kg.workspace, plan.result_dtype))
        return _or_zero(plan, result)
    return total(plan, values(plan, coefficients))


def _one_node_calls(plan, coefficients):
    """``[(kernel group, groups, Gradient table)]`` where each kernel group's value (and its
    gradient added in place) can be one call of the whole Σ table·sums (see
    ``_one_node_per_group``), else None; the checks made once for these coefficients."""
    calls = plan.one_node_calls(coefficients)
    if calls is None and _one_node_per_group(plan, coefficients):
        calls = [(kg, groups, table) for kg, (groups, table) in zip(plan.local, plan.call(coefficients, GRAD))]
        plan.remember_one_node_calls(coefficients, calls)
    return calls


def _one_node_per_group(plan, coefficients):
    """Whether the value can be one autograd node per kernel group (``_ops.penalty_value``):
    eager, no couplings or sharded parameters (their values need the group norms outside the
    node), no coefficient that needs a gradient."""
    return (not torch.compiler.is_compiling() and not plan.couplings and not plan.meshes
            and not any(isinstance(c, torch.Tensor) and c.requires_grad for co in coefficients for c in co.terms()))


def add_to_grad(plan, coefficients):
    """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` created if None);
    returns each param group's value, detached."""
    if len(coefficients) == 1:  # one param group: one weighted sum per kernel group, one call each
        calls = _one_node_calls(plan, coefficients)
        if calls is not None:
            total = None
            for kg, groups, table in calls:  # (the one call makes no graph: no torch.no_grad() to pay for)
                value_ = _ops.add_to_grad_value(plan.backend, kg.tensors, kg.centers, groups, table, kg.workspace)
                if value_ is None:  # (the backend's single call declined these gradients)
                    with torch.no_grad():
                        value_ = _add_to_grad_of(plan, kg, groups, table)
                total = add_values(total, value_)
            return [total]
    call = plan.call(coefficients, GRAD)
    totals = [None] * len(coefficients)
    with torch.no_grad():
        coupled = _coupled_norms(plan, call, coefficients, shrink=False)
        for kg, (groups, table) in zip(plan.local, call):
            if id(kg) in coupled:  # the norms pass already made the sums
                sums, norms, _ = coupled[id(kg)]
                _ops.add_grad_(plan.backend, kg.tensors, grads_of(kg.names, kg.tensors), kg.centers, groups, table,
                               norms, kg.workspace, want_sums=False)
                add_class_values(totals, kg.classes, sums, coefficients)
            elif len(coefficients) == 1 and not plan.couplings:
                totals[0] = add_values(totals[0], _add_to_grad_of(plan, kg, groups, table))
            else:
                sums, _ = _ops.add_grad_(plan.backend, kg.tensors, grads_of(kg.names, kg.tensors), kg.centers,
                                         groups, table, None, kg.workspace)
                add_class_values(totals, kg.classes, sums, coefficients)
        _add_coupling_values(totals, plan, coefficients, {key: value[2] for key, value in coupled.items()})
        for part in plan.meshes:
            for g, v in enumerate(_sharded.add_to_grad(plan, part, coefficients, call, grads_of)):
                totals[g] = add_values(totals[g], v)
    return totals


def _add_to_grad_of(plan, kg, groups, table):
    """One kernel group's gradient added (``grads_of``, ``_ops.add_grad_``) and its value, the one
    weighted sum of a penalty with one param group."""
    sums, _ = _ops.add_grad_(plan.backend, kg.tensors, grads_of(kg.names, kg.tensors), kg.centers, groups, table,
                             None, kg.workspace)
    return _ops.weighted_total(sums, table, sums.dtype)


def prox(plan, coefficients, lr, metric=None):
    """The proximal step for step size ``lr``, in place, under no_grad. ``metric``: None
    (Euclidean), or ``{id(parameter): D}`` (a diagonal preconditioner per parameter; a parameter
    absent from it gets D = 1): the step ``argmin ½‖x − y‖²_D + lr·R(x)`` (sharded parameters:
    ``_sharded.metric_prox``)."""
    # The metric step's tables in float64: it reads 2·lr·l2 as DENOMINATOR − 1.
    call = plan.call(coefficients, PROX, lr, None if metric is None else torch.float64)
    with torch.no_grad():
        plan.check_in_place_once()
        if metric is not None:
            shards = [_sharded.local_metrics(part, metric) for part in plan.meshes]  # checked before any step
            _metric_prox(plan, call, metric)
            for part, local in zip(plan.meshes, shards):
                _sharded.metric_prox(plan, part, call, local)
            return
        coupled = _coupled_norms(plan, call, coefficients, shrink=True)
        for kg, (groups, table) in zip(plan.local, call):
            norms = coupled[id(kg)][1] if id(kg) in coupled else None
            _ops.prox_(plan.backend, kg.tensors, kg.centers, groups, table, norms, kg.workspace)
        for part in plan.meshes:
            _sharded.prox(plan, part, call)


def _metric_prox(plan, call, metric):
    """The step in a metric: each kernel group's tensors in one fused call, except the slices of
    active couplings, stepped together per coupling (``_ops.coupled_metric_prox_``)."""
    slices = [[] for _ in plan.couplings]
    for kg, (groups, table) in zip(plan.local, call):
        index = []
        for i, (m, t) in enumerate(zip(kg.members, kg.tensors)):
            if m.coupling is not None and groups.dims[i] != NO_GROUPS:
                slices[m.coupling].append((t, None if kg.centers is None else kg.centers[i], metric.get(id(t)),
                                           table[i], groups.dims[i], groups.sizes[i]))
            else:
                index.append(i)
        if len(index) == len(kg.tensors):
            _ops.prox_(plan.backend, kg.tensors, kg.centers, groups, table, None, kg.workspace,
                       [metric.get(id(t)) for t in kg.tensors])
        elif index:
            tensors = [kg.tensors[i] for i in index]
            _ops.prox_(plan.backend, tensors, None if kg.centers is None else [kg.centers[i] for i in index],
                       groups.subset(index), table[index], None, kg.workspace, [metric.get(id(t)) for t in tensors])
    for coupling in slices:
        if coupling:
            _ops.coupled_metric_prox_(coupling)


def _coupling_pieces(plan, groups_of):
    """Per coupling, the squared norms of its slices (one piece per slice), from each kernel
    group's (groups, group_sq); None for a coupling that is off in this call."""
    pieces = [[] for _ in plan.couplings]
    for kg in plan.local:
        if id(kg) not in groups_of:
            continue
        groups, group_sq = groups_of[id(kg)]
        offset = 0
        for m, n, dim in zip(kg.members, group_sizes(kg.tensors, groups), groups.dims):
            if m.coupling is not None and dim != NO_GROUPS:
                pieces[m.coupling].append(group_sq[offset:offset + n])
            offset += n
    return [p if p else None for p in pieces]


def _coupled_sq(pieces):
    """The squared norms of a coupling's groups: its slices' added in float64, in slice order."""
    device = pieces[0].device
    return torch.stack([p.to(device=device, dtype=torch.float64) for p in pieces]).sum(dim=0)


def _add_coupling_values(totals, plan, coefficients, groups_of):
    for coupling, pieces in zip(plan.couplings, _coupling_pieces(plan, groups_of)):
        if pieces is None:
            continue
        sq = _coupled_sq(pieces)
        positive = sq > 0
        norms = torch.where(positive, torch.where(positive, sq, 1).sqrt(), 0)  # no inf gradient at 0
        value = (coefficients[coupling.group].group * norms.sum()).to(plan.result_dtype)
        totals[coupling.group] = add_values(totals[coupling.group], value)


def _coupled_norms(plan, call, coefficients, shrink):
    """For each kernel group holding an active coupling: ``{id(kg): (sums, norms, (groups,
    group_sq))}`` from a norms pass (of d, or of the shrunk values with ``shrink``), the norms
    of its coupled slices replaced by their couplings'."""
    if not plan.couplings:
        return {}
    passes = {}
    for kg, (groups, table) in zip(plan.local, call):
        if any(m.coupling is not None and d != NO_GROUPS for m, d in zip(kg.members, groups.dims)):
            sums, group_sq = _ops.plain_sums(plan.backend, kg.tensors, kg.centers, groups,
                                             table if shrink else None, kg.workspace)
            passes[id(kg)] = (groups, group_sq, sums)
    if not passes:
        return {}
    groups_of = {key: (groups, group_sq) for key, (groups, group_sq, _) in passes.items()}
    coupled = [None if p is None else _coupled_sq(p).sqrt() for p in _coupling_pieces(plan, groups_of)]
    out = {}
    for kg in plan.local:
        if id(kg) not in passes:
            continue
        groups, group_sq, sums = passes[id(kg)]
        norms, offset = [], 0
        for m, n in zip(kg.members, group_sizes(kg.tensors, groups)):
            own = group_sq[offset:offset + n]
            norms.append(own.sqrt() if m.coupling is None or n == 0 else coupled[m.coupling].to(own))
            offset += n
        out[id(kg)] = (sums, torch.cat(norms), (groups, group_sq))
    return out


def grads_of(names, params):
    """Every parameter's ``.grad``, created (zeros) where None, checked once per call: every one
    checked before any is created (a refused gradient leaves every ``.grad`` as it was)."""
    grads = [p.grad for p in params]
    for name, p, g in zip(names, params, grads):
        if g is not None and (g.layout != torch.strided or g.shape != p.shape or g.device != p.device
                              or not g.is_floating_point()):
            _bad_grad(name, p, g)
    _ops.check_writable([g for g in grads if g is not None])
    for i, (p, g) in enumerate(zip(params, grads)):
        if g is None:
            grads[i] = p.grad = torch.zeros_like(p, dtype=getattr(p, "grad_dtype", None) or p.dtype)
    return grads


def _bad_grad(name, p, g):
    if g.layout != torch.strided:
        raise TypeError(f"fastreg: add_to_grad_ needs dense gradients; parameter {name!r} has a {g.layout} "
                        "gradient (use the autograd penalty instead)")
    if g.shape != p.shape:
        raise ValueError(f"fastreg: parameter {name!r} has shape {tuple(p.shape)} but its .grad has shape "
                         f"{tuple(g.shape)}")
    if g.device != p.device:
        raise ValueError(f"fastreg: parameter {name!r} is on {p.device} but its .grad is on {g.device}")
    raise TypeError(f"fastreg: parameter {name!r} has a .grad of dtype {g.dtype}; gradients must be floating-point")


def total(plan, totals):
    """The penalty from per-group values: their sum in group order, on the first one's device
    (a zero of the result dtype when there are none)."""
    result = None
    for v in totals:
        result = add_values(result, v)
    return _or_zero(plan, result)


def _or_zero(plan, value):
    """``value``, or a zero of the penalty's result dtype in place of None."""
    return value if value is not None else torch.zeros((), dtype=plan.result_dtype)
