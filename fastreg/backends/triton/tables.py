"""The device tables of a call: what the kernels read about its tensors, and who owns them.

A call's ``_Tables`` (``_build_tables``) is one int64 device tensor holding, for the tensors of
one (device, dtype) group: the pointer tables of ``w`` and ``c`` (one data pointer per tensor;
the kernels cast them to the dtype); the per-tensor geometry (``TENSOR_FIELDS`` a tensor, from
its own structure: ``_geometry.memory_geometry(w, dims[i], sizes[i])``, with its index in the
call, the row of the coefficient tables its programs read); for each launch, one row per
program (its tensor, its range, its partials' slot); the rows ``_group_sq_kernel`` reads; one
row per param for ``_finish_kernel`` (its first partial pair and their count: a tensor's
programs are consecutive rows of one launch; its first group-vector entry and their count);
and the group -> param index (``group_owner``, ``_geometry.group_owners``) by which the
launchers give each group its own tensor's coefficients, with the param -> row of the geometry
(``tensor_of``, -1 for an empty param) by which the metric step's programs find a group's
tensor. There is no limit on tensors per launch; one launch (``_Launch``) per mode
(``kernels.MODE_*``, chosen per tensor), tile and alignment present in the call. The write
targets get a pointer table per call (``_Targets``, ``_targets_of``), and so do the metric
tensors of the step in a metric (``_metric_of``).

* **Chunk per launch.** ``chunk`` is the smallest power of two (between ``BLOCK`` and
  ``MAX_CHUNK``) that cuts the call into at most ``TARGET_PROGRAMS`` programs: a 2M-parameter
  model gets 512 programs of 4096 elements instead of 32 of 65536, so a 132-SM GPU is full. It
  is a function of the tensor sizes only, so the results stay bitwise deterministic.
* **Alignment per tensor.** A tensor whose operands all start on 16 bytes (and, with groups,
  whose rows keep that alignment) goes into the ``ALIGNED`` launch, with
  ``tl.multiple_of`` hints: 128-bit loads. One odd tensor no longer turns them off for all.
* **Ownership** (the rules are stated once, in ``fastreg/backends/_workspace.py``). A call's
  ``_Tables`` (the tensors' pointers, geometry and programs: a host loop plus one host-to-device
  copy to build) hold in ``owners`` every tensor whose address they contain: detached aliases of
  the parameters as read (a later ``p.data = ...`` cannot free what they point at), the
  centers, and every copy made for the kernels; ``addresses()`` lists those addresses. No
  module of the backend keeps a tensor or a table. Tables are cached only in the ``workspace``
  the caller passes (each kernel group of a ``Penalty`` owns one: a small LRU that dies with
  it), keyed by the operands' pointers, shapes and strides, the structures (the ``Groups``: every
  tensor's dim and block size), the tuning constants and the current stream; while an entry
  holds the storages its key's addresses cannot be given to other tensors. Keying by stream
  orders a table's upload before every use. Without a workspace the tables live for the call.
  Tables that read copies (non-dense parameters, centers in another memory order) are never
  cached: the copies are made for each call and live as long as its tables; in-place results on
  a copy are copied back explicitly. The write targets (gradients, outputs: new pointers every
  step) get a ``_Targets`` table per call, owned by the call (or the addresses-only copy of the
  last one kept on the tables, when the targets are where it points: ``_targets_of``); so do the
  metric tensors of a
  step in a metric (detached aliases of the optimizer's state, or copies in the parameters'
  order, read only). The placeholder (an operand a
  specialization does not read) and the device copy of the slots' defaults (which complete a
  short coefficient vector) are owned by the tables; coefficient tables are the caller's (or a
  contiguous copy per call); a float ``shrink`` becomes a prox table per call (a zero fill and a
  column fill: no host-to-device copy, nothing kept). On CUDA, tables are uploaded from pinned
  memory with a non_blocking copy (the caching host allocator keeps the pinned block until the
  copy has run), and a table freed after the call is reused only by later work on the stream.
* **CUDA-graph capture.** A captured upload happens only when the graph replays, and the graph
  reads its tables at every replay: tables built during capture go to ``workspace.captured``
  (kept as long as the workspace, hence as long as the ``Penalty`` whose graphs replay them),
  never into the entries eager calls look in; cached tables used during capture and the
  per-call target tables are kept there too. Without a workspace a call under capture raises
  (nothing could keep its tables alive): call through a ``Penalty``, or pass a ``Workspace``.
* **Layouts.** Kernels walk memory linearly. A tensor that is dense (contiguous in some
  dimension order, e.g. ``w.t()`` or channels_last) is used as is, its groups located from its
  strides; centers, gradients and metric tensors in another order, and non-dense tensors, are
  read through a copy in the parameter's order.
* **Host time per call** (what a call costs the training loop's thread while the GPU works;
  ``python -m bench.host_overhead`` measures it with the kernels stubbed). A cache hit checks
  that each param (and center) has the pointer, shape and strides the tables were built from:
  where the cpu backend's C++ extension is built, in one C++ call over the tensors the tables
  hold (``cpu.memory_watch``, ~5 ns a tensor; the call passes the very lists, or lists of the
  same tensors, compared by id), else with three C-level maps in Python (~0.2 µs a tensor);
  nothing proportional to the call is hashed but the structures (~3 ns a tensor).
  ``add_grad_`` and ``grads`` also read their targets' pointers; a targets table that needed no
  copy is kept on the tables, holding addresses only, and reused when the targets have the same
  pointers and strides (``_targets_of``: p.grad may be a new tensor every step, often at the
  same address), else built (an ``array`` of the pointers and one upload). ``add_grad_``'s
  targets, once the same tensors come twice in a row, are checked in C++ too, through weak
  references (``target_layout``). ``grads`` must return one fresh tensor per parameter: its
  ``empty_like`` calls (~0.8 µs a tensor on this host) are most of its time. Measured here (2
  cores, medians, 200 -> 2,000 tensors, ``python -m bench.host_overhead``): ~0.02-0.03 µs a
  tensor for ``sums`` and ``prox_``, ~0.12 for ``add_grad_``, ~1.1 for ``grads``.
"""

