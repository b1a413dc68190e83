"""The plan of a ``Penalty``: everything about its parameters that does not change between steps.

Built once, at construction, and walked by ``__call__``, ``add_to_grad_``, ``prox_``, ``values``
and ``explain``:

* the param groups (``fastreg._settings``) and, per group, the selection (``fastreg._params``)
  with each candidate's reason for being excluded;
* the checks no kernel should have to make again: supported tensors, no two parameters
  sharing memory, centers of the right shape and kind, structures that divide the tensors;
* the centers, converted once to each parameter's dtype, device and memory layout;
* per parameter its *structure* (where its groups lie: rows, columns, blocks of k, the whole
  tensor, a coupling's slices) and its *class*: (param group, whether its own group term
  counts), the unit in which values are formed and coefficient tables are built;
* the kernel groups: the tensors one backend call handles, keyed by (device, dtype, has a
  center) and, for sharded parameters, by (mesh, counted, groups spanning ranks) — every
  setting in one call, ordered by class so that a class's sums are one slice;
* the couplings: groups made of slices of several parameters, whose squared norms are added
  across tensors (and kernel groups) before the norm is taken.

``call(coefficients, op)`` turns the param groups' current coefficients into what one
operation needs (``Call``): each kernel group's active structure and coefficient tables,
cached per pattern of which terms are active, so a schedule of floats rebuilds nothing.

The backend itself is resolved inside the ops from ``backend`` (a cached dictionary lookup),
so that torch.compile traces no dispatch logic.
"""

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fastreg import _coefficients, _dispatch, _dtensor, _settings
from fastreg._params import select
from fastreg._warnings import warn
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups, acc_dtype, is_dense
from fastreg.backends._workspace import Workspace, may_hold_tensors

INIT = "init"
GRAD, PROX = "grad", "prox"  # the operations a Call is for (prox activates the constraints' structures)


@dataclass
class KernelGroup:
    """The parameters one backend call handles: one device, one dtype, all with or all without centers."""

    device: torch.device
    dtype: torch.dtype
    names: list = field(default_factory=list)
    tensors: list = field(default_factory=list)  # the parameters (DTensors for sharded groups)
    centers: list | None = None  # local tensors, one per parameter, or None
    members: list = field(default_factory=list)  # the plan's Member of each tensor
    sharded: bool = False
    counted: bool = True  # sharded: this rank's shards count in the global value
    reduce_groups: bool = False  # sharded: its groups span ranks (group_sq is all-reduced)
    # Where the backend keeps this group's tables between calls (owned here: see _workspace);
    # None for a plan built while torch.compile traces (a Penalty made inside a compiled function).
    workspace: Workspace | None = field(default_factory=lambda: None if torch.compiler.is_compiling() else Workspace())
    classes: list = field(default_factory=list)  # (class, start, end): the rows of each class, in order
    _calls: dict = field(default_factory=dict)  # activity pattern -> (Groups, class index tensor)
    # (op, activity pattern, dtype) -> (the class rows, the table gathered from them): the last
    # table, reused while the rows are the same tensors (float coefficients: cached vectors)
    _tables: dict = field(default_factory=dict)

    @property
    def acc_dtype(self):
        return acc_dtype(self.dtype)

    def local(self):
        """The tensors the kernels read: the parameters, or their local shards."""
        return [t.to_local() for t in self.tensors] if self.sharded else self.tensors


@dataclass
class MeshPart:
    """The sharded parameters of one device mesh."""

    mesh: object
    groups: list  # KernelGroups


