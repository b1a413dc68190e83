"""The public API: ``penalty``, ``Penalty``, ``available_backends``, ``l2_to_weight_decay``.

Convention (the Keras one, and what the usual hand-written loop computes), with ``d = w - c``
(``c`` the center, 0 by default) and ``d_g`` the groups of ``d`` (rows, columns, blocks, the
whole tensor, or a coupling's slices), per parameter with its own param group's settings::

    value    = l1 * Σ|d| + l2 * Σd² + group * Σ_g ‖d_g‖₂
    gradient = l1 * sign(d) + 2 * l2 * d + group * d_g / ‖d_g‖₂        (sign(0) = 0; 0 for a zero group)

This module is the public face only: argument checks, the plan, one-line delegation. The maths
is in ``_operations`` (and ``_sharded``), the plan in ``_plan``; see ARCHITECTURE.md.
"""

import math
import numbers
import weakref

import torch

from fastreg import _attach, _coefficients, _dispatch, _dtensor, _explain, _one_call, _operations, _settings
from fastreg._plan import Plan
from fastreg.backends._terms import Metric


def available_backends():
    """The backends that can run here, fastest first, e.g. ``["cpu", "torch"]``."""
    return _dispatch.available_backends()


def l2_to_weight_decay(l2):
    """The ``torch.optim.SGD`` ``weight_decay`` whose gradient equals an ``l2`` penalty's: ``2 * l2``.

    ``weight_decay=wd`` adds ``wd * w`` to the gradient, which is the gradient of
    ``wd / 2 * Σw²``; an ``l2 * Σw²`` penalty therefore needs ``wd = 2 * l2`` (not ``l2 / 2``).
    """
    _coefficients.check("l2", l2)
    return 2.0 * float(l2)


def penalty(params, l1=0.0, l2=0.0, *, group=0.0, group_dim=0, group_size=1, center=None, coupled=None,
            rules=None, exclude=None, backend="auto"):
    """``l1·Σ|d| + l2·Σd² + group·Σ_g ‖d_g‖`` over the selected parameters, as a differentiable 0-dim tensor.

    ``params``: an ``nn.Module`` (its parameters with ``requires_grad=True``), tensors,
    ``(name, tensor)`` pairs, or param groups (a list of dicts, as for ``Penalty``). ``exclude``:
    ``None``, a preset (``"bias_and_norm"``: every tensor with ``ndim <= 1``; ``"embeddings"``: the
    weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules; ``"no_weight_decay"``: timm's
    ``model.no_weight_decay()``), a list mixing presets and glob patterns on names, or
    ``(name, tensor) -> bool``. ``l1``, ``l2``, ``group``: non-negative numbers or 0-dim tensors.
    ``group_dim``: 0 (rows), 1 (columns) or None (whole tensors); ``group_size``, ``coupled``,
    ``rules``, ``center``: see ``Penalty`` (``"init"`` needs a ``Penalty`` built once).
    ``backend``: ``"auto"`` or a name from ``available_backends()``.
    In a training loop, build a ``Penalty`` once instead.
    """
    if isinstance(center, str) and center == "init":
        raise ValueError("fastreg: penalty(..., center='init') would snapshot the weights at every call, "
                         "so the penalty would always be 0; build fastreg.Penalty(..., center='init') once, "
                         "right after loading the pretrained weights, and call it every step")
    simple = coupled is None and rules is None and group_size == 1
    cached = _one_call.lookup(params, exclude, group_dim, center, backend) if simple else None
    if isinstance(cached, Penalty):  # shared by every such call: the coefficients go to this call only
        only = _settings.coefficients(dict(cached.param_groups[0], l1=l1, l2=l2, group=group))
        return cached._value([only])
    reg = Penalty(params, l1, l2, group=group, group_dim=group_dim, group_size=group_size, center=center,
                  coupled=coupled, rules=rules, exclude=exclude, backend=backend)
    if cached is not None:
        cached.store(reg)
    return reg()


