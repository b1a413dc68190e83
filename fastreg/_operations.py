"""The three operations of a penalty, as functions of (plan, coefficients): its differentiable
value, its gradient added in place, its proximal step. ``Penalty`` (``fastreg.api``) holds the
state; these hold the maths of walking a plan: one call of an ``_ops`` primitive per kernel
group, then one per mesh of sharded parameters (``fastreg._sharded``).
"""

import torch

from fastreg import _ops, _sharded
from fastreg._coefficients import add_values
from fastreg.backends._geometry import NO_GROUPS


def value(plan, coefficients):
    """The penalty, differentiable with respect to every selected parameter."""
    group_dim = _active_group_dim(plan, coefficients)
    total = None
    for kg in plan.local:
        sums, _ = _ops.penalty_sums(kg.tensors, kg.centers, group_dim, plan.backend, kg.workspace)
        total = add_values(total, coefficients.value(sums))
    for part in plan.meshes:
        total = add_values(total, _sharded.value(plan, part, coefficients, group_dim))
    return _or_zero(plan, total)


def add_to_grad(plan, coefficients):
    """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` created if None);
    returns the value, detached."""
    group_dim = _active_group_dim(plan, coefficients)
    with torch.no_grad():
        total = None
        for kg in plan.local:
            coeffs = coefficients.gradient_vector(kg.acc_dtype, kg.device)
            sums, _ = _ops.add_grad_(plan.backend, kg.tensors, grads_of(kg.names, kg.tensors), kg.centers, group_dim,
                                     coeffs, None, kg.workspace)
            total = add_values(total, coefficients.value(sums))
        for part in plan.meshes:
            total = add_values(total, _sharded.add_to_grad(plan, part, coefficients, group_dim, grads_of))
    return _or_zero(plan, total).detach()


def prox(plan, coefficients, lr):
    """The proximal step for step size ``lr``, in place, under no_grad."""
    group_dim = _active_group_dim(plan, coefficients)
    with torch.no_grad():
        plan.check_in_place_once()
        for kg in plan.local:
            coeffs = coefficients.prox_vector(lr, kg.acc_dtype, kg.device)
            _ops.prox_(plan.backend, kg.tensors, kg.centers, group_dim, coeffs, None, kg.workspace)
        for part in plan.meshes:
            _sharded.prox(plan, part, coefficients, lr, group_dim)


def grads_of(names, params):
    """Every parameter's ``.grad``, created (zeros) where None, checked once per call."""
    grads = []
    for name, p in zip(names, params):
        g = p.grad
        if g is None:
            dtype = getattr(p, "grad_dtype", None) or p.dtype
            g = p.grad = torch.zeros_like(p, dtype=dtype)
        elif (g.layout != torch.strided or g.shape != p.shape or g.device != p.device
              or not g.is_floating_point()):
            _bad_grad(name, p, g)
        grads.append(g)
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


def _active_group_dim(plan, coefficients):
    """The plan's group_dim, or NO_GROUPS when the group term is a Python zero (no work)."""
    return plan.group_dim if coefficients.has_groups else NO_GROUPS


def _or_zero(plan, value):
    """``value``, or a zero of the penalty's result dtype in place of None."""
    return value if value is not None else torch.zeros((), dtype=plan.result_dtype)