@dataclass
class Member:
    """One regularized parameter: where it comes from and how its terms apply."""

    name: str
    tensor: torch.Tensor
    center: torch.Tensor | None
    group: int  # its param group
    structure: tuple  # (dim, size) of its group term: (NO_GROUPS, 1), (WHOLE, 1), (dim, k)
    constraint_structure: tuple  # where its norm constraints apply (its groups, else the whole tensor)
    coupling: int | None = None  # the coupling whose slices it holds
    # The center as first converted: a center that follows its parameter to another dtype is
    # converted from this one, so a round trip (float64 -> float32 -> float64) loses nothing.
    given_center: torch.Tensor | None = None

    def __post_init__(self):
        if self.given_center is None:
            self.given_center = self.center

    coupling_group: int = -1  # the param group its coupling's coefficient comes from (-1: none)

    @property
    def cls(self):
        """Its class: its param group, whether its own group term counts, and the param group
        whose ``group`` its coupling takes (-1: none)."""
        return self.group, self.structure[0] != NO_GROUPS and self.coupling is None, self.coupling_group


@dataclass
class ParameterInfo:
    """What ``explain()`` shows about one candidate."""

    name: str
    tensor: torch.Tensor
    excluded_because: str | None
    center: str = "none"
    group: int | None = None
    member: "Member | None" = None


@dataclass
class Coupling:
    """Slices of several parameters that form one group each (a neuron: its row of fc1, its
    bias, its column of fc2). Its group term takes the ``group`` of its first slice's param group."""

    slices: list  # (name, dim)
    length: int
    group: int  # the param group its coefficient comes from
    slice_groups: list = field(default_factory=list)  # the param group of each slice


class Call(tuple):
    """What one operation needs: per kernel group, ``(groups, tables)``; see ``Plan.call``."""


