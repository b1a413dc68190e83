"""``Penalty.attach(optimizer)``: the penalty inside ``optimizer.step()``, through its step hooks.

``torch.optim.Optimizer.register_step_pre_hook`` / ``register_step_post_hook`` run inside
``step()``, so whatever calls the step (a plain loop, Hugging Face ``Trainer`` through
accelerate's ``AcceleratedOptimizer``, ``torch.amp.GradScaler.step``) applies the penalty:

* ``"grad"``: the pre-hook adds the penalty's gradient in place. Gradient clipping happens
  before ``step()``, so the penalty's gradient is not clipped — the same as ``weight_decay``.
  ``GradScaler.step`` unscales first and does not call ``step()`` on inf/NaN: no hook then.
* ``"prox"``: the post-hook applies the proximal step per param group, with that group's
  learning rate at that step. A fused optimizer (``fused=True``) is stepped by
  ``GradScaler.step`` even on inf/NaN, with ``optimizer.found_inf`` set, and its kernel skips
  the update: the post-hook then skips the proximal step too.
"""

import math
import weakref

import torch

from fastreg import _operations, _preconditioners

MODES = ("grad", "prox")


class AttachHandle:
    """What ``Penalty.attach`` returns: ``remove()`` and ``last_value``."""

    def __init__(self, penalty, optimizer, mode):
        self.penalty = penalty
        self.mode = mode
        self._optimizer = weakref.ref(optimizer)
        self._hook = None
        self._value = None
        self._values = None
        self._steps = 0
        self._value_step = 0

    @property
    def optimizer(self):
        return self._optimizer()

    @property
    def last_value(self):
        """The penalty value at the latest step (detached), or None before the first step.

        ``"grad"``: the value the step's gradient was computed at (free: the same pass).
        ``"prox"``: the value after the latest proximal step, computed when first read.
        """
        if self._steps == 0:
            return None
        self._refresh()
        return self._value

    @property
    def last_values(self):
        """Each param group's value at the latest step (detached), keyed as ``Penalty.values()``;
        None before the first step."""
        if self._steps == 0:
            return None
        self._refresh()
        return self.penalty._keyed(self._values)

    def _refresh(self):
        """``"prox"``: the values after the latest proximal step, computed once when first read."""
        if self.mode == "prox" and self._value_step != self._steps:
            with torch.no_grad():
                totals = self.penalty._value_list()
            self._values = [None if v is None else v.detach() for v in totals]
            self._value = self.penalty._total(totals)
            self._value_step = self._steps

    @property
    def attached(self):
        return self._hook is not None

    def remove(self):
        """Detach from the optimizer (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        optimizer = self.optimizer
        if optimizer is not None and self.penalty._attached.get(optimizer) is self:
            del self.penalty._attached[optimizer]

    def __repr__(self):
        state = "attached" if self.attached else "removed"
        return f"AttachHandle(mode={self.mode!r}, {state}, steps={self._steps})"


METRICS = ("optimizer", "euclidean")


def attach(penalty, optimizer, mode, metric="optimizer"):
    if not isinstance(optimizer, torch.optim.Optimizer):
        inner = getattr(optimizer, "optimizer", None)  # accelerate's AcceleratedOptimizer wraps one
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"fastreg: attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        optimizer = inner
    if mode not in MODES:
        raise ValueError(f"fastreg: attach mode must be 'grad' (add the gradient before each step) or 'prox' "
                         f"(a proximal step after each step), got {mode!r}")
    if metric not in METRICS:
        raise ValueError(f"fastreg: attach metric must be 'optimizer' (the proximal step in the optimizer's own "
                         f"metric) or 'euclidean', got {metric!r}")
    if mode == "prox" and metric == "optimizer":
        _preconditioners.check_supported(optimizer)
    existing = penalty._attached.get(optimizer)
    if existing is not None and existing.attached:
        raise RuntimeError(f"fastreg: this penalty is already attached to this optimizer (mode={existing.mode!r}); "
                           "call handle.remove() first — attaching twice would apply it twice")
    handle = AttachHandle(penalty, optimizer, mode)
    if mode == "grad":
        def before_step(opt, args, kwargs):
            scale = _still_scaled(opt)
            with _operations.profiled("fastreg::attach"):
                handle._value, totals = penalty._add_to_grad(scale)
            handle._values = [None if v is None else v.detach() for v in totals]
            handle._steps += 1

        handle._hook = optimizer.register_step_pre_hook(before_step)
    else:
        subplans = _plans_by_param_group(penalty, optimizer)

        def after_step(opt, args, kwargs):
            if _skipped_by_grad_scaler(opt):
                return
            steps = []  # every group's step checked (lr, metric) before any is taken: no half-done step
            for group, plan in subplans:
                lr = group["lr"]
                lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
                if lr == 0:
                    continue
                if not (lr > 0 and math.isfinite(lr)):
                    raise ValueError(f"fastreg: attach(mode='prox') needs finite lr >= 0 in every param group, "
                                     f"got {lr!r}")
                step_metric = None
                if metric == "optimizer" and not isinstance(optimizer, torch.optim.SGD):
                    plan = plan.current()
                    step_metric = {id(t): _preconditioners.metric(optimizer, group, t) for t in plan.tensors}
                    lr = _preconditioners.step_size(optimizer, group, plan.tensors[0]) if plan.tensors else lr
                steps.append((plan, lr, step_metric))
            with _operations.profiled("fastreg::attach"):
                for plan, lr, step_metric in steps:
                    _operations.prox(plan.current(), penalty._coefficients(), lr, step_metric)
            handle._steps += 1

        handle._hook = optimizer.register_step_post_hook(after_step)
    penalty._attached[optimizer] = handle
    return handle


def _still_scaled(optimizer):
    """The scale the optimizer's gradients still carry when its step begins: ``GradScaler.step``
    hands an optimizer that unscales inside its own kernel (``fused=True``) ``grad_scale`` (a
    tensor) instead of unscaling first, so the penalty's gradient must be added scaled too. None
    otherwise (the gradients are already unscaled, or no scaler is in use)."""
    scale = getattr(optimizer, "grad_scale", None)
    return scale if isinstance(scale, torch.Tensor) else None


def _skipped_by_grad_scaler(optimizer):
    """True when ``GradScaler.step`` stepped an optimizer that scales itself (``fused=True``:
    ``_step_supports_amp_scaling``) on inf/NaN gradients: ``optimizer.found_inf`` is set for that
    call only, and the optimizer's kernel skipped its update (one host sync to read it)."""
    found_inf = getattr(optimizer, "found_inf", None)
    return isinstance(found_inf, torch.Tensor) and bool(found_inf.item() != 0)


def _plans_by_param_group(penalty, optimizer):
    """``[(param_group, plan restricted to it)]``; every selected parameter must be in a group."""
    group_of = {}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            group_of[id(p)] = index
    missing = [name for name, t in penalty.named_parameters() if id(t) not in group_of]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"fastreg: attach(mode='prox') applies each parameter's own learning rate, but parameter(s) "
                         f"{shown} are in none of the optimizer's param groups")
    for coupling in penalty._plan.couplings:
        names = dict(penalty.named_parameters())
        indices = {group_of[id(names[name])] for name, _ in coupling.slices}
        if len(indices) > 1:
            raise ValueError(f"fastreg: attach(mode='prox') steps each optimizer param group with its own lr, but "
                             f"the coupled group {[name for name, _ in coupling.slices]} spans optimizer param groups "
                             f"{sorted(indices)}; put a coupling's parameters in one optimizer param group")
    plans = []
    for index, group in enumerate(optimizer.param_groups):
        ids = {id(t) for name, t in penalty.named_parameters() if group_of[id(t)] == index}
        if ids:
            plans.append((group, penalty._plan.restricted(lambda t, ids=ids: id(t) in ids)))
    return plans
