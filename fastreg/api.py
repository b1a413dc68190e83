"""The public API: ``penalty``, ``Penalty``, ``available_backends``, ``l2_to_weight_decay``.

Convention (the Keras one, and what the usual hand-written loop computes), with ``d = w - c``
(``c`` the center, 0 by default) and ``d_g`` the groups of ``d`` along ``group_dim``::

    value    = l1 * Σ|d| + l2 * Σd² + group * Σ_g ‖d_g‖₂
    gradient = l1 * sign(d) + 2 * l2 * d + group * d_g / ‖d_g‖₂        (sign(0) = 0; 0 for a zero group)
"""

import math
import numbers
import weakref

import torch
from torch import nn

from fastreg import _dispatch, _ops, _sharded
from fastreg._plan import Plan
from fastreg.backends._geometry import NO_GROUPS, fixed_order_sum


def available_backends():
    """The backends that can run here, fastest first, e.g. ``["cpu", "torch"]``."""
    return _dispatch.available_backends()


def l2_to_weight_decay(l2):
    """The ``torch.optim.SGD`` ``weight_decay`` whose gradient equals an ``l2`` penalty's: ``2 * l2``.

    ``weight_decay=wd`` adds ``wd * w`` to the gradient, which is the gradient of
    ``wd / 2 * Σw²``; an ``l2 * Σw²`` penalty therefore needs ``wd = 2 * l2`` (not ``l2 / 2``).
    """
    _dispatch.check_coefficient("l2", l2)
    return 2.0 * float(l2)


def penalty(params, l1=0.0, l2=0.0, *, group=0.0, group_dim=0, center=None, exclude=None, backend="auto"):
    """``l1·Σ|d| + l2·Σd² + group·Σ_g ‖d_g‖`` over the selected parameters, as a differentiable 0-dim tensor.

    ``params``: an ``nn.Module`` (its parameters with ``requires_grad=True``), tensors, or
    ``(name, tensor)`` pairs. ``exclude``: ``None``, a preset (``"bias_and_norm"``: every tensor
    with ``ndim <= 1``; ``"embeddings"``: the weights of ``nn.Embedding`` / ``nn.EmbeddingBag``
    modules), a list mixing presets and glob patterns on names, or ``(name, tensor) -> bool``.
    ``l1``, ``l2``, ``group``: non-negative numbers or 0-dim tensors. ``group_dim``: 0 (rows) or 1
    (columns). ``center``: ``None`` or reference weights (see ``Penalty``; ``"init"`` needs a
    ``Penalty`` built once). ``backend``: ``"auto"`` or a name from ``available_backends()``.
    In a training loop, build a ``Penalty`` once instead.
    """
    if isinstance(center, str) and center == "init":
        raise ValueError("fastreg: penalty(..., center='init') would snapshot the weights at every call, "
                         "so the penalty would always be 0; build fastreg.Penalty(..., center='init') once, "
                         "right after loading the pretrained weights, and call it every step")
    cached = _cached_penalty(params, exclude, group_dim, center, backend)
    if isinstance(cached, Penalty):  # the coefficients go to this call only: the cached object is shared
        return cached._value(_checked_coefficients(l1, l2, group))
    reg = Penalty(params, l1, l2, group=group, group_dim=group_dim, center=center, exclude=exclude, backend=backend)
    if cached is not None:
        cached.store(reg)
    return reg()


# The one-call penalty(model, ...) selects parameters, checks them and plans kernel groups on
# every call (3.5 ms per step more than a reused Penalty on 2,000 tensors, measured): the plan
# is cached per module and arguments, and reused only while the module still has exactly the
# same parameters (the same tensor objects, requires_grad flags and data pointers: replacing a
# parameter, freezing one or swapping its storage with p.data = ... all invalidate the plan).
# Callable excludes and centers are never cached (their results could change between calls).
_one_call_cache = weakref.WeakKeyDictionary()  # module -> {argument key: (Penalty, signature)}
ONE_CALL_CACHE_SIZE = 8  # argument sets kept per module