class Plan:
    def __init__(self, groups, coupled, backend):
        self.backend = _dispatch.requested_backend(backend)
        self.param_groups = groups
        self._fixed = [{key: group[key] for key in _settings.STRUCTURE_KEYS} for group in groups]
        self._group_count = len(groups)
        self.info, members = [], []
        seen, mapped = {}, {}
        for index, group in enumerate(groups):
            where = _where(index, group)
            candidates = select(group["source"], group["exclude"])
            entries = candidates
            belongs = group.get("belongs")
            if belongs is not None:  # rules: every group selects from the same module
                entries = [e for e in candidates if belongs(e.name, e.tensor) == index]
            included = [e for e in entries if e.included]
            for e in included:
                if id(e.tensor) in seen:
                    raise ValueError(f"fastreg: parameter {e.name!r} is in {seen[id(e.tensor)]} and in {where}; "
                                     "a parameter belongs to one param group")
                seen[id(e.tensor)] = where
            center = group["center"]
            if _is_sequence(center) and len(groups) > 1 and belongs is None and center is groups[0].get("center") \
                    and all(g.get("center") is center for g in groups):
                raise ValueError("fastreg: a sequence of centers cannot be shared by several param groups (it is "
                                 "aligned with one group's parameters); give each group its own 'center', or a "
                                 "mapping from names")
            centers, notes = _centers(center, candidates, included)
            if isinstance(center, Mapping) and center:
                mapped.setdefault(id(center), [center, False])[1] |= any(c is not None for c in centers)
            notes = dict(zip((id(e.tensor) for e in included), notes))
            for e, center in zip(included, centers):
                structure = _structure(e.name, e.tensor, group["group_dim"], group["group_size"])
                members.append(Member(e.name, e.tensor, center, index, structure,
                                      structure if structure[0] != NO_GROUPS else (WHOLE, 1)))
            by_tensor = {id(m.tensor): m for m in members[len(members) - len(included):]}
            for e in entries:
                info = ParameterInfo(e.name, e.tensor, e.excluded_because)
                if e.included:
                    info.center, info.group, info.member = notes[id(e.tensor)], index, by_tensor[id(e.tensor)]
                self.info.append(info)
            group["params"] = [e.tensor for e in included]
        self._params_fixed = [(g["params"], len(g["params"])) for g in groups]
        for center, used in mapped.values():
            if not used and members and not torch.compiler.is_compiling():
                # Most likely names relative to another module (a param group of a submodule names
                # its parameters relative to it): every parameter would be pulled toward 0.
                warn(f"fastreg: the center mapping names none of the regularized parameters (e.g. "
                     f"{members[0].name!r}; the mapping has {next(iter(center))!r}); they are pulled toward 0",
                     UserWarning)
        if not torch.compiler.is_compiling():  # data pointers do not exist while tracing
            check_no_overlap([(m.name, _dtensor.local(m.tensor)) for m in members])
        self.couplings = _couplings(coupled, members)
        self.members = members
        self.has_centers = any(m.center is not None for m in members)
        self._regroup()

    # The parameters as lists (the kernels, attach and explain read these).
    names = property(lambda self: [m.name for m in self.members])
    tensors = property(lambda self: [m.tensor for m in self.members])
    centers = property(lambda self: [m.center for m in self.members])

    def check_unchanged(self):
        """Structure settings are fixed at construction: a change is an error naming its group."""
        if len(self.param_groups) != self._group_count:
            raise ValueError(f"fastreg: the Penalty was built with {self._group_count} param groups and now has "
                             f"{len(self.param_groups)}; build a new Penalty for other parameters")
        allowed = set(_settings.SETTING_KEYS) | {"params", "rule"}
        for index, group in enumerate(self.param_groups):
            unknown = set(group) - allowed
            missing = set(_settings.SETTING_KEYS) - set(group)
            if unknown or missing:
                raise ValueError(f"fastreg: {_where(index, group)} has "
                                 + (f"unknown keys {sorted(unknown)}" if unknown else f"no {sorted(missing)}")
                                 + f"; its settings are {', '.join(_settings.SETTING_KEYS)}")
        for index, (group, fixed) in enumerate(zip(self.param_groups, self._fixed)):
            for key, value in fixed.items():
                if group.get(key, value) is not value:
                    raise ValueError(f"fastreg: {key} of {_where(index, group)} changed after the Penalty was built; "
                                     f"only {', '.join(_settings.COEFFICIENT_KEYS)} can change between calls "
                                     "(build a new Penalty for a new structure)")
            params, (fixed_list, fixed_length) = group.get("params"), self._params_fixed[index]
            if params is not fixed_list or len(params) != fixed_length:
                raise ValueError(f"fastreg: the params of {_where(index, group)} changed after the Penalty was built; "
                                 "build a new Penalty for other parameters")

    def _regroup(self):
        """The kernel groups (and what they depend on) from the parameters as they are now."""
        self.local, self.meshes = _kernel_groups(self.members)
        self._tensors = [m.tensor for m in self.members]  # (read by _read_layout at every call)
        self._plain = all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in self._tensors)
        self._centered = [m.tensor for m in self.members if m.center is not None]
        self._shaped = [m.tensor for m in self.members if m.structure[1] > 1 or m.coupling is not None]
        self._layout = None if torch.compiler.is_compiling() else self._read_layout()
        self._layout_changed = None  # the compiled check of _layout, once available: see current()
        dtypes = {m.tensor.dtype for m in self.members}
        self.result_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self._in_place_checked = False
        self._last_calls = {}  # op -> (coefficients, lr, table_dtype, Call): see call()
        self._checked = None  # (state, coefficients) of the last coefficients(): see there
        self._one_node_calls = None  # (coefficients, [(kernel group, groups, table)]): see one_node_calls()

    def _read_layout(self):
        """What the kernel groups depend on: every parameter's dtype and device, and the shape of
        every parameter with a center, blocks or a coupling (the kernels read the others' shapes
        at each call). C-level maps: ~0.13 us a tensor, measured on 2,000 tensors."""
        tensors = self._tensors
        return (tuple(map(_DTYPE, tensors)), tuple(map(torch.Tensor.get_device, tensors)),
                tuple(map(torch.Tensor.size, self._centered)), tuple(map(torch.Tensor.size, self._shaped)))

    def current(self):
        """The plan, after following any parameter whose dtype or device changed since it was
        built (``p.data = ...``): called by every operation, so a kernel never reads a tensor as
        what it was. A parameter with a center cannot change shape (``ValueError`` naming it);
        its center follows a new dtype or device. Not while torch.compile traces (the check is
        Python it cannot trace): a graph traced after a change the plan has not followed gets a
        clear error from the op instead (``fastreg._ops.sums``), never a wrong number."""
        if self._layout is None or torch.compiler.is_compiling():
            return self
        watch = self._layout_changed  # (a local: another thread's regroup may reset the attribute)
        if watch is not None and not may_hold_tensors():
            watch = self._layout_changed = None  # (released: torch.utils.swap_tensors refuses held tensors)
        if watch is not None:
            if watch():
                self._follow()
        elif self._read_layout() != self._layout:
            self._follow()
        elif self._plain:  # unchanged: from now on the same check in one C++ call, where one is loaded
            self._layout_changed = _dispatch.layout_watch(self._tensors, self._centered + self._shaped)
        return self

    def _follow(self):
        for m in self.members:
            local = _dtensor.local(m.tensor)
            if m.structure[0] >= 0 and local.shape[m.structure[0]] % m.structure[1]:
                raise ValueError(f"fastreg: parameter {m.name!r} changed shape to {tuple(m.tensor.shape)}, which "
                                 f"its group_size {m.structure[1]} does not divide; build a new Penalty")
            if m.coupling is not None and local.shape[m.structure[0]] != self.couplings[m.coupling].length:
                raise ValueError(f"fastreg: parameter {m.name!r} of coupled[{m.coupling}] now has "
                                 f"{local.shape[m.structure[0]]} slices along dim {m.structure[0]}, the coupling "
                                 f"{self.couplings[m.coupling].length}; build a new Penalty")
            c = m.center
            if c is None:
                continue
            if tuple(c.shape) != tuple(local.shape):
                raise ValueError(f"fastreg: parameter {m.name!r} changed shape to {tuple(m.tensor.shape)} under a "
                                 f"Penalty with a center of shape {tuple(c.shape)}; build a new Penalty for the new "
                                 "shape")
            if c.dtype != local.dtype or c.device != local.device:
                given = m.given_center
                with torch.no_grad():
                    m.center = given if (given.dtype, given.device) == (local.dtype, local.device) \
                        else _like(local.detach()).copy_(given)
        check_no_overlap([(m.name, _dtensor.local(m.tensor)) for m in self.members])
        self._regroup()

    def check_in_place_once(self):
        """Before the first in-place update of the parameters themselves (``prox_``): no
        parameter may have elements that share memory."""
        if not self._in_place_checked:
            for m in self.members:
                internal_overlap(m.name, _dtensor.local(m.tensor))
            self._in_place_checked = True

    def kernel_groups(self):
        """Every kernel group, plain ones first, then each mesh's."""
        return self.local + [g for part in self.meshes for g in part.groups]

    def restricted(self, keep):
        """A plan over the parameters for which ``keep(tensor)`` is true: the same centers (as
        followed up to now), its own kernel groups and workspaces; it follows later changes
        itself (``current()``). Couplings stay whole: a coupling is kept when all its slices are."""
        self.current()
        plan = object.__new__(Plan)
        plan.__dict__.update(self.__dict__)
        kept_couplings = [all(keep(m.tensor) for m in self.members if m.coupling == c)
                          for c in range(len(self.couplings))]
        plan.members = [m for m in self.members if keep(m.tensor) and (m.coupling is None or kept_couplings[m.coupling])]
        plan._regroup()
        return plan

    # ------------------------------------------------------------------------------------
    # Per call

    def coefficients(self):
        """Every param group's ``Coefficients``, read and checked now; the same list as at the
        last call when no param group has changed since (``call`` reuses its tables then).

        The checks are skipped only when they cannot answer differently: the param groups are
        the same plain dicts (a dict subclass may compute a value on each read: never cached),
        each with the same keys holding the very same objects (``is``) and the
        same number of params, and every coefficient and constraint is an immutable Python value
        (float, int, bool, None, a tuple of numbers: a tensor can change in place, a list be
        mutated, so those are read and checked at every call, as before). Any way of setting a
        coefficient (``reg.l2 = v``, ``param_groups[i][key] = v``, ``update``, a new dict) puts
        another object there, or the same already-checked one. Not while torch.compile traces.
        Internal: the list is shared between calls (``Penalty.coefficients`` hands out a copy)."""
        if torch.compiler.is_compiling():
            state = None
        else:
            # (the last state's values were all immutable, else there is none: the very same
            # objects need no new look, and the state formed from them would be the same)
            if self._checked is not None and _unchanged(self.param_groups, self._checked[0]):
                return self._checked[1]
            state = self._coefficient_state()
            if state is not None and self._checked is not None and _same_state(state, self._checked[0]):
                return self._checked[1]
        self.check_unchanged()
        if len(self.param_groups) == 1 and "rule" not in self.param_groups[0]:
            coefficients = [_settings.coefficients(self.param_groups[0])]
        else:
            coefficients = [_settings.coefficients(group, _where(i, group))
                            for i, group in enumerate(self.param_groups)]
            for index, coupling in enumerate(self.couplings):
                _check_coupling(index, coupling, coefficients, self.param_groups)
        self._checked = None if state is None else (state, coefficients)
        return coefficients

    def _coefficient_state(self):
        """What ``coefficients()`` read, by identity, or None when a value may change unseen."""
        groups = self.param_groups
        state = [groups, len(groups)]
        for group in groups:
            if type(group) is not dict:  # a subclass may compute what it returns on each read
                return None
            for key in _settings.COEFFICIENT_KEYS:
                if not _immutable(group.get(key)):
                    return None
            params = group.get("params")
            state += (group, tuple(group), tuple(group.values()), len(params) if isinstance(params, list) else -1)
        return state

    def call(self, coefficients, op=None, lr=None, table_dtype=None):
        """See ``_call``; the last ``Call`` of each op again when it is asked for with the same
        ``coefficients`` list (``coefficients()`` returns the same list while nothing changed),
        ``lr`` and ``table_dtype``. Not while torch.compile traces or a CUDA graph is captured
        (the tables are then made by capturable kernels, never cached)."""
        if torch.compiler.is_compiling() or any(_coefficients.capturing(kg.device) for kg in self.kernel_groups()):
            return self._call(coefficients, op, lr, table_dtype)
        last = self._last_calls.get(op)
        if last is not None and last[0] is coefficients and last[1] == lr and last[2] == table_dtype:
            return last[3]
        out = self._call(coefficients, op, lr, table_dtype)
        self._last_calls[op] = (coefficients, lr, table_dtype, out)
        return out

    def one_node_calls(self, coefficients):
        """The value's calls as one node per kernel group (``_operations.value``'s fast path):
        ``[(kernel group, groups, table)]`` as remembered by ``remember_one_node_calls`` for this
        very ``coefficients`` list, or None. Valid exactly while that list is the one
        ``coefficients()`` returns from its cache (immutable values only: no coefficient tensor
        that could come to need a gradient; the param groups unchanged) and the kernel groups
        are the same (a regroup forgets it); never while torch.compile traces."""
        last = self._one_node_calls
        if last is None or last[0] is not coefficients or torch.compiler.is_compiling():
            return None
        return last[1]

    def remember_one_node_calls(self, coefficients, calls):
        """Keeps ``calls`` for ``one_node_calls`` when that is exact: ``coefficients`` is the
        list ``coefficients()`` cached, and no kernel group is on a CUDA device (``call``'s CUDA
        graph capture check, which a cached call would skip, is then always false)."""
        if (self._checked is not None and self._checked[1] is coefficients and not torch.compiler.is_compiling()
                and all(kg.device.type != "cuda" for kg in self.kernel_groups())):
            self._one_node_calls = (coefficients, calls)

    def _call(self, coefficients, op=None, lr=None, table_dtype=None):
        """``Call``: per kernel group (in ``kernel_groups()`` order), ``(groups, table)``: the
        structure each tensor has in this operation (a tensor's group term is off where its
        coefficient is a Python zero; a norm constraint needs its groups in ``prox_`` only), and
        the coefficient table: ``Gradient`` rows (``op=GRAD``), ``Prox`` rows for step ``lr``
        (``op=PROX``), or None (the value: its coefficients stay outside the op). The tables are
        in each kernel group's acc dtype, or ``table_dtype`` (the metric step reads ``2·lr·l2``
        as ``DENOMINATOR − 1``, which float32 would round away)."""
        group_on = [not _coefficients.is_zero(c.group) for c in coefficients]
        constrained = [c.constrained for c in coefficients] if op == PROX else [False] * len(coefficients)
        coupling_on = [group_on[c.group] for c in self.couplings]
        pattern = (op == PROX, tuple(group_on), tuple(constrained), tuple(coupling_on))
        out = []
        for kg in self.kernel_groups():
            cached = kg._calls.get(pattern)
            if cached is None:
                cached = (_active_groups(kg, group_on, constrained, coupling_on), _class_index(kg))
                if not torch.compiler.is_compiling():  # a traced write would be a guard on the cache
                    kg._calls[pattern] = cached
            groups, index = cached
            table = None
            if op is not None:
                rows = [_class_row(coefficients, cls, op, lr, kg, table_dtype) for cls, _, _ in kg.classes]
                key = (op, pattern, table_dtype)
                last = kg._tables.get(key)
                if last is not None and len(last[0]) == len(rows) and all(a is b for a, b in zip(last[0], rows)):
                    table = last[1]
                else:
                    table = _table(rows, index, len(kg.tensors))
                    if not torch.compiler.is_compiling() and not _coefficients.capturing(kg.device):
                        kg._tables[key] = (rows, table)
            out.append((groups, table))
        return Call(out)