class Penalty:
    """A reusable penalty over a fixed selection of parameters: L1, L2, elastic net, group lasso
    (rows, columns, blocks, whole tensors, coupled slices), norm constraints, each optionally
    toward reference weights, with settings per parameter — all in one fused pass per device
    and dtype.

    >>> reg = fastreg.Penalty(model, l2=1e-4, exclude="bias_and_norm")
    >>> loss = loss_fn(model(x), y) + reg()          # differentiable
    or, without autograd:
    >>> loss.backward(); reg.add_to_grad_(); optimizer.step()
    and for sparsity (exact zeros) and constraints:
    >>> optimizer.step(); reg.prox_(lr)

    **Settings per parameter.** ``params`` may be param groups, the torch.optim way: a list of
    dicts, each with ``"params"`` and any settings (``l1``, ``l2``, ``group``, ``group_dim``,
    ``group_size``, ``center``, ``max_norm``, ``min_max_norm``, ``unit_norm``, ``nonneg``,
    ``exclude``); the keyword arguments are the defaults. Or, on one module, ``rules=[(selector,
    {settings}), ...]``: a selector is a glob pattern on names, a list of them, or ``(name,
    tensor) -> bool``; the first matching rule gives a parameter its settings, and each rule is a
    param group (the unmatched parameters form the last one). ``reg.param_groups`` lists them
    like an optimizer's; ``reg.param_groups[i]["l2"] = v`` takes effect at the next call.
    ``reg.values()`` gives each group's value from the same pass.

    **Groups.** ``group`` (λg) adds ``λg·Σ_g ‖w_g‖₂``. ``group_dim=0``: rows (output units, conv
    filters), ``1``: columns (input features, channels), of tensors with ``ndim >= 2``;
    ``group_size=k``: blocks of ``k`` consecutive rows or columns (attention heads);
    ``group_dim=None``: each tensor is one group. ``coupled=[[(name, dim), ...], ...]``: group
    ``i`` is index ``i`` along each listed dim, across the tensors (a neuron: ``[("fc1.weight",
    0), ("fc1.bias", 0), ("fc2.weight", 1)]``), with the ``group`` of its first tensor's param
    group. The proximal step zeroes whole groups exactly. Groups are unweighted (as sklearn's
    MultiTaskLasso); for the √(group size) weighting of Yuan & Lin, set ``group`` per param group.

    **Constraints** (Keras' ``MaxNorm``, ``MinMaxNorm``, ``UnitNorm``, ``NonNeg``), on ``d`` and over
    each parameter's groups (the whole tensor for one without groups): ``max_norm=c``,
    ``min_max_norm=(lo, hi)``, ``unit_norm=True``, ``nonneg=True`` (element-wise ``d >= 0``).
    They are applied by ``prox_`` (and ``attach(mode="prox")``), combined with the other terms by
    the exact proximal operator of the sum; they add nothing to the value or gradient.

    ``center`` pulls the weights toward reference values instead of 0 (L2-SP, Li et al. 2018):
    every term is computed on ``d = w - c``. ``"init"``: a snapshot of the selected parameters
    now (build the penalty right after loading the pretrained weights); a mapping from
    parameter names to tensors (e.g. ``pretrained.state_dict()``; a parameter missing from it,
    such as a new head, is pulled toward 0); or a sequence of tensors aligned with the
    regularized (or with all candidate) parameters. Centers are stored once, converted to each
    parameter's dtype, device and layout: **one extra copy of the selected parameters**.

    ``l1``, ``l2`` and ``group`` may be reassigned between steps (on every param group through
    ``reg.l2 = v``, or per group); 0-dim tensor coefficients can also be changed in place, and
    do not make torch.compile recompile.
    """

    def __init__(self, params, l1=0.0, l2=0.0, *, group=0.0, group_dim=0, group_size=1, center=None,
                 max_norm=None, min_max_norm=None, unit_norm=False, nonneg=False, coupled=None, rules=None,
                 exclude=None, backend="auto"):
        defaults = _settings.defaults(l1=l1, l2=l2, group=group, group_dim=group_dim, group_size=group_size,
                                      center=center, max_norm=max_norm, min_max_norm=min_max_norm,
                                      unit_norm=unit_norm, nonneg=nonneg, exclude=exclude)
        self.defaults = defaults
        groups = _settings.param_groups(params, defaults, rules)
        self._plan = Plan(groups, coupled, backend)
        for g in groups:  # what selected them is the plan's business now
            g.pop("source", None)
            g.pop("belongs", None)
        self.param_groups = groups
        keys = [_settings.key_of(i, g) for i, g in enumerate(groups)]
        if len(set(map(_settings.hashable, keys))) != len(keys):
            raise ValueError("fastreg: two rules have the same selector; values() keys each param group by its "
                             "selector, so selectors must differ (merge the rules)")
        self._plan.coefficients()  # bad coefficients are an error now, not at the first step
        self._attached = weakref.WeakKeyDictionary()  # optimizer -> its live attach handle

    def _common(self, key):
        values = [g[key] for g in self.param_groups]
        same = all(v is values[0] or (not isinstance(v, torch.Tensor) and v == values[0]) for v in values)
        if not same:
            raise AttributeError(f"fastreg: the param groups have different {key}; use reg.param_groups[i][{key!r}]")
        return values[0] if values else self.defaults[key]

    def _set_all(self, key, value):
        """``reg.l2 = v``: every param group's, only when they all share one value (else a
        no-decay group would silently start decaying: set ``reg.param_groups[i][key]``)."""
        _coefficients.check(key, value)
        self._common(key)
        for g in self.param_groups:
            g[key] = value

    l1 = property(lambda self: self._common("l1"), lambda self, v: self._set_all("l1", v))
    l2 = property(lambda self: self._common("l2"), lambda self, v: self._set_all("l2", v))
    group = property(lambda self: self._common("group"), lambda self, v: self._set_all("group", v))

    @property
    def backend(self):
        """The backend requested (``"auto"`` or a name); see ``explain()`` for what runs."""
        return self._plan.backend

    @property
    def group_dim(self):
        return self._common("group_dim")

    def named_parameters(self):
        """The ``(name, tensor)`` pairs this penalty regularizes."""
        return list(zip(self._plan.names, self._plan.tensors))

    def coefficients(self):
        """Every param group's current ``Coefficients`` (``l1, l2, group`` and its constraints),
        checked (tensor coefficients may change in place); a new list, the caller's to edit."""
        return list(self._plan.coefficients())

    def _coefficients(self):
        """``coefficients()`` as the plan keeps it: the same list while nothing changed (the
        plan's per-call caches key on that identity); internal, never handed to a user."""
        return self._plan.coefficients()

    # The three ways to apply it.

    def __call__(self):
        """The penalty value, differentiable with respect to every selected parameter."""
        return self._value(self._coefficients())

    def _value(self, coefficients):
        return _operations.value(self._plan.current(), coefficients)

    def values(self):
        """Each param group's value, from the same pass: ``{key: 0-dim tensor}``, the key being
        the group's index, or its rule's selector as written; they add up to ``reg()``.
        Differentiable, like ``reg()``."""
        return self._keyed(self._value_list())

    def _value_list(self):
        """Each param group's value (None for one without tensors), in group order."""
        return _operations.values(self._plan.current(), self._coefficients())

    def _keyed(self, totals):
        zero = torch.zeros((), dtype=self._plan.result_dtype)
        return {_settings.key_of(i, g): (zero if v is None else v) for i, (g, v) in enumerate(zip(self.param_groups,
                                                                                              totals))}

    def add_to_grad_(self):
        """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` is created if None).

        Returns the penalty value, detached. One fused pass per kernel group, no autograd
        graph (two with a group term whose groups are strided, or coupled). Call it once per
        optimizer step, after the loss's backward (and after all gradient-accumulation
        micro-batches); with ``torch.amp.GradScaler``, call it after ``scaler.unscale_(optimizer)``:
        it adds unscaled gradients. A gradient may have another dtype than its parameter (e.g.
        fp32 gradients of bf16 weights, with ``p.grad_dtype``): it is updated in its own dtype.
        """
        return self._add_to_grad()[0]

    def _add_to_grad(self, scale=None):
        """``(value, per-group values)`` of ``add_to_grad_``. ``scale``: a 0-dim tensor the
        gradients still carry (a fused optimizer's step under ``GradScaler``): the penalty's
        gradient is added times it; the values returned are the penalty's own."""
        coefficients = self._coefficients()
        if scale is None:
            totals = _operations.add_to_grad(self._plan.current(), coefficients)
            value = self._total(totals)
            return (value.detach() if value.requires_grad else value), totals
        scaled = [c._replace(**{name: getattr(c, name) if _coefficients.is_zero(getattr(c, name))
                                else getattr(c, name) * scale for name in ("l1", "l2", "group")})
                  for c in coefficients]
        totals = [None if v is None else v / scale.to(v.device)
                  for v in _operations.add_to_grad(self._plan.current(), scaled)]
        return self._total(totals).detach(), totals

    def _total(self, totals):
        """The penalty from per-group values, in group order."""
        return _operations.total(self._plan, totals)

    def prox_(self, lr, metric=None):
        """The proximal step of the penalty and its constraints for step size ``lr``, in place,
        under no_grad.

        ``metric``: None (the Euclidean step below), or each parameter's diagonal preconditioner
        ``D`` (a mapping from parameters, or their names, to positive tensors of their shape;
        or a sequence aligned with ``named_parameters()``): the step ``argmin ½‖x − y‖²_D +
        lr·R(x)`` whose fixed points under an adaptive optimizer solve ``loss + R``
        (``attach(optimizer, mode="prox")`` passes the optimizer's own D). Closed forms per
        coordinate (threshold ``lr·l1/D``, divisor ``1 + 2·lr·l2/D``); a group's norm solved by a
        safeguarded Newton iteration to float64 precision; ``max_norm``, ``nonneg`` and the lower
        bounds of ``min_max_norm`` / ``unit_norm`` in the same metric (exact too: see the README's
        "Exact sparsity under Adam").

        With ``s = sign(d)·max(|d| − lr·l1, 0)`` (``max(d − lr·l1, 0)`` with ``nonneg``):
        ``w = c + f_g·s`` with ``f_g = clip((‖s_g‖ − lr·group)/(1 + 2·lr·l2), lo, hi)/‖s_g‖``
        (``lo``, ``hi``: the norm constraints, 0 and ∞ without), ``w = c + s/(1 + 2·lr·l2)`` for
        tensors without groups: the exact proximal operator of the sum. L1 drives single
        weights, the group term whole groups, to exact zeros (``w == c`` with a center), which
        subgradient steps never do. Call it right after ``optimizer.step()``, with a penalty that
        is *not* also in the loss. Sharded parameters are updated shard by shard; only strided
        groups of sharded parameters need communication (one all-reduce; in a metric, one per
        Newton iteration of the groups that span shards). A sharded parameter's ``D`` is a DTensor
        laid out as the parameter, or a plain tensor of its full shape (each rank reads its part).
        """
        plan = self._plan.current()
        _operations.prox(plan, self._coefficients(), _checked_lr(lr), _checked_metric(plan, metric))

    def attach(self, optimizer, mode="grad", metric="optimizer"):
        """Apply the penalty inside ``optimizer.step()``: no line in the training loop.

        ``mode="grad"``: right before every step, ``add_to_grad_()`` — after gradient clipping
        and after ``torch.amp.GradScaler`` unscaled the gradients, exactly where SGD applies
        ``weight_decay``; a step the scaler skips (inf/NaN) runs no hook.
        ``mode="prox"``: right after every step, ``prox_`` with the learning rate each
        parameter's own param group has at that step (schedulers, per-group lrs; a group at
        lr 0 is left alone). Every selected parameter must be in one of the optimizer's groups.
        ``metric="optimizer"`` (the default) steps in the optimizer's own diagonal metric (Adam,
        AdamW, Adagrad, RMSprop; SGD's is the identity), whose fixed points solve ``loss +
        penalty`` (``fastreg._preconditioners``); ``metric="euclidean"`` is the plain step
        (AdamW's decoupled style: its fixed points are a gradient-reweighted penalty under an
        adaptive optimizer).

        Works with anything that ends in ``optimizer.step()`` (Hugging Face ``Trainer``,
        Lightning, accelerate's wrapped optimizers). Returns a handle: ``handle.remove()``,
        ``handle.last_value`` (the penalty at the latest step, detached; None before the first)
        and ``handle.last_values`` (each param group's, as ``values()``).
        """
        return _attach.attach(self, optimizer, mode, metric)

    # Inspection.

    def explain(self):
        """A table of every candidate parameter: shape, dtype, included or why excluded, its param
        group (or rule), settings, groups and center, and the backend of each kernel group."""
        return _explain.explain(self._plan.current(), self.param_groups, self._coefficients())

    def __repr__(self):
        return _explain.describe(self._plan, self.param_groups)