def _module_signature(module):
    return [(id(p), p.requires_grad, p.data_ptr()) for p in module.parameters()]


def _exclude_key(exclude):
    if exclude is None or isinstance(exclude, str):
        return exclude
    if isinstance(exclude, (list, tuple)) and all(isinstance(item, str) for item in exclude):
        return tuple(exclude)
    return _UNCACHEABLE


_UNCACHEABLE = object()


def _cached_penalty(params, exclude, group_dim, center, backend):
    """The Penalty ``penalty(params, ...)`` built last time for these arguments, if still valid.

    On a miss (or when caching does not apply) returns None after making room for the new one;
    the caller builds it and ``_remember`` stores it.
    """
    if not isinstance(params, nn.Module) or center is not None or torch.compiler.is_compiling():
        return None
    exclude_key = _exclude_key(exclude)
    if exclude_key is _UNCACHEABLE or not isinstance(group_dim, int) or not isinstance(backend, str):
        return None
    key = (exclude_key, group_dim, backend)
    entries = _one_call_cache.get(params)
    signature = _module_signature(params)
    if entries is not None and key in entries:
        reg, cached_signature = entries[key]
        if cached_signature == signature:
            return reg
    return _Remember(params, key, signature)


class _Remember:
    """Not a Penalty: tells ``penalty`` to build one and store it under this key."""

    def __init__(self, module, key, signature):
        self.module, self.key, self.signature = module, key, signature

    def store(self, reg):
        entries = _one_call_cache.setdefault(self.module, {})
        if len(entries) >= ONE_CALL_CACHE_SIZE and self.key not in entries:
            entries.pop(next(iter(entries)))
        entries[self.key] = (reg, self.signature)
        return reg