_DTYPE = operator.attrgetter("dtype")
_IMMUTABLE = (float, int, bool, type(None))


def _immutable(value):
    """A coefficient or constraint value that cannot change without being replaced."""
    return type(value) in _IMMUTABLE or (type(value) is tuple and all(type(v) in _IMMUTABLE for v in value))


def _same_state(state, last):
    """``Plan._coefficient_state`` unchanged: the same objects (keys compared by value)."""
    if len(state) != len(last) or state[0] is not last[0] or state[1] != last[1]:
        return False
    for i in range(2, len(state), 4):
        if (state[i] is not last[i] or state[i + 1] != last[i + 1] or state[i + 3] != last[i + 3]
                or not all(map(operator.is_, state[i + 2], last[i + 2]))):
            return False
    return True


def _unchanged(groups, last):
    """``_same_state(Plan._coefficient_state(), last)`` without forming the state: the same param
    groups holding the same keys and the very same values (``last`` holds only immutable ones)."""
    if groups is not last[0] or len(groups) != last[1]:
        return False
    for i, group in enumerate(groups):
        j = 2 + 4 * i
        if group is not last[j] or tuple(group) != last[j + 1] or not all(map(operator.is_, group.values(),
                                                                                 last[j + 2])):
            return False
        params = group.get("params")
        if (len(params) if isinstance(params, list) else -1) != last[j + 3]:
            return False
    return True