def _checked_metric(plan, metric):
    """``metric`` as ``{id(parameter): D}`` (None: Euclidean), checked against each parameter."""
    if metric is None:
        return None
    named = list(zip(plan.names, plan.tensors))
    if isinstance(metric, dict):
        by_id = {id(t): (n, t) for n, t in named}
        by_name = dict(named)
        pairs = []
        for key, value in metric.items():
            tensor = by_name.get(key) if isinstance(key, str) else (key if id(key) in by_id else None)
            if tensor is None:
                raise ValueError(f"fastreg: metric names {key if isinstance(key, str) else 'a tensor'!r}, which is not "
                                 "a regularized parameter of this penalty")
            pairs.append((tensor, value))
    else:
        values = list(metric)
        if len(values) != len(named):
            raise ValueError(f"fastreg: metric has {len(values)} tensors; expected one per regularized parameter "
                             f"({len(named)})")
        pairs = [(t, v) for (_, t), v in zip(named, values)]
    name_of = {id(t): n for n, t in named}
    checked = {}
    sharded = {}  # mesh -> [(name, whether this rank's shard of its DTensor metric is bad)]
    for tensor, value in pairs:
        if value is None:
            continue
        name = name_of[id(tensor)]
        if id(tensor) in checked:
            raise ValueError(f"fastreg: metric gives parameter {name!r} twice (by tensor and by name)")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise TypeError(f"fastreg: the metric of parameter {name!r} must be a floating-point tensor")
        if _dtensor.is_sharded(value):
            # A sharded parameter's metric as a DTensor laid out as the parameter: each rank
            # checks its own shard, and every rank raises if any shard is bad (below).
            if not (_dtensor.is_sharded(tensor) and _dtensor.same_placement(value, tensor)):
                layout = (f"shape {tuple(tensor.shape)}, placements {tuple(tensor.placements)}"
                          if _dtensor.is_sharded(tensor) else f"a plain tensor of shape {tuple(tensor.shape)}")
                raise ValueError(f"fastreg: the metric of parameter {name!r} is a DTensor of shape "
                                 f"{tuple(value.shape)} with placements {tuple(value.placements)}; the parameter is "
                                 f"{layout}: give a DTensor laid out as the parameter, or a plain tensor of its "
                                 "full shape")
            local = value.to_local().detach()
            bad = torch.zeros((), dtype=torch.float64, device=local.device)
            if local.numel():
                low, high = torch.aminmax(local)
                bad = (~((low > 0) & (high < math.inf))).to(torch.float64)
            sharded.setdefault(value.device_mesh, []).append((name, bad))
            checked[id(tensor)] = Metric(value.detach(), root=False)
            continue
        if value.device != tensor.device or not _broadcasts_to(value.shape, tensor.shape):
            raise ValueError(f"fastreg: the metric of parameter {name!r} has shape {tuple(value.shape)} on "
                             f"{value.device}; the parameter {tuple(tensor.shape)} on {tensor.device}"
                             + (" (a sharded parameter takes a DTensor laid out as it, or a plain tensor of its "
                                "full shape)" if _dtensor.is_sharded(tensor) else ""))
        if value.numel():  # one fused read (a NaN makes the minimum NaN, which fails the test too)
            low, high = torch.aminmax(value.detach())
            if not bool((low > 0) & (high < math.inf)):
                raise ValueError(f"fastreg: the metric of parameter {name!r} must be positive and finite everywhere")
        # The kernels take one metric element per parameter element: a broadcast one is expanded
        # (a view; a backend reads it through its own dense copy, as any operand of another layout;
        # a sharded parameter's kernels read this rank's part of it: fastreg._sharded).
        checked[id(tensor)] = Metric(value.detach().expand(tensor.shape), root=False)
    for mesh, flags in sharded.items():  # one all-reduce per mesh: every rank raises, or none
        bad = _dtensor.all_reduce_sum(torch.stack([flag for _, flag in flags]), mesh)
        for (name, _), flag in zip(flags, bad.tolist()):
            if flag:
                raise ValueError(f"fastreg: the metric of parameter {name!r} must be positive and finite everywhere")
    return checked


def _broadcasts_to(shape, target):
    try:
        return torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        return False


def _checked_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.is_floating_point():
        lr = lr.item()  # e.g. optimizer.param_groups[0]["lr"] held as a tensor
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"fastreg: prox_ needs a finite lr > 0, got {lr!r}")
    return float(lr)
