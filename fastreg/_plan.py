"""The plan of a ``Penalty``: everything about its parameters that does not change between steps.

Built once, at construction, and walked by ``__call__``, ``add_to_grad_``, ``prox_`` and
``explain``:

* the selection (``fastreg._params``) with each candidate's reason for being excluded;
* the checks no kernel should have to make again: supported tensors, no two parameters
  sharing memory, centers of the right shape and kind;
* the centers, converted once to each parameter's dtype, device and memory layout;
* the kernel groups: the tensors one backend call handles, keyed by (device, dtype, has a
  center) and, for sharded parameters, by (mesh, counted, groups spanning ranks);
* per parameter, what the group term does with it (its groups, or why none).

The backend itself is resolved inside the ops from ``backend`` (a cached dictionary lookup),
so that torch.compile traces no dispatch logic.
"""

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fastreg import _dispatch, _dtensor
from fastreg._params import select
from fastreg.backends._geometry import acc_dtype, group_sizes, is_dense
from fastreg.backends._workspace import Workspace

GROUP_DIMS = (0, 1)
INIT = "init"


@dataclass
class KernelGroup:
    """The parameters one backend call handles: one device, one dtype, all with or all without centers."""

    device: torch.device
    dtype: torch.dtype
    names: list = field(default_factory=list)
    tensors: list = field(default_factory=list)  # the parameters (DTensors for sharded groups)
    centers: list | None = None  # local tensors, one per parameter, or None
    sharded: bool = False
    counted: bool = True  # sharded: this rank's shards count in the global value
    reduce_groups: bool = False  # sharded: its groups span ranks (group_sq is all-reduced)
    # Where the backend keeps this group's tables between calls (owned here: see _workspace);
    # None for a plan built while torch.compile traces (a Penalty made inside a compiled function).
    workspace: Workspace | None = field(default_factory=lambda: None if torch.compiler.is_compiling() else Workspace())

    @property
    def acc_dtype(self):
        return acc_dtype(self.dtype)

    def local(self):
        """The tensors the kernels read: the parameters, or their local shards."""
        return [t.to_local() for t in self.tensors] if self.sharded else self.tensors

    def group_count(self, group_dim):
        return sum(group_sizes(self.tensors, group_dim))


@dataclass
class MeshPart:
    """The sharded parameters of one device mesh."""

    mesh: object
    groups: list  # KernelGroups


@dataclass
class ParameterInfo:
    """What ``explain()`` shows about one candidate."""

    name: str
    tensor: torch.Tensor
    excluded_because: str | None
    center: str = "none"