import array
import itertools

import torch

from fastreg.backends._geometry import NO_GROUPS, acc_dtype, as_groups, group_owners, group_sizes, memory_geometry
from fastreg.backends import _terms, cpu
from fastreg.backends._workspace import may_hold_tensors
from fastreg.backends._terms import Gradient, Prox

from . import tuning
from .kernels import MODE_FLAT, MODE_ROWS, MODE_RUNS

TENSOR_FIELDS = 7  # per tensor: (numel, G, K, L = G*K, group base, runs = numel / K, index in the call)
INT32_MAX = 2**31 - 1  # group indices are computed in int32 (int64 division is a slow subroutine call)


class _Launch:
    """One kernel launch: a mode, a tile width, an alignment, its programs' table rows."""

    __slots__ = ("mode", "run_tile", "aligned", "meta", "programs", "partial_base")

    def __init__(self, mode, run_tile, aligned, meta, programs, partial_base):
        self.mode, self.run_tile, self.aligned = mode, run_tile, aligned
        self.meta, self.programs, self.partial_base = meta, programs, partial_base


class _Tables:
    """Everything the kernels need about a set of tensors: one int64 device tensor holding the
    pointer tables of w and c, the per-tensor geometry, the per-program rows of every launch
    and the group-reduction rows; the launches and buffer sizes; and, in ``owners``, every
    tensor whose address the tables hold (see "Ownership")."""

    __slots__ = ("data", "host", "pointers", "owners", "zero", "defaults", "defaults_host", "w_ptrs", "c_ptrs",
                 "info", "launches", "ginfo", "gmap", "finfo", "group_owner", "group_programs", "programs", "nslots",
                 "ngroups", "ntensors", "chunk", "grouped", "has_center", "dtype", "device", "direct", "reads",
                 "copies", "index", "tensor_of", "misaligned", "params_at", "centers_at", "aligned_for",
                 "targets_cache", "watch", "watched_ids", "watched_lists")

    def addresses(self):
        """Every device address written into the tables (w's and c's data pointers); each lies
        in the storage of one of ``owners``."""
        return list(self.pointers)


class _Targets:
    """One call's table of write-target pointers (gradients, outputs, or copies of them in the
    order their parameters are read), with the tensors it points into."""

    __slots__ = ("table", "host", "pointers", "owners")

    def addresses(self):
        return list(self.pointers)


