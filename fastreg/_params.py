"""Which tensors a penalty covers: collecting ``params`` and applying ``exclude``."""

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
                if glob_match(name, pattern):
                    return f"matches {pattern!r}"
            return None

        return by_pattern
    raise TypeError(
        f"fastreg: exclude must be None, {BIAS_AND_NORM!r}, a list of glob patterns or a callable, "
        f"got {type(exclude).__name__}"
    )


def glob_match(name, pattern):
    """``fnmatch.fnmatchcase`` semantics (``*``, ``?``, ``[seq]``, ``[!seq]``) in plain Python.

    fnmatch compiles a regex, which torch.compile cannot trace; this loop it can, so
    ``penalty(model, exclude=["*.bias"])`` works inside a ``fullgraph=True`` region.
    """
    n = p = 0
    star_p, star_n = -1, 0  # the last '*' seen and where it started matching
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star_p, star_n = p, n
            p += 1
            continue
        if p < len(pattern):
            step = _match_one(name[n], pattern, p)
            if step:
                n, p = n + 1, p + step
                continue
        if star_p < 0:
            return False
        star_n += 1  # let the last '*' swallow one more character and retry
        n, p = star_n, star_p + 1
    return all(c == "*" for c in pattern[p:])


def _match_one(char, pattern, p):
    """Pattern length consumed if ``pattern[p:]`` matches ``char`` here, else 0."""
    token = pattern[p]
    if token == "?":
        return 1
    if token == "[":
        first = p + 2 if pattern[p + 1:p + 2] == "!" else p + 1
        end = pattern.find("]", first + 1)  # a ']' right after '[' (or '[!') is a literal
        if end > 0:
            body = pattern[p + 1:end]
            negate = body[:1] == "!"
            body = body[1:] if negate else body
            found, i = False, 0
            while i < len(body):
                if i + 2 < len(body) and body[i + 1] == "-":
                    found = found or body[i] <= char <= body[i + 2]
                    i += 3
                else:
                    found = found or body[i] == char
                    i += 1
            return end - p + 1 if found != negate else 0
    return 1 if token == char else 0