class Penalty:
    """A reusable penalty over a fixed selection of parameters: L1, L2, elastic net, group lasso,
    each optionally toward reference weights.

    >>> reg = fastreg.Penalty(model, l2=1e-4, exclude="bias_and_norm")
    >>> loss = loss_fn(model(x), y) + reg()          # differentiable
    or, without autograd:
    >>> loss.backward(); reg.add_to_grad_(); optimizer.step()
    and for sparsity (exact zeros):
    >>> optimizer.step(); reg.prox_(lr)

    ``group`` (λg) adds ``λg·Σ_g ‖w_g‖₂``, with ``w_g = w.select(group_dim, g)``: rows (output
    units, conv filters) for ``group_dim=0``, columns (input features, channels) for 1; tensors
    with ``ndim < 2`` get no group term. Its proximal step zeroes whole groups exactly. The
    groups are unweighted (as sklearn's MultiTaskLasso); for the √(group size) weighting of
    Yuan & Lin, use one ``Penalty`` per parameter shape with ``group = λ·√(size)``.

    ``center`` pulls the weights toward reference values instead of 0 (L2-SP, Li et al. 2018):
    every term is computed on ``d = w - c``. ``"init"``: a snapshot of the selected parameters
    now (build the penalty right after loading the pretrained weights); a mapping from
    parameter names to tensors (e.g. ``pretrained.state_dict()``; a parameter missing from it,
    such as a new head, is pulled toward 0); or a sequence of tensors aligned with the
    regularized (or with all candidate) parameters. Centers are stored once, converted to each
    parameter's dtype, device and layout: **one extra copy of the selected parameters**.

    ``l1``, ``l2`` and ``group`` may be reassigned between steps; 0-dim tensor coefficients can
    also be changed in place, and do not make torch.compile recompile.
    """

    def __init__(self, params, l1=0.0, l2=0.0, *, group=0.0, group_dim=0, center=None, exclude=None,
                 backend="auto"):
        self.l1 = l1
        self.l2 = l2
        self.group = group
        self._plan = Plan(params, exclude, group_dim, center, backend)
        self._attached = weakref.WeakKeyDictionary()  # optimizer -> its live attach handle

    l1 = property(lambda self: self._l1, lambda self, v: setattr(self, "_l1", _dispatch.check_coefficient("l1", v)))
    l2 = property(lambda self: self._l2, lambda self, v: setattr(self, "_l2", _dispatch.check_coefficient("l2", v)))
    group = property(lambda self: self._group,
                     lambda self, v: setattr(self, "_group", _dispatch.check_coefficient("group", v)))

    @property
    def backend(self):
        """The backend requested (``"auto"`` or a name); see ``explain()`` for what runs."""
        return self._plan.backend

    @property
    def group_dim(self):
        return self._plan.group_dim

    def named_parameters(self):
        """The ``(name, tensor)`` pairs this penalty regularizes."""
        return list(zip(self._plan.names, self._plan.tensors))

    # --------------------------------------------------------------------------------------
    # The three ways to apply it.

    def __call__(self):
        """The penalty value, differentiable with respect to every selected parameter."""
        return self._value(self._checked_coefficients())

    def _value(self, coefficients):
        group_dim = self._active_group_dim(coefficients)
        plan = self._plan.current()
        backend = plan.backend
        total = None
        for kg in plan.local:
            result, _ = _ops.penalty_sums(kg.tensors, kg.centers, group_dim, backend, kg.workspace)
            total = _add(total, _combine(result, coefficients))
        for part in plan.meshes:
            total = _add(total, self._sharded_value(part, coefficients, group_dim))
        return self._or_zero(total)

    def add_to_grad_(self):
        """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` is created if None).

        Returns the penalty value, detached. One fused pass per kernel group, no autograd
        graph (two with a group term whose groups are strided). Call it once per optimizer
        step, after the loss's backward (and after all gradient-accumulation micro-batches);
        with ``torch.amp.GradScaler``, call it after ``scaler.unscale_(optimizer)``: it adds
        unscaled gradients. A gradient may have another dtype than its parameter (e.g. fp32
        gradients of bf16 weights, with ``p.grad_dtype``): it is updated in its own dtype.
        """
        coefficients = self._checked_coefficients()
        group_dim = self._active_group_dim(coefficients)
        plan = self._plan.current()
        with torch.no_grad():
            total = None
            for kg in plan.local:
                result, _ = _add_grad(kg, kg.tensors, _grads_of(kg.names, kg.tensors), group_dim, coefficients,
                                      plan.backend)
                total = _add(total, _combine(result, coefficients))
            for part in plan.meshes:
                total = _add(total, self._sharded_add_grad(part, coefficients, group_dim))
        return self._or_zero(total).detach()

    def prox_(self, lr):
        """The proximal step of the penalty for step size ``lr``, in place, under no_grad.

        With ``s = sign(d)·max(|d| − lr·l1, 0)``: ``w = c + max(0, 1 − lr·group/‖s_g‖)·s /
        (1 + 2·lr·l2)`` (the group factor only for tensors with groups). L1 drives single
        weights, the group term whole groups, to exact zeros (``w == c`` with a center),
        which subgradient steps never do. Call it right after ``optimizer.step()``, with a
        penalty that is *not* also in the loss. Sharded parameters are updated shard by shard;
        only strided groups of sharded parameters need communication (one all-reduce).
        """
        self._prox(self._plan, _checked_lr(lr))

    def attach(self, optimizer, mode="grad"):
        """Apply the penalty inside ``optimizer.step()``: no line in the training loop.

        ``mode="grad"``: right before every step, ``add_to_grad_()`` — after gradient clipping
        and after ``torch.amp.GradScaler`` unscaled the gradients, exactly where SGD applies
        ``weight_decay``; a step the scaler skips (inf/NaN) runs no hook.
        ``mode="prox"``: right after every step, ``prox_`` with the learning rate each
        parameter's own param group has at that step (schedulers, per-group lrs; a group at
        lr 0 is left alone). Every selected parameter must be in one of the optimizer's groups.

        Works with anything that ends in ``optimizer.step()`` (Hugging Face ``Trainer``,
        Lightning, accelerate's wrapped optimizers). Returns a handle: ``handle.remove()``, and
        ``handle.last_value`` (the penalty at the latest step, detached; None before the first).
        """
        from fastreg._attach import attach

        return attach(self, optimizer, mode)

    # --------------------------------------------------------------------------------------
    # Inspection.

    def explain(self):
        """A table of every candidate parameter: shape, dtype, included or why excluded, its
        groups and center when those terms are used, and the backend of each kernel group."""
        show_groups = not _dispatch.is_zero(self._group)
        show_centers = self._plan.has_centers
        header = ["parameter", "shape", "dtype", "elements", "regularized"]
        header += ["groups"] if show_groups else []
        header += ["center"] if show_centers else []
        rows = [tuple(header)]
        for info in self._plan.info:
            status = "yes" if info.excluded_because is None else f"no: {info.excluded_because}"
            row = [info.name, str(tuple(info.tensor.shape)), str(info.tensor.dtype).replace("torch.", ""),
                   f"{info.tensor.numel():,}", status]
            row += [info.groups if info.excluded_because is None else "-"] if show_groups else []
            row += [info.center if info.excluded_because is None else "-"] if show_centers else []
            rows.append(tuple(row))
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        included = [i for i in self._plan.info if i.excluded_because is None]
        excluded = [i for i in self._plan.info if i.excluded_because is not None]
        backends = ", ".join(
            f"{_dispatch.backend_for(self._plan.backend, kg.device).NAME} ({kg.device}, "
            f"{str(kg.dtype).replace('torch.', '')}{', centered' if kg.centers is not None else ''}"
            f"{', sharded' if kg.sharded else ''}: {len(kg.tensors)} tensors)"
            for kg in self._plan.current().kernel_groups()
        )
        terms = f"l1={_show(self.l1)}  l2={_show(self.l2)}"
        if show_groups:
            terms += f"  group={_show(self.group)} (group_dim={self._plan.group_dim})"
        lines += [
            "",
            f"regularized: {len(included)} tensors, {sum(i.tensor.numel() for i in included):,} elements",
            f"excluded:    {len(excluded)} tensors, {sum(i.tensor.numel() for i in excluded):,} elements",
            f"{terms}  backend={self._plan.backend}" + (f" -> {backends}" if backends else ""),
        ]
        return "\n".join(lines)

    def __repr__(self):
        terms = f"l1={_show(self.l1)}, l2={_show(self.l2)}"
        if not _dispatch.is_zero(self._group):
            terms += f", group={_show(self.group)}, group_dim={self._plan.group_dim}"
        return (f"Penalty({terms}{', centered' if self._plan.has_centers else ''}, "
                f"tensors={len(self._plan.tensors)}, backend={self._plan.backend!r})")

    # --------------------------------------------------------------------------------------
    # Internals.

    def _checked_coefficients(self):
        # Tensor coefficients may have been changed in place since they were set.
        return _checked_coefficients(self._l1, self._l2, self._group)

    def _active_group_dim(self, coefficients):
        """The plan's group_dim, or NO_GROUPS when the group term is a Python zero (no work)."""
        return NO_GROUPS if _dispatch.is_zero(coefficients[2]) else self._plan.group_dim

    def _or_zero(self, value, mesh=None):
        """``value``, or a zero in place of None. On a mesh, always in the dtype of the whole
        penalty: every rank must all-reduce the same dtype, whichever shards it counts."""
        dtype = self._plan.result_dtype
        if mesh is None:
            return value if value is not None else torch.zeros((), dtype=dtype)
        if value is None:
            return torch.zeros((), dtype=dtype, device=mesh.device_type)
        return value.to(dtype)

    def _prox(self, plan, lr):
        l1, l2, group = self._checked_coefficients()
        group_dim = self._active_group_dim((l1, l2, group))
        plan = plan.current()
        backend = plan.backend
        values = (lr * l1, 1 + 2 * lr * l2, lr * group)
        with torch.no_grad():
            plan.check_in_place_once()
            for kg in plan.local:
                _prox(kg, kg.tensors, group_dim, values, None, backend)
            for part in plan.meshes:
                self._sharded_prox(part, values, group_dim)

    # Sharded parameters (see fastreg._sharded): one all-reduce per mesh carries the counted
    # sums [Σ|d|, Σd², Σ‖d_g‖] and, for groups that span ranks, the local squared group norms.
    # The value is formed from the reduced sums with the coefficients as given (so gradients
    # reach tensor coefficients too); the shards' own gradients come from the local sums.

    def _sharded_value(self, part, coefficients, group_dim):
        counted, own, spanning = None, None, []
        detached = tuple(c.detach() if isinstance(c, torch.Tensor) else c for c in coefficients)
        for kg in part.groups:
            result, group_sq = _ops.penalty_sums(kg.local(), kg.centers, group_dim, self._plan.backend, kg.workspace)
            reduce = kg.reduce_groups and group_dim >= 0
            if reduce:  # the local Σ‖d_g‖ is meaningless: the global norms replace it
                result = _without_norm_sum(result)
                spanning.append((kg, group_sq))
            own = _add(own, _combine(result, detached))
            if kg.counted:
                counted = _add(counted, result.detach().to(self._plan.result_dtype))
        reduced = _sharded.all_reduce_sum(self._reduction_vector(part, counted, spanning), part.mesh)
        totals, norms = reduced[:3], self._global_norms(reduced[3:], spanning)
        for (kg, group_sq), n in zip(spanning, norms):
            totals = totals + torch.stack([totals.new_zeros(()), totals.new_zeros(()), fixed_order_sum(n)])
            # The surrogate whose gradient is group·d_g/N_g on this shard (N_g held constant).
            safe = torch.where(n > 0, n, 1)
            surrogate = (group_sq * torch.where(n > 0, 0.5 / safe, 0).to(group_sq.dtype)).sum()
            own = _add(own, _term(detached[2], surrogate, surrogate.dtype))
        global_value = _combine(totals, coefficients)
        if own is None:
            return global_value
        own = own.to(global_value.dtype)
        return global_value + (own - own.detach())

    def _reduction_vector(self, part, counted, spanning):
        """What one all-reduce sends: the counted sums, then every spanning group_sq (zeros
        from ranks that do not count, e.g. replicas other than coordinate 0)."""
        dtype = self._plan.result_dtype
        if counted is None:
            counted = torch.zeros(3, dtype=dtype, device=part.mesh.device_type)
        pieces = [counted.to(dtype)]
        for kg, group_sq in spanning:
            piece = group_sq.detach().to(dtype)
            pieces.append(piece if kg.counted else torch.zeros_like(piece))
        return torch.cat(pieces)

    @staticmethod
    def _global_norms(reduced_group_sq, spanning):
        norms, offset = [], 0
        for kg, group_sq in spanning:
            norms.append(reduced_group_sq[offset:offset + group_sq.numel()].sqrt())
            offset += group_sq.numel()
        return norms

    def _sharded_add_grad(self, part, coefficients, group_dim):
        backend = self._plan.backend
        counted, spanning = None, []
        for kg in part.groups:
            params = kg.local()
            grads = [g.to_local() for g in _grads_of(kg.names, kg.tensors)]
            if kg.reduce_groups and group_dim >= 0:  # the global norms first, then the update
                result, group_sq = _ops.plain_sums(backend, params, kg.centers, group_dim, workspace=kg.workspace)
                result = _without_norm_sum(result)
                spanning.append((kg, group_sq, params, grads))
            else:
                result, _ = _add_grad(kg, params, grads, group_dim, coefficients, backend)
            if kg.counted:
                counted = _add(counted, result.to(self._plan.result_dtype))
        reduced = _sharded.all_reduce_sum(
            self._reduction_vector(part, counted, [(kg, sq) for kg, sq, _, _ in spanning]), part.mesh)
        totals = reduced[:3]
        norms = self._global_norms(reduced[3:], [(kg, sq) for kg, sq, _, _ in spanning])
        for (kg, group_sq, params, grads), n in zip(spanning, norms):
            _add_grad(kg, params, grads, group_dim, coefficients, backend, group_norms=n.to(group_sq.dtype))
            totals = totals + torch.stack([totals.new_zeros(()), totals.new_zeros(()), fixed_order_sum(n)])
        return _combine(totals, coefficients)

    def _sharded_prox(self, part, values, group_dim):
        backend = self._plan.backend
        spanning = []
        for kg in part.groups:
            params = kg.local()
            if kg.reduce_groups and group_dim >= 0:  # the global norms of the shrunk values first
                _, shrunk_sq = _ops.plain_sums(backend, params, kg.centers, group_dim, threshold=values[0],
                                               workspace=kg.workspace)
                spanning.append((kg, shrunk_sq, params))
            else:
                _prox(kg, params, group_dim, values, None, backend)
        if spanning:
            reduced = _sharded.all_reduce_sum(
                self._reduction_vector(part, None, [(kg, sq) for kg, sq, _ in spanning]), part.mesh)
            norms = self._global_norms(reduced[3:], [(kg, sq) for kg, sq, _ in spanning])
            for (kg, shrunk_sq, params), n in zip(spanning, norms):
                _prox(kg, params, group_dim, values, n.to(shrunk_sq.dtype), backend)