def _where(index, group):
    rule = group.get("rule")
    return f"param group {index}" if rule is None else f"rule {rule!r}"


def _structure(name, tensor, group_dim, group_size):
    """``(dim, size)`` of a parameter's group term."""
    if group_dim is None:
        return WHOLE, 1
    if tensor.ndim < 2:
        return NO_GROUPS, 1
    if tensor.shape[group_dim] % group_size:
        raise ValueError(f"fastreg: parameter {name!r} has {tensor.shape[group_dim]} "
                         f"{'rows' if group_dim == 0 else 'columns'}, which group_size={group_size} does not divide")
    return group_dim, group_size


def structure_text(m, couplings, constrained=False):
    """What ``explain()`` shows of a parameter's groups (its shape as it is now); a constrained
    parameter without groups is constrained as one whole group."""
    if m.coupling is not None:
        c = couplings[m.coupling]
        return f"coupled #{m.coupling} ({c.length} groups along dim {m.structure[0]})"
    dim, size = m.constraint_structure if constrained and m.structure[0] == NO_GROUPS else m.structure
    if dim == NO_GROUPS:
        return "none (ndim < 2)"
    if dim == WHOLE:
        return "1 (whole tensor)"
    word = "rows" if dim == 0 else "columns"
    count = m.tensor.shape[dim] // size
    return f"{count} ({word})" if size == 1 else f"{count} (blocks of {size} {word})"


