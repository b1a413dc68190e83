"""The public API: ``penalty``, ``Penalty``, ``available_backends``, ``l2_to_weight_decay``.

Convention (the Keras one, and what the usual hand-written loop computes)::

    value    = l1 * Σ|w| + l2 * Σw²
    gradient = l1 * sign(w) + 2 * l2 * w          (sign(0) = 0)
"""

import math

import torch

from fastreg import _dispatch, _ops
from fastreg._params import select


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


def penalty(params, l1=0.0, l2=0.0, *, exclude=None, backend="auto"):
    """``l1 * Σ|w| + l2 * Σw²`` over the selected parameters, as a differentiable 0-dim tensor.

    ``params``: an ``nn.Module`` (its parameters with ``requires_grad=True``), tensors, or
    ``(name, tensor)`` pairs. ``exclude``: ``None``, ``"bias_and_norm"`` (every tensor with
    ``ndim <= 1``), a list of glob patterns on names, or ``(name, tensor) -> bool``.
    ``l1``, ``l2``: non-negative numbers or 0-dim tensors. ``backend``: ``"auto"`` or a name from
    ``available_backends()``. In a training loop, build a ``Penalty`` once instead.
    """
    return Penalty(params, l1, l2, exclude=exclude, backend=backend)()


class Penalty:
    """A reusable L1/L2/elastic-net penalty over a fixed selection of parameters.

    >>> reg = fastreg.Penalty(model, l2=1e-4, exclude="bias_and_norm")
    >>> loss = loss_fn(model(x), y) + reg()          # differentiable
    or, without autograd:
    >>> loss.backward(); reg.add_to_grad_(); optimizer.step()
    and for sparsity (exact zeros):
    >>> optimizer.step(); reg.prox_(lr)

    ``l1`` and ``l2`` may be reassigned between steps; 0-dim tensor coefficients can also be
    changed in place, and do not make torch.compile recompile.
    """

    def __init__(self, params, l1=0.0, l2=0.0, *, exclude=None, backend="auto"):
        self.l1 = l1
        self.l2 = l2
        self._backend = _dispatch.requested_backend(backend)
        self._entries = select(params, exclude)
        self._names = [e.name for e in self._entries if e.included]
        self._tensors = [e.tensor for e in self._entries if e.included]

    l1 = property(lambda self: self._l1, lambda self, v: setattr(self, "_l1", _dispatch.check_coefficient("l1", v)))
    l2 = property(lambda self: self._l2, lambda self, v: setattr(self, "_l2", _dispatch.check_coefficient("l2", v)))

    @property
    def backend(self):
        """The backend requested (``"auto"`` or a name); see ``explain()`` for what runs."""
        return self._backend

    def named_parameters(self):
        """The ``(name, tensor)`` pairs this penalty regularizes."""
        return list(zip(self._names, self._tensors))

    def __call__(self):
        """The penalty value, differentiable with respect to every selected parameter."""
        l1, l2 = self._checked_coefficients()
        total = None
        for group in _dispatch.plan(self._tensors):
            value = _combine(_ops.sums(group, self._backend), l1, l2)
            total = value if total is None else total + value.to(total.device)
        return self._zero() if total is None else total

    def add_to_grad_(self):
        """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` is created if None).

        Returns the penalty value, detached. One fused pass per (device, dtype) group, no
        autograd graph. Call it once per optimizer step, after the loss's backward (and after
        all gradient-accumulation micro-batches); with ``torch.amp.GradScaler``, call it after
        ``scaler.unscale_(optimizer)``: it adds unscaled gradients.
        """
        l1, l2 = self._checked_coefficients()
        total = None
        with torch.no_grad():
            for group in _dispatch.plan(self._tensors):
                kernels = _dispatch.backend_for(self._backend, group[0].device)
                grads = self._grads_of(group)
                acc = _dispatch.acc_dtype(group[0].dtype)
                coeffs = _dispatch.coefficient_vector(l1, l2, acc, group[0].device)
                value = _combine(kernels.add_grad_(group, grads, coeffs), l1, l2)
                total = value if total is None else total + value.to(total.device)
        return self._zero() if total is None else total.detach()

    def prox_(self, lr):
        """The proximal step of the penalty for step size ``lr``, in place, under no_grad.

        ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)``: L1 drives weights to exact
        zeros, which subgradient steps never do. Call it right after ``optimizer.step()``,
        with a penalty that is *not* also in the loss.
        """
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"fastreg: prox_ needs a finite lr > 0, got {lr!r}")
        l1, l2 = self._checked_coefficients()
        with torch.no_grad():
            for group in _dispatch.plan(self._tensors):
                kernels = _dispatch.backend_for(self._backend, group[0].device)
                acc = _dispatch.acc_dtype(group[0].dtype)
                coeffs = _dispatch.coefficient_vector(lr * l1, 1 + 2 * lr * l2, acc, group[0].device)
                kernels.prox_(group, coeffs)

    def explain(self):
        """A table of every candidate parameter: shape, dtype, included or why excluded, totals."""
        rows = [("parameter", "shape", "dtype", "elements", "regularized")]
        for e in self._entries:
            status = "yes" if e.included else f"no: {e.excluded_because}"
            rows.append((e.name, str(tuple(e.tensor.shape)), str(e.tensor.dtype).replace("torch.", ""),
                         f"{e.tensor.numel():,}", status))
        included = [e for e in self._entries if e.included]
        excluded = [e for e in self._entries if not e.included]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        backends = ", ".join(
            f"{_dispatch.backend_for(self._backend, group[0].device).NAME} ({group[0].device}, "
            f"{str(group[0].dtype).replace('torch.', '')}: {len(group)} tensors)"
            for group in _dispatch.plan(self._tensors)
        )
        lines += [
            "",
            f"regularized: {len(included)} tensors, {sum(e.tensor.numel() for e in included):,} elements",
            f"excluded:    {len(excluded)} tensors, {sum(e.tensor.numel() for e in excluded):,} elements",
            f"l1={_show(self.l1)}  l2={_show(self.l2)}  backend={self._backend}"
            + (f" -> {backends}" if backends else ""),
        ]
        return "\n".join(lines)

    def __repr__(self):
        return (f"Penalty(l1={_show(self.l1)}, l2={_show(self.l2)}, tensors={len(self._tensors)}, "
                f"backend={self._backend!r})")

    def _checked_coefficients(self):
        # Tensor coefficients may have been changed in place since they were set.
        return _dispatch.check_coefficient("l1", self._l1), _dispatch.check_coefficient("l2", self._l2)

    def _grads_of(self, group):
        grads = []
        for p in group:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            elif p.grad.layout != torch.strided:
                raise TypeError("fastreg: add_to_grad_ needs dense gradients; a parameter has a "
                                f"{p.grad.layout} gradient (use the autograd penalty instead)")
            grads.append(p.grad)
        return grads

    def _zero(self):
        return torch.zeros((), dtype=torch.float32)


def _combine(sums, l1, l2):
    """``l1 * Σ|w| + l2 * Σw²``; a Python-zero coefficient drops its term (no 0 * inf = NaN)."""
    terms = [sums[i] * _as_factor(c, sums.dtype) for i, c in enumerate((l1, l2)) if not _dispatch.is_zero(c)]
    if not terms:
        return sums[1] * 0.0
    return terms[0] + terms[1] if len(terms) == 2 else terms[0]


def _as_factor(coefficient, dtype):
    # A 0-dim float64 coefficient must not promote a float32 result.
    return coefficient.to(dtype) if isinstance(coefficient, torch.Tensor) else coefficient


def _show(coefficient):
    return f"tensor({coefficient.item():g})" if isinstance(coefficient, torch.Tensor) else f"{coefficient:g}"
