"""The public API: ``penalty``, ``Penalty``, ``available_backends``, ``l2_to_weight_decay``.

Convention (the Keras one, and what the usual hand-written loop computes)::

    value    = l1 * Σ|w| + l2 * Σw²
    gradient = l1 * sign(w) + 2 * l2 * w          (sign(0) = 0)
"""

import math
import numbers

import torch

from fastreg import _dispatch, _ops, _sharded
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
        self._local = [t for t in self._tensors if not _sharded.is_sharded(t)]
        self._meshes = _group_sharded(self._entries)
        dtypes = {t.dtype for t in self._tensors}
        self._result_dtype = torch.float64 if torch.float64 in dtypes else torch.float32

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
        total = _value(self._local, l1, l2, self._backend)
        for mesh, counted, uncounted in self._meshes:
            counted_value = self._or_zero(_value([p.to_local() for p in counted], l1, l2, self._backend), mesh)
            own = _add(counted_value, _value([p.to_local() for p in uncounted], l1, l2, self._backend))
            global_value = _sharded.all_reduce_sum(counted_value.detach(), mesh)
            total = _add(total, global_value + (own - own.detach()))
        return self._or_zero(total)

    def add_to_grad_(self):
        """``p.grad += d(penalty)/dp`` for every selected ``p`` (``p.grad`` is created if None).

        Returns the penalty value, detached. One fused pass per (device, dtype) group, no
        autograd graph. Call it once per optimizer step, after the loss's backward (and after
        all gradient-accumulation micro-batches); with ``torch.amp.GradScaler``, call it after
        ``scaler.unscale_(optimizer)``: it adds unscaled gradients.
        """
        l1, l2 = self._checked_coefficients()
        with torch.no_grad():
            total = _add_grad([(p, _dense_grad(p)) for p in self._local], l1, l2, self._backend)
            for mesh, counted, uncounted in self._meshes:
                counted_value = _add_grad(_local_pairs(counted), l1, l2, self._backend)
                _add_grad(_local_pairs(uncounted), l1, l2, self._backend)
                total = _add(total, _sharded.all_reduce_sum(self._or_zero(counted_value, mesh), mesh))
        return self._or_zero(total).detach()

    def prox_(self, lr):
        """The proximal step of the penalty for step size ``lr``, in place, under no_grad.

        ``w <- sign(w) * max(|w| - lr*l1, 0) / (1 + 2*lr*l2)``: L1 drives weights to exact
        zeros, which subgradient steps never do. Call it right after ``optimizer.step()``,
        with a penalty that is *not* also in the loss. Sharded parameters are updated shard by
        shard, with no communication.
        """
        if isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.is_floating_point():
            lr = lr.item()  # e.g. optimizer.param_groups[0]["lr"] held as a tensor
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"fastreg: prox_ needs a finite lr > 0, got {lr!r}")
        lr = float(lr)
        l1, l2 = self._checked_coefficients()
        local = self._local + [p.to_local() for _, counted, uncounted in self._meshes for p in counted + uncounted]
        with torch.no_grad():
            for group in _dispatch.plan(local):
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
        local = self._local + [p.to_local() for _, c, u in self._meshes for p in c + u]
        backends = ", ".join(
            f"{_dispatch.backend_for(self._backend, group[0].device).NAME} ({group[0].device}, "
            f"{str(group[0].dtype).replace('torch.', '')}: {len(group)} tensors)"
            for group in _dispatch.plan(local)
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

    def _or_zero(self, value, mesh=None):
        """``value``, or a zero in place of None. On a mesh, always in the dtype of the whole
        penalty: every rank must all-reduce the same dtype, whichever shards it counts."""
        if mesh is None:
            return value if value is not None else torch.zeros((), dtype=self._result_dtype)
        if value is None:
            return torch.zeros((), dtype=self._result_dtype, device=mesh.device_type)
        return value.to(self._result_dtype)


def _value(tensors, l1, l2, backend):
    """The differentiable penalty of plain tensors, one op per (device, dtype) group; None if none."""
    total = None
    for group in _dispatch.plan(tensors):
        total = _add(total, _combine(_ops.penalty_sums(group, backend), l1, l2))
    return total


def _add_grad(pairs, l1, l2, backend):
    """``grad += gradient`` for ``(tensor, grad)`` pairs, fused per group; the value, or None."""
    total = None
    for group in _dispatch.plan(pairs, tensor_of=lambda pair: pair[0]):
        params = [w for w, _ in group]
        acc = _dispatch.acc_dtype(params[0].dtype)
        coeffs = _dispatch.coefficient_vector(l1, l2, acc, params[0].device)
        sums = _dispatch.backend_for(backend, params[0].device).add_grad_(params, [g for _, g in group], coeffs)
        total = _add(total, _combine(sums, l1, l2))
    return total


def _add(total, value):
    """Sum onto the first value's device; float32 + float64 gives float64."""
    if value is None:
        return total
    return value if total is None else total + value.to(total.device)


def _dense_grad(p):
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    elif p.grad.layout != torch.strided:
        raise TypeError("fastreg: add_to_grad_ needs dense gradients; a parameter has a "
                        f"{p.grad.layout} gradient (use the autograd penalty instead)")
    return p.grad


def _local_pairs(sharded_params):
    return [(p.to_local(), _dense_grad(p).to_local()) for p in sharded_params]


def _group_sharded(entries):
    """``[(mesh, counted, uncounted)]`` for the included DTensor parameters, one per mesh."""
    meshes = {}
    for e in entries:
        if e.included and _sharded.is_sharded(e.tensor):
            _sharded.check_placements(e.name, e.tensor)
            counted, uncounted = meshes.setdefault(e.tensor.device_mesh, ([], []))
            (counted if _sharded.is_counted(e.tensor) else uncounted).append(e.tensor)
    return [(mesh, counted, uncounted) for mesh, (counted, uncounted) in meshes.items()]


def _combine(sums, l1, l2):
    """``l1 * Σ|w| + l2 * Σw²``; a Python-zero coefficient drops its term (no 0 * inf = NaN)."""
    terms = [sums[i] * _as_factor(c, sums.dtype) for i, c in enumerate((l1, l2)) if not _dispatch.is_zero(c)]
    if not terms:  # zero, but still connected to the graph (and never inf * 0)
        return sums[1].clamp(max=0) * 0.0
    return terms[0] + terms[1] if len(terms) == 2 else terms[0]


def _as_factor(coefficient, dtype):
    # A 0-dim float64 coefficient must not promote a float32 result.
    return coefficient.to(dtype) if isinstance(coefficient, torch.Tensor) else coefficient


def _show(coefficient):
    return f"tensor({coefficient.item():g})" if isinstance(coefficient, torch.Tensor) else f"{coefficient:g}"
