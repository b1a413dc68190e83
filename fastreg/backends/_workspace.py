"""Per-kernel-group state that a backend keeps between calls, owned by the ``Penalty``.

**Ownership, stated once** (every backend follows it; ``tests/test_ownership.py`` checks it):

1. Every device address a kernel reads or writes belongs to a tensor that outlives the table
   holding the address. A table cached here holds, beside the addresses, the tensors they
   point into (the parameters' storages, their centers, any copy made for the kernels);
   a table built for one call (e.g. the gradients' pointers, which change every step) lives
   only as long as that call, or is kept holding addresses only (no tensor: old gradients are
   not kept alive) and used again only by a call whose own operands are at those addresses
   with the same layout, checked at every use and never during CUDA-graph capture: it is then
   the table that call would build.
2. fastreg keeps no user tensor alive beyond the ``Penalty`` that regularizes it: no
   module-level cache holds tables or user tensors (module level holds only small coefficient
   constants, and the one-call ``penalty(model)``'s ``Penalty`` per module, weakly keyed by the
   module and replaced when its parameters change). A ``Workspace`` belongs to one kernel group
   of one ``Penalty`` and dies with it; direct backend calls without a workspace cache nothing.
   A cached table may keep a swapped-out storage (``p.data = ...``) alive until the next build
   replaces it (same shapes) or the LRU drops it (at most ``limit`` tables a kernel group).
   The C++ registries of the cpu extension (``csrc/operands.cpp``: bound operands, layout and
   memory watches) hold tensors only under a handle that an object here or in the plan owns
   (``backends.cpu._Held``), and release them when it dies; a watch of write targets holds
   them by weak reference only.
3. Nothing built while a CUDA graph is being captured reaches an eager call: such tables are
   kept in ``captured`` (alive as long as the ``Penalty``, hence as long as a graph that
   replays them can run with it), never in the cache that eager calls look in.
4. Every in-place write bumps the version counter of what it writes (``fastreg._ops``), as a
   PyTorch in-place op does, so autograd's checks see it.

A workspace is reached from the ``torch.library`` op (where arguments must be plain data) by
its ``handle``, an integer looked up in a weak registry: the registry keeps nothing alive.
"""

import itertools
import weakref
from collections import OrderedDict

import torch

_registry = weakref.WeakValueDictionary()  # handle -> Workspace
_handles = itertools.count(1)


class Workspace:
    """A small LRU of a backend's per-call plans (device tables with their owners), plus the
    plans built during CUDA-graph capture."""

    __slots__ = ("entries", "families", "captured", "limit", "handle", "hits", "builds", "targets", "__weakref__")

    def __init__(self, limit=4):
        self.entries = OrderedDict()  # key -> plan (each plan holds the tensors it points into)
        self.families = {}  # key -> family (see put)
        self.captured = []  # plans built while a CUDA graph was being captured
        self.limit = limit
        self.hits = self.builds = 0
        self.targets = None  # a backend's record of the last call's write targets, never holding them
        self.handle = next(_handles)
        _registry[self.handle] = self

    def get(self, key, still_valid=None):
        """The plan cached under ``key``, or None; with ``still_valid``, only a plan for which it
        returns True (a key may leave out what is cheaper to compare than to hash: the caller
        then rebuilds the plan and puts it under the same key)."""
        plan = self.entries.get(key)
        if plan is None or (still_valid is not None and not still_valid(plan)):
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return plan

    def put(self, key, plan, family=None):
        """Cache ``plan`` under ``key``. A plan of the same ``family`` (e.g. the same tensors'
        shapes at other addresses, after ``p.data = ...``) is dropped first: a swapped-out
        storage is not kept alive beyond the next build."""
        self.builds += 1
        if family is not None:
            for stale in [k for k, f in self.families.items() if f == family and k != key]:
                del self.entries[stale], self.families[stale]
        self.entries[key] = plan
        self.families[key] = family
        while len(self.entries) > self.limit:
            oldest, _ = self.entries.popitem(last=False)
            self.families.pop(oldest, None)

    def __deepcopy__(self, memo):
        # What a workspace holds is derived from its kernel group's tensors (device tables, C++
        # handles of cpu.py): a deep copy of a Penalty regularizes copies of those tensors, and
        # builds its own from them.
        return Workspace(self.limit)

    def drop(self, key):
        """Forget the plan cached under ``key``, if any (what it holds is released with it)."""
        self.entries.pop(key, None)
        self.families.pop(key, None)

    def keep_for_capture(self, plan):
        self.builds += 1
        self.captured.append(plan)

    def clear(self):
        self.entries.clear()
        self.families.clear()
        self.captured.clear()
        self.targets = None

    def plans(self):
        """Every plan held (for the ownership tests)."""
        return list(self.entries.values()) + list(self.captured)


def may_hold_tensors():
    """Whether anything kept between calls may hold a user's tensors from C++ (the cpu
    extension's registries, ``backends.cpu._Held``). Not under
    ``torch.__future__.set_swap_module_params_on_conversion(True)``: ``torch.utils.swap_tensors``
    (``model.double()`` then swaps every parameter and gradient) refuses a tensor anything else
    holds, so nothing is held then, and the lists are handed over at every call. (Set it before
    the first call: handles made before are dropped at the next call only.)"""
    return not torch.__future__.get_swap_module_params_on_conversion()


def lookup(handle):
    """The live workspace of ``handle``, or None (0, or its ``Penalty`` is gone)."""
    return _registry.get(handle) if handle else None