def _couplings(coupled, members):
    """``[Coupling]`` from ``coupled=[[(name, dim), ...], ...]``; marks each member's coupling and
    gives it the structure ``(dim, 1)``."""
    if coupled is None:
        return []
    by_name, ambiguous = {}, set()
    for m in members:
        if m.name in by_name:
            ambiguous.add(m.name)
        by_name[m.name] = m
    couplings = []
    if not isinstance(coupled, (list, tuple)):
        raise TypeError("fastreg: coupled must be a list of couplings, each a list of (parameter name, dim) pairs")
    for index, slices in enumerate(coupled):
        if (not isinstance(slices, (list, tuple)) or not slices
                or not all(isinstance(s, (list, tuple)) and len(s) == 2 and isinstance(s[0], str) for s in slices)):
            raise TypeError(f"fastreg: coupled[{index}] must be a non-empty list of (parameter name, dim) pairs, got "
                            f"{slices!r} (coupled is a list of such lists)")
        length = None
        for name, dim in slices:
            if name in ambiguous:
                raise ValueError(f"fastreg: coupled[{index}] names {name!r}, which several param groups hold (a "
                                 "param group names its parameters relative to its own params); pass (name, "
                                 "tensor) pairs with unique names in the param groups")
            m = by_name.get(name)
            if m is None:
                raise ValueError(f"fastreg: coupled[{index}] names {name!r}, which is not a regularized parameter "
                                 f"of this penalty")
            if _dtensor.is_sharded(m.tensor):
                raise NotImplementedError(f"fastreg: parameter {name!r} is sharded; couplings of sharded parameters "
                                          "are not supported")
            if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < m.tensor.ndim:
                raise ValueError(f"fastreg: coupled[{index}] slices {name!r} along dim {dim!r}; it has "
                                 f"{m.tensor.ndim} dims")
            if m.coupling is not None:
                raise ValueError(f"fastreg: parameter {name!r} is in coupled[{m.coupling}] and coupled[{index}]; "
                                 "groups that overlap have no closed-form proximal step, so a parameter "
                                 "belongs to one coupling")
            n = m.tensor.shape[dim]
            if length is not None and n != length:
                raise ValueError(f"fastreg: coupled[{index}] couples slices of unequal counts: {name!r} has {n} "
                                 f"along dim {dim}, the first {length}")
            length = n
            m.coupling, m.structure = index, (dim, 1)
            m.constraint_structure = m.structure
        coupling = Coupling(list(slices), length, by_name[slices[0][0]].group,
                            [by_name[name].group for name, _ in slices])
        for name, _ in slices:
            by_name[name].coupling_group = coupling.group
        couplings.append(coupling)
    return couplings


