"""The penalty's coefficients as one type: checked once, combined with the sums into the value,
and turned into the vectors the kernels read.

``l1``, ``l2``, ``group`` are non-negative finite reals or 0-dim tensors. A Python zero drops its
term at trace time (no work, and never ``0 · inf``); a tensor stays a tensor, so a schedule that
changes it in place never makes torch.compile recompile. The slots of every vector are named in
``fastreg.backends._terms``.
"""

import math
import numbers
from typing import NamedTuple

import torch

from fastreg.backends._terms import GRADIENT_SLOTS, Prox, Sum


# Plain ints (torch.compile traces this module; it does not index with IntEnums).
_ALL_SUMS = tuple(int(s) for s in Sum)
_ELEMENTWISE_SUMS = (int(Sum.ABS), int(Sum.SQUARE))
_SQUARE = int(Sum.SQUARE)


def check(name, value):
    """``value`` if it is a valid coefficient (a finite, non-negative real or 0-dim tensor), else
    ``TypeError`` / ``ValueError`` naming it. Fractions and numpy scalars become floats."""
    if isinstance(value, torch.Tensor):
        if value.ndim != 0:
            raise ValueError(f"fastreg: {name} must be a number or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"fastreg: {name} must be real, got a {value.dtype} tensor")
        # Reading a CUDA value would synchronise, and under torch.compile it would break the
        # graph: such coefficients are checked by the user's own schedule, not here.
        if value.device.type != "cpu" or torch.compiler.is_compiling():
            return value
        number = value.item()
    elif isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)) and not isinstance(value, bool):
        number = value
    else:
        raise TypeError(f"fastreg: {name} must be a real number or a 0-dim tensor, got {type(value).__name__}")
    # Comparisons only (NaN fails `>= 0`): torch.compile can guard on them when a changing
    # float has become a symbol, where math.isnan() would break the graph.
    if not number >= 0 or number == math.inf:
        raise ValueError(f"fastreg: {name} must be finite and non-negative, got {number}")
    if isinstance(value, numbers.Real) and not isinstance(value, (float, int)):
        return float(value)  # Fraction, numpy scalars, ...: plain floats for the kernels
    return value


def is_zero(coefficient):
    """True for a Python zero: its term can be dropped at trace time."""
    return not isinstance(coefficient, torch.Tensor) and coefficient == 0


class Coefficients(NamedTuple):
    """``(l1, l2, group)``, in the order of the sums they multiply (``Sum``), and the norm and
    sign constraints of ``prox_`` (floats and a bool: ``fastreg._settings`` checks them)."""

    l1: object
    l2: object
    group: object
    min_norm: float = 0.0
    max_norm: float = math.inf
    nonneg: bool = False

    @classmethod
    def checked(cls, l1, l2, group):
        # Tensor coefficients may have changed in place since they were set: checked per call.
        return cls(check("l1", l1), check("l2", l2), check("group", group))

    @property
    def has_groups(self):
        return not is_zero(self.group)

    @property
    def constrained(self):
        """Whether a norm constraint needs the groups in ``prox_``."""
        return self.min_norm > 0 or self.max_norm < math.inf

    def value(self, sums, with_groups=True):
        """``l1·Σ|d| + l2·Σd² + group·Σ‖d_g‖`` from a sums vector; a Python-zero coefficient
        drops its term. Zero terms still leave the result connected to the graph."""
        slots = _ALL_SUMS if with_groups else _ELEMENTWISE_SUMS
        terms = [term(self[slot], sums[slot], sums.dtype) for slot in slots if not is_zero(self[slot])]
        if not terms:  # zero, but still connected to the graph (and never inf * 0)
            return sums[_SQUARE].clamp(max=0) * 0.0
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def detached(self):
        return Coefficients(*(c.detach() if isinstance(c, torch.Tensor) else c for c in self))

    def terms(self):
        """The three term coefficients (what multiplies the sums)."""
        return self[:GRADIENT_SLOTS]

    def gradient_vector(self, dtype, device):
        """The ``GRADIENT_SLOTS`` vector of ``add_grad_``: ``[l1, l2, group]``."""
        return vector(self[:GRADIENT_SLOTS], dtype, device)

    def prox_vector(self, lr, dtype, device):
        """The ``Prox`` vector of ``prox_`` for step ``lr``: ``[lr·l1, 1 + 2·lr·l2, lr·group,
        min_norm, max_norm, nonneg]``, computed in ``dtype`` (a float32 tensor coefficient of
        float64 parameters must not round the step to float32)."""
        l1, l2, group = (c.to(dtype) if isinstance(c, torch.Tensor) else c for c in (self.l1, self.l2, self.group))
        values = [None] * len(Prox)
        values[int(Prox.THRESHOLD)] = lr * l1
        values[int(Prox.DENOMINATOR)] = 1 + 2 * lr * l2
        values[int(Prox.GROUP_THRESHOLD)] = lr * group
        values[int(Prox.MIN_NORM)] = self.min_norm
        values[int(Prox.MAX_NORM)] = self.max_norm
        values[int(Prox.NONNEG)] = float(self.nonneg)
        return vector(values, dtype, device)


def add_values(total, value):
    """``total + value`` for penalty values (either may be None), on the first one's device;
    float32 + float64 gives float64."""
    if value is None:
        return total
    return value if total is None else total + value.to(total.device)


def add_class_values(totals, classes, sums, coefficients):
    """Adds each class's value to its param group's entry of ``totals``: ``classes`` are a kernel
    group's ``((param group, own group term counts), start, end)``, whose rows of the per-tensor
    ``sums`` are added in float64, times that param group's ``coefficients``."""
    acc = sums.dtype
    for (group, counts_group, _), start, end in classes:
        rows = sums[start] if end - start == 1 else sums[start:end].double().sum(dim=0).to(acc)
        totals[group] = add_values(totals[group], coefficients[group].value(rows, with_groups=counts_group))


def term(coefficient, value, dtype):
    """``coefficient · value``; a 0-dim float64 coefficient must not promote a float32 result."""
    return value * (coefficient.to(dtype) if isinstance(coefficient, torch.Tensor) else coefficient)


def vector(values, dtype, device):
    """``values`` (floats or 0-dim tensors) as one tensor for the kernels.

    Float tuples are cached per (values, dtype, device), at most ``CACHE_SIZE`` of them: a
    training loop with fixed coefficients then copies nothing to the GPU after its first step,
    and a schedule of floats keeps the cache bounded. While a CUDA graph is being captured the
    vector is made by fill kernels (capturable; the values are baked into the graph) and is
    never cached, so an eager call never reads a tensor whose value only a replay writes.
    """
    if any(isinstance(c, torch.Tensor) for c in values):
        return torch.stack([torch.as_tensor(c, dtype=dtype, device=device) for c in values]).detach()
    if capturing(device):
        return torch.stack([torch.full((), float(c), dtype=dtype, device=device) for c in values])
    key = (*(float(c) for c in values), dtype, device)
    coeffs = _cache.get(key)
    if coeffs is None:
        if len(_cache) >= CACHE_SIZE:
            _cache.clear()
        coeffs = torch.tensor(key[:-2], dtype=dtype, device=device)
        _cache[key] = coeffs
    return coeffs


CACHE_SIZE = 64
_cache = {}  # (values, dtype, device) -> vector: small constants, no user tensor


def capturing(device):
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return device_type == "cuda" and torch.cuda.is_current_stream_capturing()


def show(coefficient):
    return f"tensor({coefficient.item():g})" if isinstance(coefficient, torch.Tensor) else f"{coefficient:g}"
