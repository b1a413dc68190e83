"""The one-call ``penalty(model, ...)``'s cache of ``Penalty`` objects, per module.

A cached ``Penalty`` is shared by every call with the same arguments, so nothing of a call is
written into it: the coefficients go to each call (``Penalty._value``).
"""

import weakref

import torch
from torch import nn

# The one-call penalty(model, ...) selects parameters, checks them and plans kernel groups on
# every call (3.5 ms per step more than a reused Penalty on 2,000 tensors, measured): the plan
# is cached per module and arguments, and reused only while the module still has exactly the
# same parameters (the same tensor objects, requires_grad flags and data pointers: replacing a
# parameter, freezing one or swapping its storage with p.data = ... all invalidate the plan).
# Callable excludes and centers are never cached (their results could change between calls).
_cache = weakref.WeakKeyDictionary()  # module -> {argument key: (Penalty, signature)}
CACHE_SIZE = 8  # argument sets kept per module


def _module_signature(module):
    return [(id(p), p.requires_grad, p.data_ptr()) for p in module.parameters()]


def _exclude_key(exclude):
    if exclude is None or isinstance(exclude, str):
        return exclude
    if isinstance(exclude, (list, tuple)) and all(isinstance(item, str) for item in exclude):
        return tuple(exclude)
    return _UNCACHEABLE


_UNCACHEABLE = object()


def lookup(params, exclude, group_dim, center, backend):
    """The Penalty ``penalty(params, ...)`` built last time for these arguments, if still valid;
    on a miss a ``Remember`` (the caller builds the Penalty and stores it with it); None when
    caching does not apply."""
    if not isinstance(params, nn.Module) or center is not None or torch.compiler.is_compiling():
        return None
    exclude_key = _exclude_key(exclude)
    if exclude_key is _UNCACHEABLE or not isinstance(group_dim, int) or not isinstance(backend, str):
        return None
    key = (exclude_key, group_dim, backend)
    entries = _cache.get(params)
    signature = _module_signature(params)
    if entries is not None and key in entries:
        reg, cached_signature = entries[key]
        if cached_signature == signature:
            return reg
    return Remember(params, key, signature)


class Remember:
    """Not a Penalty: tells ``penalty`` to build one and store it under this key."""

    def __init__(self, module, key, signature):
        self.module, self.key, self.signature = module, key, signature

    def store(self, reg):
        entries = _cache.setdefault(self.module, {})
        if len(entries) >= CACHE_SIZE and self.key not in entries:
            entries.pop(next(iter(entries)))
        entries[self.key] = (reg, self.signature)
        return reg