def _check_coupling(index, coupling, coefficients, param_groups):
    """The slices of a coupling share one group norm: its exact proximal step needs them to share
    l2 (the denominator) and the norm bounds too (l1 and nonneg may differ: they act per element)."""
    first = coefficients[coupling.slice_groups[0]]
    for g in coupling.slice_groups[1:]:
        c = coefficients[g]
        same_l2 = c.l2 is first.l2 or (not isinstance(c.l2, torch.Tensor) and not isinstance(first.l2, torch.Tensor)
                                        and c.l2 == first.l2)
        if not same_l2 or (c.min_norm, c.max_norm) != (first.min_norm, first.max_norm):
            one = _where(coupling.slice_groups[0], param_groups[coupling.slice_groups[0]])
            other = _where(g, param_groups[g])
            raise ValueError(f"fastreg: coupled[{index}] joins parameters of {one} and {other}, whose l2 or norm "
                             "constraints differ; a group's proximal step is exact only with one l2 and one norm "
                             "bound for all its slices")


def _active_groups(kg, group_on, constrained, coupling_on):
    dims, sizes = [], []
    for m in kg.members:
        if m.coupling is not None:
            active = coupling_on[m.coupling] or constrained[m.group]
            structure = m.structure
        elif m.structure[0] != NO_GROUPS and group_on[m.group]:
            active, structure = True, m.structure
        else:
            active, structure = constrained[m.group], m.constraint_structure
        dim, size = structure if active else (NO_GROUPS, 1)
        dims.append(dim)
        sizes.append(size)
    return Groups(tuple(dims), tuple(sizes))


