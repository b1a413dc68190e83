"""The public API: ``penalty``, ``Penalty``, ``available_backends``, ``l2_to_weight_decay``.

Convention (the Keras one, and what the usual hand-written loop computes), with ``d = w - c``
(``c`` the center, 0 by default) and ``d_g`` the groups of ``d`` along ``group_dim``::

    value    = l1 * Σ|d| + l2 * Σd² + group * Σ_g ‖d_g‖₂
    gradient = l1 * sign(d) + 2 * l2 * d + group * d_g / ‖d_g‖₂        (sign(0) = 0; 0 for a zero group)

This module is the public face only: argument checks, the plan, one-line delegation. The maths
is in ``_operations`` (and ``_sharded``), the plan in ``_plan``; see ARCHITECTURE.md.
"""

import math
import numbers
import weakref

import torch

from fastreg import _attach, _coefficients, _dispatch, _explain, _one_call, _operations
from fastreg._coefficients import Coefficients
from fastreg._plan import Plan


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
    cached = _one_call.lookup(params, exclude, group_dim, center, backend)
    if isinstance(cached, Penalty):  # shared by every such call: the coefficients go to this call only
        return cached._value(Coefficients.checked(l1, l2, group))
    reg = Penalty(params, l1, l2, group=group, group_dim=group_dim, center=center, exclude=exclude, backend=backend)
    if cached is not None:
        cached.store(reg)
    return reg()


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

    l1 = property(lambda self: self._l1, lambda self, v: setattr(self, "_l1", _coefficients.check("l1", v)))
    l2 = property(lambda self: self._l2, lambda self, v: setattr(self, "_l2", _coefficients.check("l2", v)))
    group = property(lambda self: self._group, lambda self, v: setattr(self, "_group", _coefficients.check("group", v)))

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

    def coefficients(self):
        """The current ``(l1, l2, group)``, checked (tensor coefficients may change in place)."""
        return Coefficients.checked(self._l1, self._l2, self._group)

    # The three ways to apply it.

    def __call__(self):
        """The penalty value, differentiable with respect to every selected parameter."""
        return self._value(self.coefficients())

    def _value(self, coefficients):
        return _operations.value(self._plan.current(), coefficients)

    def add_to_grad_(self):
        """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` is created if None).

        Returns the penalty value, detached. One fused pass per kernel group, no autograd
        graph (two with a group term whose groups are strided). Call it once per optimizer
        step, after the loss's backward (and after all gradient-accumulation micro-batches);
        with ``torch.amp.GradScaler``, call it after ``scaler.unscale_(optimizer)``: it adds
        unscaled gradients. A gradient may have another dtype than its parameter (e.g. fp32
        gradients of bf16 weights, with ``p.grad_dtype``): it is updated in its own dtype.
        """
        return _operations.add_to_grad(self._plan.current(), self.coefficients())

    def prox_(self, lr):
        """The proximal step of the penalty for step size ``lr``, in place, under no_grad.

        With ``s = sign(d)·max(|d| − lr·l1, 0)``: ``w = c + max(0, 1 − lr·group/‖s_g‖)·s /
        (1 + 2·lr·l2)`` (the group factor only for tensors with groups). L1 drives single
        weights, the group term whole groups, to exact zeros (``w == c`` with a center),
        which subgradient steps never do. Call it right after ``optimizer.step()``, with a
        penalty that is *not* also in the loss. Sharded parameters are updated shard by shard;
        only strided groups of sharded parameters need communication (one all-reduce).
        """
        _operations.prox(self._plan.current(), self.coefficients(), _checked_lr(lr))

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
        return _attach.attach(self, optimizer, mode)

    # Inspection.

    def explain(self):
        """A table of every candidate parameter: shape, dtype, included or why excluded, its
        groups and center when those terms are used, and the backend of each kernel group."""
        return _explain.explain(self._plan.current(), self.coefficients())

    def __repr__(self):
        return _explain.describe(self._plan, Coefficients(self._l1, self._l2, self._group))


def _checked_lr(lr):
    if isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.is_floating_point():
        lr = lr.item()  # e.g. optimizer.param_groups[0]["lr"] held as a tensor
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"fastreg: prox_ needs a finite lr > 0, got {lr!r}")
    return float(lr)