def _add_grad(kg, params, grads, group_dim, coefficients, backend, group_norms=None):
    """``grad += gradient`` for one kernel group (any gradient dtypes); ``(sums, group_sq)``."""
    coeffs = _dispatch.coefficient_vector(coefficients, _dispatch.acc_dtype(kg.dtype), kg.device)
    return _ops.add_grad_(backend, params, grads, kg.centers, group_dim, coeffs, group_norms, kg.workspace)


def _prox(kg, params, group_dim, values, group_norms, backend):
    acc = _dispatch.acc_dtype(kg.dtype)
    coeffs = _dispatch.coefficient_vector(values, acc, kg.device)
    _ops.prox_(backend, params, kg.centers, group_dim, coeffs, group_norms, kg.workspace)


def _grads_of(names, params):
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


def _checked_coefficients(l1, l2, group):
    return (_dispatch.check_coefficient("l1", l1), _dispatch.check_coefficient("l2", l2),
            _dispatch.check_coefficient("group", group))


def _checked_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.is_floating_point():
        lr = lr.item()  # e.g. optimizer.param_groups[0]["lr"] held as a tensor
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"fastreg: prox_ needs a finite lr > 0, got {lr!r}")
    return float(lr)


def _add(total, value):
    """Sum onto the first value's device; float32 + float64 gives float64."""
    if value is None:
        return total
    return value if total is None else total + value.to(total.device)


def _combine(sums, coefficients, with_groups=True):
    """``l1·s0 + l2·s1 + group·s2``; a Python-zero coefficient drops its term (no 0·inf = NaN)."""
    terms = [_term(c, sums[i], sums.dtype) for i, c in enumerate(coefficients[:3 if with_groups else 2])
             if not _dispatch.is_zero(c)]
    if not terms:  # zero, but still connected to the graph (and never inf * 0)
        return sums[1].clamp(max=0) * 0.0
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _without_norm_sum(sums):
    """``sums`` with its Σ‖d_g‖ zeroed (for groups whose norms are global, not local)."""
    return torch.cat([sums[:2], sums.new_zeros(1)])


def _term(coefficient, value, dtype):
    # A 0-dim float64 coefficient must not promote a float32 result.
    return value * (coefficient.to(dtype) if isinstance(coefficient, torch.Tensor) else coefficient)


def _show(coefficient):
    return f"tensor({coefficient.item():g})" if isinstance(coefficient, torch.Tensor) else f"{coefficient:g}"
