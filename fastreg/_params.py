"""Which tensors a penalty covers: collecting ``params`` and applying ``exclude``."""

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastreg._dispatch import SUPPORTED_DTYPES

BIAS_AND_NORM = "bias_and_norm"


@dataclass(frozen=True)
class Entry:
    name: str
    tensor: torch.Tensor
    excluded_because: str | None = None  # None: regularized

    @property
    def included(self):
        return self.excluded_because is None


def select(params, exclude=None):
    """Every candidate tensor, each marked included or excluded (with the reason)."""
    is_excluded = _exclusion_rule(exclude)
    entries = []
    for name, tensor, frozen in _collect(params):
        reason = "requires_grad=False" if frozen else is_excluded(name, tensor)
        if reason is None:
            _check_dtype(name, tensor)
        entries.append(Entry(name, tensor, reason))
    return entries


def _collect(params):
    """Yield ``(name, tensor, frozen)`` once per distinct tensor, in order."""
    if isinstance(params, nn.Module):
        named = ((name, p, not p.requires_grad) for name, p in params.named_parameters())
    elif isinstance(params, torch.Tensor):
        named = [("[0]", params, False)]
    elif isinstance(params, Mapping):
        named = ((name, p, False) for name, p in params.items())
    elif isinstance(params, Iterable) and not isinstance(params, (str, bytes)):
        named = (_named_item(i, item) for i, item in enumerate(params))
    else:
        raise TypeError(
            "fastreg: params must be an nn.Module, an iterable of tensors or of (name, tensor) "
            f"pairs, got {type(params).__name__}"
        )
    seen = set()
    for name, tensor, frozen in named:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"fastreg: parameter {name!r} is a {type(tensor).__name__}, not a tensor")
        if id(tensor) in seen:  # a shared parameter counts once
            continue
        seen.add(id(tensor))
        yield name, tensor, frozen


def _named_item(index, item):
    if isinstance(item, torch.Tensor):
        return f"[{index}]", item, False
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1], False
    raise TypeError(
        f"fastreg: params[{index}] is a {type(item).__name__}; expected a tensor or a (name, tensor) pair"
    )


def _check_dtype(name, tensor):
    if tensor.dtype in SUPPORTED_DTYPES:
        return
    kind = "complex" if tensor.is_complex() else "floating-point" if tensor.is_floating_point() else "integer/bool"
    raise TypeError(
        f"fastreg: parameter {name!r} has {kind} dtype {tensor.dtype}; only float32, float64, "
        "float16 and bfloat16 parameters can be regularized (exclude it, or convert it)"
    )


def _exclusion_rule(exclude):
    """A function ``(name, tensor) -> reason or None`` for each accepted form of ``exclude``."""
    if exclude is None:
        return lambda name, tensor: None
    if isinstance(exclude, str):
        if exclude == BIAS_AND_NORM:
            return lambda name, tensor: f"bias_and_norm (ndim={tensor.ndim})" if tensor.ndim <= 1 else None
        raise ValueError(
            f"fastreg: unknown exclude {exclude!r}; use {BIAS_AND_NORM!r}, a list of glob patterns "
            f"such as [{exclude!r}], or a callable (name, tensor) -> bool"
        )
    if isinstance(exclude, Callable):
        return lambda name, tensor: "excluded by callable" if exclude(name, tensor) else None
    if isinstance(exclude, Iterable):
        patterns = list(exclude)
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"fastreg: exclude patterns must be strings, got {type(pattern).__name__}")

        def by_pattern(name, tensor):
            for pattern in patterns:
                if fnmatch.fnmatchcase(name, pattern):
                    return f"matches {pattern!r}"
            return None

        return by_pattern
    raise TypeError(
        f"fastreg: exclude must be None, {BIAS_AND_NORM!r}, a list of glob patterns or a callable, "
        f"got {type(exclude).__name__}"
    )