def _class_index(kg):
    """The row of each tensor's class in the class table, on the device (None with one class)."""
    if len(kg.classes) <= 1:
        return None
    index = [i for i, (_, start, end) in enumerate(kg.classes) for _ in range(start, end)]
    return torch.tensor(index, device=kg.device)


def _class_row(coefficients, cls, op, lr, kg, dtype=None):
    """One class's coefficient vector: its param group's, with the group term of its coupling's
    param group for coupled slices, and off where its own group term does not count."""
    group, counts, coupling_group = cls
    own = coefficients[group]
    if coupling_group >= 0:
        coefficients = own._replace(group=coefficients[coupling_group].group)
    elif not counts:
        coefficients = own._replace(group=0.0)
    else:
        coefficients = own
    if op == PROX:
        return coefficients.prox_vector(lr, dtype or kg.acc_dtype, kg.device)
    return coefficients.gradient_vector(dtype or kg.acc_dtype, kg.device)


def _table(rows, index, count):
    if index is None:
        return rows[0].expand(count, rows[0].numel()) if rows else None
    return torch.stack(rows)[index]


def _kernel_groups(members):
    local, meshes = {}, {}
    order = sorted(range(len(members)), key=lambda i: members[i].cls)  # each class one slice of rows
    for i in order:
        m = members[i]
        t, center = m.tensor, m.center
        if _dtensor.is_sharded(t):
            # A tensor without groups may still be constrained (as one whole group) in prox_.
            dim, size = m.structure if m.structure[0] != NO_GROUPS else m.constraint_structure
            _dtensor.check_placements(m.name, t, dim, size)
            key = (t.device, t.dtype, center is not None, _dtensor.is_counted(t), _dtensor.groups_span_ranks(t, dim))
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
        group.names.append(m.name)
        group.tensors.append(t)
        group.members.append(m)
        if center is not None:
            group.centers.append(center)
    groups = list(local.values()) + [g for part in meshes.values() for g in part.values()]
    for kg in groups:
        for row, m in enumerate(kg.members):
            if kg.classes and kg.classes[-1][0] == m.cls:
                kg.classes[-1] = (m.cls, kg.classes[-1][1], row + 1)
            else:
                kg.classes.append((m.cls, row, row + 1))
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


def _is_sequence(center):
    return center is not None and not isinstance(center, (str, Mapping, torch.Tensor)) and (
        isinstance(center, Sequence) or hasattr(center, "__iter__"))


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

