"""Which tensors a penalty covers: collecting ``params``, applying ``exclude``, and rejecting
what no kernel can regularize (with the parameter's name in the message)."""

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fastreg.backends._geometry import SUPPORTED_DTYPES
from fastreg._warnings import warn

BIAS_AND_NORM = "bias_and_norm"
EMBEDDINGS = "embeddings"
NO_WEIGHT_DECAY = "no_weight_decay"  # timm: model.no_weight_decay(), model.no_weight_decay_keywords()
PRESETS = (BIAS_AND_NORM, EMBEDDINGS, NO_WEIGHT_DECAY)
EMBEDDING_MODULES = (nn.Embedding, nn.EmbeddingBag)


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
    is_excluded = _exclusion_rule(exclude, params)
    entries = []
    for name, tensor, frozen in _collect(params):
        reason = "requires_grad=False" if frozen else is_excluded(name, tensor)
        if reason is None:
            check_tensor(name, tensor)
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
    if not seen and isinstance(params, Iterator) and not torch.compiler.is_compiling():
        # `Penalty(model.parameters())` after the generator was consumed (e.g. by an optimizer
        # built from the same generator) silently regularizes nothing.
        warn(f"fastreg: params is an iterator ({type(params).__name__}) that yielded no tensors "
             "(already consumed?); the penalty regularizes nothing. Pass the module, or a list.",
             UserWarning)


def _named_item(index, item):
    if isinstance(item, torch.Tensor):
        return f"[{index}]", item, False
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        return item[0], item[1], False
    raise TypeError(
        f"fastreg: params[{index}] is a {type(item).__name__}; expected a tensor or a (name, tensor) pair"
    )


def check_tensor(name, tensor):
    """A regularized tensor must be a dense floating-point tensor holding data."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"fastreg: parameter {name!r} is a {tensor.layout} tensor; fastreg regularizes dense "
            "(strided) parameters only (exclude it, or convert it with .to_dense())"
        )
    if tensor.dtype not in SUPPORTED_DTYPES:
        kind = ("complex" if tensor.is_complex() else "floating-point" if tensor.is_floating_point()
                else "integer/bool")
        raise TypeError(
            f"fastreg: parameter {name!r} has {kind} dtype {tensor.dtype}; only float32, float64, "
            "float16 and bfloat16 parameters can be regularized (exclude it, or convert it)"
        )
    if tensor.device.type == "meta":
        raise ValueError(
            f"fastreg: parameter {name!r} is on the meta device (it has a shape but no data); "
            "materialize the model first (e.g. model.to_empty(device=...) and initialize it, "
            "or load its weights) and build the penalty after that"
        )


def _exclusion_rule(exclude, params):
    """A function ``(name, tensor) -> reason or None`` for each accepted form of ``exclude``.

    A list may mix presets (``"bias_and_norm"``, ``"embeddings"``) and glob patterns.
    """
    if exclude is None:
        return lambda name, tensor: None
    if isinstance(exclude, str):
        if exclude in PRESETS:
            return _exclusion_rule([exclude], params)
        raise ValueError(
            f"fastreg: unknown exclude {exclude!r}; use a preset ({', '.join(map(repr, PRESETS))}), "
            f"a list of presets and glob patterns such as [{exclude!r}], or a callable (name, tensor) -> bool"
        )
    if isinstance(exclude, Callable):
        return lambda name, tensor: "excluded by callable" if exclude(name, tensor) else None
    if isinstance(exclude, Iterable):
        items = list(exclude)
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"fastreg: exclude items must be presets or glob patterns (strings), "
                                f"got {type(item).__name__}")
        rules = [_preset_rule(item, params) if item in PRESETS else _pattern_rule(item) for item in items]

        def first_reason(name, tensor):
            for rule in rules:
                reason = rule(name, tensor)
                if reason is not None:
                    return reason
            return None

        return first_reason
    raise TypeError(
        f"fastreg: exclude must be None, a preset ({', '.join(map(repr, PRESETS))}), a list of presets "
        f"and glob patterns, or a callable, got {type(exclude).__name__}"
    )


def _preset_rule(preset, params):
    if preset == BIAS_AND_NORM:
        return lambda name, tensor: f"bias_and_norm (ndim={tensor.ndim})" if tensor.ndim <= 1 else None
    if not isinstance(params, nn.Module):
        finds = ("the weights of nn.Embedding / nn.EmbeddingBag modules" if preset == EMBEDDINGS
                 else "the names the model's no_weight_decay() / no_weight_decay_keywords() return")
        raise ValueError(
            f"fastreg: exclude={preset!r} finds {finds}, so params must be an nn.Module, not a "
            f"{type(params).__name__}; with plain tensors, exclude them by name (a glob pattern) instead"
        )
    if preset == NO_WEIGHT_DECAY:
        return _no_weight_decay_rule(params)
    embedding_of = {id(m.weight): type(m).__name__ for m in params.modules() if isinstance(m, EMBEDDING_MODULES)}
    return lambda name, tensor: (f"embeddings (nn.{embedding_of[id(tensor)]})" if id(tensor) in embedding_of
                                 else None)


def _no_weight_decay_rule(model):
    """timm's declaration: ``model.no_weight_decay()`` (names, or glob patterns, relative to the
    model: ``{"pos_embed", "cls_token"}``) and ``model.no_weight_decay_keywords()`` (substrings
    of names), as timm's optimizer factory reads them."""
    names = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else None
    keywords = (model.no_weight_decay_keywords() if callable(getattr(model, "no_weight_decay_keywords", None))
                else None)
    if names is None and keywords is None:
        raise ValueError(
            f"fastreg: exclude={NO_WEIGHT_DECAY!r} reads model.no_weight_decay() and "
            f"model.no_weight_decay_keywords() (timm's convention), but {type(model).__name__} defines "
            "neither; exclude the parameters by name (glob patterns) instead"
        )
    names, keywords = set(names or ()), tuple(keywords or ())

    def reason(name, tensor):
        if name in names or any(glob_match(name, pattern) for pattern in names):
            return "no_weight_decay (model.no_weight_decay())"
        if any(keyword in name for keyword in keywords):
            return "no_weight_decay (model.no_weight_decay_keywords())"
        return None

    return reason


def _pattern_rule(pattern):
    return lambda name, tensor: f"matches {pattern!r}" if glob_match(name, pattern) else None


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