class Plan:
    def __init__(self, params, exclude, group_dim, center, backend):
        if isinstance(group_dim, bool) or group_dim not in GROUP_DIMS:
            raise ValueError(f"fastreg: group_dim must be 0 (rows: output units, filters) or 1 "
                             f"(columns: input features, channels), got {group_dim!r}")
        self.group_dim = group_dim
        self.backend = _dispatch.requested_backend(backend)
        entries = select(params, exclude)
        included = [e for e in entries if e.included]
        if not torch.compiler.is_compiling():  # data pointers do not exist while tracing
            check_no_overlap([(e.name, _dtensor.local(e.tensor)) for e in included])
        centers, center_notes = _centers(center, entries, included)
        self.info = []
        notes = dict(zip((id(e.tensor) for e in included), center_notes))
        for e in entries:
            info = ParameterInfo(e.name, e.tensor, e.excluded_because)
            if e.included:
                info.center = notes[id(e.tensor)]
            self.info.append(info)
        self.names = [e.name for e in included]
        self.tensors = [e.tensor for e in included]
        self.centers = centers  # one local tensor (or None) per included parameter, as the kernels read it
        # The centers as first converted: a center that follows its parameter to another dtype is
        # converted from this one, so a round trip (float64 -> float32 -> float64) loses nothing.
        self.given_centers = list(centers)
        self.has_centers = center is not None
        self._regroup()

    def _regroup(self):
        """The kernel groups (and what they depend on) from the parameters as they are now."""
        self.local, self.meshes = _kernel_groups(self.names, self.tensors, self.centers, self.group_dim)
        self._centered = [t for t, c in zip(self.tensors, self.centers) if c is not None]
        self._layout = None if torch.compiler.is_compiling() else self._read_layout()
        dtypes = {t.dtype for t in self.tensors}
        self.result_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._in_place_checked = False

    def _read_layout(self):
        """What the kernel groups depend on: every parameter's dtype and device, and the shape of
        every parameter with a center (the kernels read the others' shapes at each call).
        C-level maps: ~0.13 us a tensor, measured on 2,000 tensors."""
        return (tuple(map(_DTYPE, self.tensors)), tuple(map(torch.Tensor.get_device, self.tensors)),
                tuple(map(torch.Tensor.size, self._centered)))

    def current(self):
        """The plan, after following any parameter whose dtype or device changed since it was
        built (``p.data = ...``): called by every operation, so a kernel never reads a tensor as
        what it was. A parameter with a center cannot change shape (``ValueError`` naming it);
        its center follows a new dtype or device. Not while torch.compile traces (the check is
        Python it cannot trace): a graph traced after a change the plan has not followed gets a
        clear error from the op instead (``fastreg._ops.sums``), never a wrong number."""
        if self._layout is not None and not torch.compiler.is_compiling() and self._read_layout() != self._layout:
            self._follow()
        return self

    def _follow(self):
        for i, (name, t, c) in enumerate(zip(self.names, self.tensors, self.centers)):
            if c is None:
                continue
            local = _dtensor.local(t)
            if tuple(c.shape) != tuple(local.shape):
                raise ValueError(f"fastreg: parameter {name!r} changed shape to {tuple(t.shape)} under a Penalty "
                                 f"with a center of shape {tuple(c.shape)}; build a new Penalty for the new shape")
            if c.dtype != local.dtype or c.device != local.device:
                given = self.given_centers[i]
                with torch.no_grad():
                    self.centers[i] = given if (given.dtype, given.device) == (local.dtype, local.device) \
                        else _like(local.detach()).copy_(given)
        check_no_overlap([(n, _dtensor.local(t)) for n, t in zip(self.names, self.tensors)])
        self._regroup()

    def check_in_place_once(self):
        """Before the first in-place update of the parameters themselves (``prox_``): no
        parameter may have elements that share memory."""
        if not self._in_place_checked:
            for name, t in zip(self.names, self.tensors):
                internal_overlap(name, _dtensor.local(t))
            self._in_place_checked = True

    def kernel_groups(self):
        """Every kernel group, plain ones first, then each mesh's."""
        return self.local + [g for part in self.meshes for g in part.groups]

    def restricted(self, keep):
        """A plan over the parameters for which ``keep(tensor)`` is true: the same centers (as
        followed up to now), its own kernel groups and workspaces; it follows later changes
        itself (``current()``)."""
        self.current()
        plan = object.__new__(Plan)
        plan.__dict__.update(self.__dict__)
        kept = [i for i, t in enumerate(self.tensors) if keep(t)]
        plan.names = [self.names[i] for i in kept]
        plan.tensors = [self.tensors[i] for i in kept]
        plan.centers = [self.centers[i] for i in kept]
        plan.given_centers = [self.given_centers[i] for i in kept]
        plan._regroup()
        return plan


_DTYPE = operator.attrgetter("dtype")


def groups_text(tensor, group_dim):
    return (f"{tensor.shape[group_dim]} ({'rows' if group_dim == 0 else 'columns'})"
            if tensor.ndim >= 2 else "none (ndim < 2)")


def _kernel_groups(names, tensors, centers, group_dim):
    local, meshes = {}, {}
    for name, t, center in zip(names, tensors, centers):
        if _dtensor.is_sharded(t):
            _dtensor.check_placements(name, t, group_dim)
            key = (t.device, t.dtype, center is not None, _dtensor.is_counted(t),
                   _dtensor.groups_span_ranks(t, group_dim))
            part = meshes.setdefault(t.device_mesh, {})
            group = part.get(key)
            if group is None:
                group = part[key] = KernelGroup(t.device, t.dtype, centers=[] if center is not None else None,
                                                sharded=True, counted=key[3], reduce_groups=key[4])
        else:
            key = (t.device, t.dtype, center is not None)
            group = local.get(key)
            if group is None:
                group = local[key] = KernelGroup(t.device, t.dtype, centers=[] if center is not None else None)
        group.names.append(name)
        group.tensors.append(t)
        if center is not None:
            group.centers.append(center)
    return list(local.values()), [MeshPart(mesh, list(groups.values())) for mesh, groups in meshes.items()]


# ------------------------------------------------------------------------------------------
# Centers