def _stream_key(device):
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _upload(values, device):
    """``(device tensor, host tensor)`` holding ``values`` (a CPU int64 tensor), without a host
    sync. A pageable host-to-device copy synchronises the stream; a pinned non_blocking one does
    not, and the CUDA caching host allocator keeps the pinned block until that copy has run. A
    copy captured in a CUDA graph rereads the pinned block at every replay: whoever keeps the
    device table for the graph keeps the host tensor too."""
    if device.type != "cuda":
        return values, values
    host = values.pin_memory()
    return host.to(device, non_blocking=True), host


def _no_workspace_under_capture():
    return RuntimeError(
        "fastreg: the triton backend was called without a workspace while a CUDA graph was being captured. "
        "The device tables such a call builds are read when the graph replays, so they must outlive the call, "
        "and only a Workspace can keep them: call it through a fastreg.Penalty (each of its kernel groups owns "
        "one), or pass workspace=fastreg.backends._workspace.Workspace() and keep it as long as the graph.")


def _keep_for_graph(workspace, item):
    """Keep cached tables used during a capture for as long as the workspace: the graph reads
    them at every replay, even after the LRU has dropped them."""
    if not any(kept is item for kept in workspace.captured):
        workspace.captured.append(item)


def _chunk(total, block):
    """The program size for a call of ``total`` elements: see "Chunk per launch"."""
    want = max(1, -(-total // tuning.TARGET_PROGRAMS))
    chunk = 1 << (want - 1).bit_length()
    return max(block, min(tuning.MAX_CHUNK, chunk))


def _is_dense(t):
    """True when ``t``'s elements fill ``t.numel()`` consecutive slots from ``t.data_ptr()``."""
    if t.is_contiguous():
        return True
    order = sorted(range(t.ndim), key=lambda d: t.stride(d), reverse=True)
    return t.permute(order).is_contiguous()


def _same_order(a, b):
    """Two dense tensors of one shape map every index to the same memory offset."""
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def _signature(tensors):
    """What tables depend on: every data pointer, shape and stride (three C-level maps, ~0.2 µs a
    tensor; compared, never hashed). Every stride, not only those of tensors with groups: a
    tensor read as one flat run depends on being dense, and a non-dense view at the same address
    and shape (``w.data = base[:, :4]`` after ``base.view(-1)[:16].view(4, 4)``) must not find the
    dense one's tables."""
    return (list(map(torch.Tensor.data_ptr, tensors)), list(map(torch.Tensor.size, tensors)),
            list(map(torch.Tensor.stride, tensors)))


def _tables(params, centers, groups, workspace, capturing, target_ptrs=None):
    """The tables for ``params`` (and ``centers``) with the structures ``groups`` (a ``Groups``,
    or one group_dim for every tensor): from ``workspace`` when they are still valid, else built
    (and cached there when they read no copy). ``target_ptrs``: the data pointers of the call's
    write targets (``grads``, ``add_grad_``), whose alignment the launches depend on.

    A cached entry is found by its key: the setting (device, dtype, stream, tuning constants),
    the structures (``groups``: hashing it is ~3 ns a tensor), whether there are centers, the
    tensor count and the first data pointer; no pointer, shape or stride list is hashed. It is
    used as is only when (see "Host time per call"):

    1. every param and center has the data pointer, shape and strides the tables were built
       from (``p.data = ...``, a resize, another view of the same memory all fail it): the
       tables' C++ watch of the tensors they were built from (``cpu.memory_watch``), when the
       call passes those very list objects (a kernel group's, never modified) or lists of the
       same tensors (ids); without the extension, ``_signature`` compared element by element;
    2. the write targets' alignment is the one the launches assume: the same target pointers
       as the last call that checked it, or the same misaligned set (computed only when they
       moved); a call without targets uses only tables built with every target aligned.

    Else it is rebuilt, under the same key. See "Ownership"."""
    if workspace is None:
        if capturing:
            raise _no_workspace_under_capture()
        groups = as_groups(params, groups)
        return _build_tables(params, centers, groups, () if target_ptrs is None else _misaligned(target_ptrs))
    device, dtype = params[0].device, params[0].dtype
    setting = (device, dtype, _stream_key(device), tuning.BLOCK, tuning.BLOCK_FP64, tuning.MAX_CHUNK,
               tuning.TARGET_PROGRAMS, tuning.RUN_TILE, tuning.MIN_RUN, tuning.RUN_LONG, tuning.GROUP_BLOCK,
               tuning.ALIGN_BYTES)
    key = (*setting, groups, centers is None, len(params), params[0].data_ptr())

    def still_valid(tables):
        if tables.watch is not None and not may_hold_tensors():
            tables.watch = None  # (released: torch.utils.swap_tensors refuses held tensors)
        if tables.watch is not None and (
                (params is tables.watched_lists[0] and centers is tables.watched_lists[1])
                or list(map(id, _params_and_centers(params, centers))) == tables.watched_ids):
            # The very tensors the tables were built from: the same list objects (a kernel
            # group's, never modified: the workspace contract, backends/__init__.py) or lists of
            # the same tensors (their ids: the watch holds them, so no id is reused); at the
            # same pointers, shapes and strides: one C++ call over the tensors it holds.
            if tables.watch():
                return False
        elif not (tables.params_at == _signature(params)
                  and tables.centers_at == (None if centers is None else _signature(centers))):
            return False  # (other tensors, e.g. a DTensor's fresh local views: compared in Python)
        if target_ptrs is None:
            return not tables.misaligned
        if target_ptrs is tables.aligned_for:
            return True
        if target_ptrs == tables.aligned_for:
            tables.aligned_for = target_ptrs  # (the next call with these very pointers: no compare)
            return True
        if _misaligned(target_ptrs) != tables.misaligned:
            return False
        tables.aligned_for = target_ptrs  # the next call at these pointers skips the check
        return True

    tables = workspace.get(key, still_valid)
    if tables is not None:
        if capturing:
            _keep_for_graph(workspace, tables)
        return tables
    misaligned = () if target_ptrs is None else _misaligned(target_ptrs)
    tables = _build_tables(params, centers, as_groups(params, groups), misaligned)
    params_at, centers_at = _signature(params), None if centers is None else _signature(centers)
    tables.params_at, tables.centers_at = params_at, centers_at
    tables.aligned_for = target_ptrs
    if capturing:  # uploaded only when the graph replays: never where an eager call looks
        workspace.keep_for_capture(tables)
    elif tables.direct:  # tables reading copies are valid for this call only
        # The same setting and shapes at other addresses (p.data swapped) replace the old tables,
        # so a swapped-out storage lives no longer than the next build (hashed on a build only).
        family = (*setting, groups, misaligned, tuple(params_at[1]), tuple(map(tuple, params_at[2])),
                  None if centers_at is None else (tuple(centers_at[1]), tuple(map(tuple, centers_at[2]))))
        operands = _params_and_centers(params, centers)
        tables.watch = cpu.memory_watch(operands)  # (None without the C++ extension: _signature then)
        tables.watched_ids, tables.watched_lists = list(map(id, operands)), (params, centers)
        workspace.put(key, tables, family=family)
    return tables


def _params_and_centers(params, centers):
    return list(params) if centers is None else [*params, *centers]


def _build_tables(params, centers, groups, misaligned):
    dtype, device = params[0].dtype, params[0].device
    block = tuning.block(dtype)
    sizes = group_sizes(params, groups)
    group_bases = list(itertools.accumulate(sizes, initial=0))  # each param's first group-vector entry
    records, direct = [], True
    for i, p in enumerate(params):
        if not p.numel():
            continue
        # Owned by the tables: a detached alias of the parameter (its storage stays valid even if
        # the user swaps p.data), or the copy the kernels read instead.
        alias = p.detach()
        w = alias if _is_dense(p) else alias.contiguous()
        c = None
        if centers is not None:
            c = centers[i].detach()
            if not (_is_dense(c) and _same_order(c, w)):
                c = torch.empty_like(w).copy_(c)  # in w's memory order
                direct = False
        direct = direct and w is alias
        dim = groups.dims[i]
        grouped = dim != NO_GROUPS
        A, G, K = memory_geometry(w, dim, groups.sizes[i]) if grouped else (1, 1, p.numel())
        mode = MODE_FLAT if not grouped else (MODE_RUNS if K >= tuning.MIN_RUN or G == 1 else MODE_ROWS)
        run_tile = block if K >= tuning.RUN_LONG * block else min(tuning.RUN_TILE, block)
        operands = (w,) if c is None else (w, c)
        aligned = i not in misaligned and _aligned(operands, mode, (A, G, K))
        records.append((i, p, w, c, mode, run_tile, (A, G, K), group_bases[i], aligned, w is alias))

    total = sum(r[1].numel() for r in records)
    chunk = _chunk(total, block)
    tensors, by_launch, ginfo, gmap, nslots, programs_of = [], {}, [], [], 0, {}
    for t, (i, p, _, _, mode, run_tile, (A, G, K), group_base, aligned, _) in enumerate(records):
        numel, L = p.numel(), G * K
        if mode != MODE_FLAT and max(A * G, L) > INT32_MAX:
            raise NotImplementedError(f"fastreg triton backend: a tensor of shape {tuple(p.shape)} has more than 2**31 "
                                      "runs or a row longer than 2**31 elements along its group dimension")
        tensors += [numel, G, K, L, group_base, A * G, i]
        launch_key = (mode, run_tile if mode == MODE_RUNS else 0, aligned)
        rows = by_launch.setdefault(launch_key, [])
        first, slot_base = len(rows), nslots
        if mode == MODE_FLAT:
            rows += [(t, start, 0, 0, 0) for start in range(0, numel, chunk)]
        elif mode == MODE_RUNS:
            runs, per_tile = A * G, block // run_tile
            k_chunk = min(-(-K // run_tile) * run_tile, chunk)
            k_pieces = -(-K // k_chunk)
            for piece in range(k_pieces):
                k0 = piece * k_chunk
                rows += [(t, r0, k0, min(K, k0 + k_chunk), slot_base + piece * runs + r0)
                         for r0 in range(0, runs, per_tile)]
            nslots += k_pieces * runs
            ginfo.append((slot_base, k_pieces * A, G, 1, 1, G, group_base))
        else:
            per = max(1, chunk // block)
            row_blocks = -(-A // per)
            rows += [(t, rb * per, min(A, (rb + 1) * per), p0, slot_base + rb * L + p0)
                     for rb in range(row_blocks) for p0 in range(0, L, block)]
            nslots += row_blocks * L
            ginfo.append((slot_base, row_blocks, L, K, K, G, group_base))
        if mode != MODE_FLAT:
            gmap += [(len(ginfo) - 1, b) for b in range(-(-G // tuning.GROUP_BLOCK))]
        programs_of[i] = (launch_key, first, len(rows) - first)  # its launch's rows first, first + 1, ...

    ntensors = len(records)
    w_ptrs = [r[2].data_ptr() for r in records]
    c_ptrs = [(r[3] if r[3] is not None else r[2]).data_ptr() for r in records]
    values = w_ptrs + c_ptrs + tensors
    launches, partial_base, bases = [], 0, {}
    for key, rows in sorted(by_launch.items()):
        start = len(values)
        values += [v for row in rows for v in row]
        launches.append(_Launch(*key, (start, len(values)), len(rows), partial_base))
        bases[key] = partial_base
        partial_base += len(rows)
    ginfo_start = len(values)
    values += [v for row in ginfo for v in row]
    gmap_start = len(values)
    values += [v for row in gmap for v in row]
    finfo_start = len(values)
    for i, n in enumerate(sizes):  # every param, empty ones too (no pairs: zero sums)
        key, first, count = programs_of.get(i, (None, 0, 0))
        values += [bases[key] + first if count else 0, count, group_bases[i], n]
    tensor_of_start = len(values)
    rows = {r[0]: t for t, r in enumerate(records)}
    values += [rows.get(i, -1) for i in range(len(params))]  # every param's row of the geometry
    owner_start = len(values)

    tables = _Tables()
    # The group -> param index (the rows of the coefficient tables the per-group coefficients use).
    owners = group_owners(sizes, "cpu")
    tables.data, tables.host = _upload(torch.cat([torch.tensor(values, dtype=torch.int64), owners]), device)
    tables.pointers = w_ptrs + c_ptrs
    tables.owners = [r[2] for r in records] + [r[3] for r in records if r[3] is not None]
    tables.zero = torch.zeros(1, dtype=acc_dtype(dtype), device=device)  # unused shrink / group_coef
    # Every slot's default (_terms.DEFAULTS), uploaded with the tables: a short coefficient vector
    # is completed from them on the device (a per-call torch.tensor would be a synchronising copy,
    # and a captured one would be refused).
    defaults = torch.tensor([*_terms.DEFAULTS[Gradient], *_terms.DEFAULTS[Prox]], dtype=acc_dtype(dtype))
    uploaded, tables.defaults_host = _upload(defaults, device)
    tables.defaults = {Gradient: uploaded[:len(Gradient)], Prox: uploaded[len(Gradient):]}
    tables.w_ptrs = tables.data[:ntensors]
    tables.c_ptrs = tables.data[ntensors:2 * ntensors]
    tables.info = tables.data[2 * ntensors:2 * ntensors + TENSOR_FIELDS * ntensors]
    for launch in launches:
        launch.meta = tables.data[launch.meta[0]:launch.meta[1]]
    tables.launches = launches
    tables.ginfo = tables.data[ginfo_start:gmap_start]
    tables.gmap = tables.data[gmap_start:finfo_start]
    tables.finfo = tables.data[finfo_start:tensor_of_start]
    tables.tensor_of = tables.data[tensor_of_start:owner_start]
    tables.group_owner = tables.data[owner_start:]
    tables.group_programs = len(gmap)
    tables.programs, tables.nslots, tables.chunk = partial_base, nslots, chunk
    tables.ngroups, tables.ntensors = group_bases[-1], len(params)
    tables.grouped = tables.ngroups > 0
    tables.has_center = centers is not None
    tables.dtype, tables.device, tables.direct = dtype, device, direct
    tables.index = [r[0] for r in records]  # record -> param index
    tables.reads = [None if r[9] else r[2] for r in records]  # None: the param itself, else its copy
    tables.copies = [(params[r[0]], r[2]) for r in records if not r[9]]
    tables.misaligned = misaligned
    tables.params_at = tables.centers_at = tables.aligned_for = tables.targets_cache = None
    tables.watch = tables.watched_ids = tables.watched_lists = None
    return tables


def _aligned(operands, mode, geometry):
    if not all(o.data_ptr() % tuning.ALIGN_BYTES == 0 for o in operands):
        return False
    if mode == MODE_FLAT:
        return True
    stride = geometry[2] if mode == MODE_RUNS else geometry[1] * geometry[2]
    return all(stride % tuning.vector(o.dtype) == 0 for o in operands)


def _in_order(tensor, read):
    """``tensor`` (of ``read``'s shape), or a copy of it, walking memory in ``read``'s order."""
    if (tensor.is_contiguous() and read.is_contiguous()) or (_is_dense(tensor) and _same_order(tensor, read)):
        return tensor
    return torch.empty_like(read, dtype=tensor.dtype).copy_(tensor)


def _pointer_table(plan, pointers, owners, workspace, capturing):
    """A per-call ``_Targets`` holding ``pointers`` and the tensors they point into."""
    targets = _Targets()
    targets.pointers = pointers
    targets.owners = owners
    targets.table, targets.host = _upload(_int64(pointers), plan.device)
    if capturing:  # the graph rereads the pinned table at every replay (a workspace exists: _tables)
        workspace.captured.append(targets)
    return targets


def _int64(values):
    """A CPU int64 tensor of ``values`` (Python ints): through an ``array``, half the time of
    ``torch.tensor`` on a list of thousands."""
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array.array("q", values), dtype=torch.int64).clone()


class _LastTargets:
    """A workspace's record of its last call's write targets (``target_layout``): their ids, data
    pointers and strides, and a C++ check of them through weak references."""

    __slots__ = ("ids", "pointers", "strides", "watch")


def target_layout(targets, workspace, capturing):
    """``(data pointers, strides)`` of a call's write targets (``add_grad_``'s gradients): the last
    call's, read no further, when these are the very same tensors (their ids) still at the same
    pointers and strides (one C++ call through weak references: an old gradient is not kept
    alive, and one that is gone counts as changed; a live tensor's id is not reused, since a
    tensor whose Python object is gone but whose memory lives on keeps that object), else read
    and recorded in the ``workspace``. Strides None: not read (no workspace, or capture)."""
    if workspace is None or capturing:
        return list(map(torch.Tensor.data_ptr, targets)), None
    if not may_hold_tensors():
        workspace.targets = None  # (no watch held: torch.utils.swap_tensors refuses watched tensors)
        return list(map(torch.Tensor.data_ptr, targets)), None
    ids = list(map(id, targets))
    last = workspace.targets
    same = last is not None and last.ids == ids
    if same and last.watch is not None and not last.watch():
        return last.pointers, last.strides
    record = _LastTargets()
    record.ids, record.pointers = ids, list(map(torch.Tensor.data_ptr, targets))
    record.strides = list(map(torch.Tensor.stride, targets))
    # Watched once the same tensors came twice in a row (gradients kept between steps): fresh
    # gradients every step (zero_grad(set_to_none=True)) would only pay for watches never used.
    record.watch = cpu.targets_watch(targets) if same else None
    workspace.targets = record
    return record.pointers, record.strides


def _targets_of(plan, params, wanted, pointers, workspace, capturing, like_params=False, strides=None):
    """(this call's ``_Targets``, copy-backs): ``wanted[k]`` for param k (its data pointer
    ``pointers[k]``), used as is when it walks memory in the order param k is read (the param as
    it is now, or the tables' copy of it), else through a copy in that order.

    The device table of targets that needed no copy is kept on the tables (``targets_cache``:
    the addresses, the targets' strides, the device and host tensors; no target tensor, so old
    gradients are not kept alive) and reused, outside CUDA-graph capture and with a workspace,
    by a call whose targets have the same data pointers and strides: its addresses are then
    those of that call's live targets, laid out as when it was built (the params' layouts are
    the tables', just checked by ``_tables``), i.e. the table that call would build.

    ``like_params``: ``wanted[k]`` is ``torch.empty_like(params[k])`` (``grads``' fresh outputs).
    When the tables read every param as is (``direct``: all dense), each output has its param's
    strides (``empty_like`` keeps a dense tensor's), so it is read as is: no per-tensor check."""
    reusable = workspace is not None and not capturing
    cached = plan.targets_cache
    if reusable and cached is not None and (cached[0] is pointers or cached[0] == pointers):
        if strides is None:
            strides = list(map(torch.Tensor.stride, wanted))
        if cached[1] is strides or cached[1] == strides:
            plan.targets_cache = (pointers, strides, cached[2])  # (the next call: these very lists, no compare)
            return cached[2], ()
    if like_params and plan.direct:
        table = pointers if len(plan.index) == len(pointers) else [pointers[k] for k in plan.index]
        return _pointer_table(plan, table, list(wanted), workspace, capturing), ()
    table, copy_back = [], []
    for k, read in zip(plan.index, plan.reads):
        target = wanted[k]
        if read is None:
            read = params[k]
        if target.is_contiguous() and read.is_contiguous():  # the common, cheap case
            table.append(pointers[k])
            continue
        work = _in_order(target, read)
        if work is not target:
            copy_back.append((target, work))
        table.append(work.data_ptr())
    owners = list(wanted) + [work for _, work in copy_back]
    targets = _pointer_table(plan, table, owners, workspace, capturing)
    if reusable and not copy_back:
        kept = _Targets()
        kept.pointers, kept.owners, kept.table, kept.host = pointers, [], targets.table, targets.host
        plan.targets_cache = (pointers, strides if strides is not None else list(map(torch.Tensor.stride, wanted)),
                              kept)
    return targets, copy_back


def _metric_of(plan, params, metric, workspace, capturing):
    """(this call's ``_Targets`` of the metric tensors: ``v`` of every tensor of the plan, then
    ``m``, each in the memory order its param is read; their dtype; whether they all start on 16
    bytes). A param's own ``v`` (``IDENTITY``: never read) and a missing ``m`` take the address
    the kernels read ``w`` at (they never load from there), and keep what is read there too."""
    own = [v is p for v, p in zip(metric.v, params)]
    dtype = next((v.dtype for v, mine in zip(metric.v, own) if not mine), plan.dtype)
    v_ptrs, m_ptrs, owners = [], [], []
    aligned = True
    for t, (k, read) in enumerate(zip(plan.index, plan.reads)):
        read = params[k] if read is None else read
        for values, table in ((None if own[k] else metric.v[k], v_ptrs), (metric.centered[k], m_ptrs)):
            if values is None:
                table.append(plan.pointers[t])
                owners.append(plan.owners[t])  # (the tables' alias of the param, or their copy)
                continue
            values = _in_order(values.detach(), read)  # read only: a copy is not copied back
            owners.append(values)
            table.append(values.data_ptr())
            aligned = aligned and table[-1] % tuning.ALIGN_BYTES == 0
    return _pointer_table(plan, v_ptrs + m_ptrs, owners, workspace, capturing), dtype, aligned


def _misaligned(pointers):
    """Indices of the write targets that do not start on 16 bytes (their tensors' launches
    cannot use vector stores)."""
    return tuple(i for i, p in enumerate(pointers) if p % tuning.ALIGN_BYTES)