def _centers(center, entries, included):
    """``(centers, notes)``: one local center tensor (or None) and one description per included entry."""
    if center is None:
        return [None] * len(included), ["none"] * len(included)
    if isinstance(center, str):
        if center != INIT:
            raise ValueError(f"fastreg: center must be None, {INIT!r}, a mapping from parameter names to "
                             f"tensors (e.g. pretrained.state_dict()) or a sequence of tensors, got {center!r}")
        with torch.no_grad():
            return [_snapshot(e.tensor) for e in included], [INIT] * len(included)
    if isinstance(center, Mapping):
        centers, notes = [], []
        for e in included:
            if e.name in center:
                centers.append(_given(e.name, e.tensor, center[e.name]))
                notes.append("given")
            else:  # e.g. a new head: pulled toward 0
                centers.append(None)
                notes.append("none (not in mapping)")
        return centers, notes
    if isinstance(center, Sequence) or (hasattr(center, "__iter__") and not isinstance(center, torch.Tensor)):
        given = list(center)
        if len(given) == len(included):
            aligned = included
        elif len(given) == len(entries):
            aligned = entries  # aligned with every candidate, e.g. [p.clone() for p in model.parameters()]
        else:
            raise ValueError(f"fastreg: center has {len(given)} tensors; expected one per regularized "
                             f"parameter ({len(included)}) or one per candidate parameter ({len(entries)})")
        by_id = {id(e.tensor): c for e, c in zip(aligned, given)}
        centers = [_given(e.name, e.tensor, by_id[id(e.tensor)]) for e in included]
        return centers, ["given"] * len(included)
    raise TypeError(f"fastreg: center must be None, {INIT!r}, a mapping or a sequence of tensors, "
                    f"got {type(center).__name__}")


def _like(local):
    """An uninitialised tensor with ``local``'s dtype, device and memory layout."""
    return torch.empty_like(local, memory_format=torch.preserve_format)


def _snapshot(tensor):
    local = _dtensor.local(tensor).detach()
    return _like(local).copy_(local)


def _given(name, tensor, value):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"fastreg: the center of parameter {name!r} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise TypeError(f"fastreg: the center of parameter {name!r} has dtype {value.dtype}; "
                        "centers must be floating-point")
    if value.layout != torch.strided:
        raise TypeError(f"fastreg: the center of parameter {name!r} is a {value.layout} tensor; it must be dense")
    local = _dtensor.local(tensor).detach()
    value = value.detach()
    if _dtensor.is_sharded(value):
        value = value.to_local()
    if _dtensor.is_sharded(tensor) and tuple(value.shape) == tuple(tensor.shape) != tuple(local.shape):
        value = value[_dtensor.local_slices(tensor)]  # a full-size center: this rank's part of it
    if tuple(value.shape) != tuple(local.shape):
        raise ValueError(f"fastreg: the center of parameter {name!r} has shape {tuple(value.shape)}, "
                         f"the parameter {tuple(tensor.shape)}")
    with torch.no_grad():
        return _like(local).copy_(value)  # converted once: dtype, device, layout


# ------------------------------------------------------------------------------------------
# Overlap


def _byte_range(t):
    """``(storage pointer, first byte, end byte)`` spanned by ``t`` (non-negative strides)."""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), start, start + span * t.element_size()


def check_no_overlap(named):
    """``ValueError`` naming both parameters if two of them share memory.

    In-place updates (``add_to_grad_``, ``prox_``) of two views of the same memory race on a
    GPU and apply twice elsewhere. Distinct, non-overlapping views of one buffer (a flat
    parameter cut into pieces) are fine.
    """
    spans = []
    for name, t in named:
        if t.numel() and t.device.type != "meta" and all(s >= 0 for s in t.stride()):
            spans.append((*_byte_range(t), name, t))
    spans.sort(key=lambda s: (s[0], s[1]))
    for (ptr_a, start_a, end_a, name_a, a), (ptr_b, start_b, end_b, name_b, b) in _candidate_pairs(spans):
        if _elements_overlap(a, b):
            raise ValueError(f"fastreg: parameters {name_a!r} and {name_b!r} share memory (views of the same "
                             "storage that overlap); pass each tensor once")


def _candidate_pairs(spans):
    """Pairs of spans on one storage whose byte ranges overlap (a sweep over sorted starts)."""
    open_spans = []
    for span in spans:
        open_spans = [s for s in open_spans if s[0] == span[0] and s[2] > span[1]]
        for other in open_spans:
            yield other, span
        open_spans.append(span)


def _elements_overlap(a, b):
    """Whether two tensors with overlapping byte ranges share an element."""
    if is_dense(a) and is_dense(b):
        return True  # each covers its whole range
    if a.dtype != b.dtype:
        return True  # conservative: the ranges overlap
    _, start_a, _ = _byte_range(a)
    _, start_b, _ = _byte_range(b)
    base = min(start_a, start_b)
    size = max(_byte_range(a)[2], _byte_range(b)[2]) - base
    marks = torch.zeros(size // a.element_size(), dtype=torch.uint8)
    marks.as_strided(a.shape, a.stride(), (start_a - base) // a.element_size()).fill_(1)
    return bool(marks.as_strided(b.shape, b.stride(), (start_b - base) // b.element_size()).any())


def internal_overlap(name, t):
    """``ValueError`` if ``t`` has elements that share memory (e.g. an ``expand``ed tensor)."""
    if t.numel() and torch._debug_has_internal_overlap(t) == 1:
        raise ValueError(f"fastreg: parameter {name!r} has elements that share memory (stride 0, e.g. "
                         "expand()); it cannot be updated in place")

