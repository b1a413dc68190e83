"""Who owns the memory the Triton backend's tables point at (the rules: fastreg/backends/_workspace.py).

Run under the interpreter, on CPU tensors (see conftest.py)::

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpret/test_triton_ownership.py

Two checks, independent of each other:

* ``live_operands``: at every kernel launch, every address in the launch's pointer tables (w, c
  and the write targets) lies, with the whole extent the kernel walks, inside the storage of a
  tensor that is alive (a Python tensor object found by ``gc``) and has the operand's dtype. It
  knows nothing of the backend's bookkeeping, so it also covers tables that are never cached.
* ``assert_owned``: after a call, every address of every table the workspace holds lies inside
  the storage of a tensor that table itself keeps alive (``owners``).

Where only the host side is under test, the kernels are stubbed (``no_kernels``): the
interpreter takes tens of milliseconds a launch, and the values are the contract suite's job.
"""

import gc
import types

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from fastreg import _dispatch
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups
from fastreg.backends._terms import Metric, MetricOperand, MetricSlot
from fastreg.backends._workspace import Workspace

B = _dispatch.backend("triton")
kernels, tables = B.kernels, B.tables

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64


def randn(shape, dtype, seed, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)


def acc_of(dtype):
    return F64 if dtype == F64 else F32


def coeffs(dtype, *values):
    return torch.tensor(list(values) + [0.0] * (3 - len(values)), dtype=acc_of(dtype))


def _storage_range(t):
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _live_ranges():
    """``{dtype: storage ranges}`` of every live CPU tensor (the Python objects gc tracks)."""
    ranges = {}
    for t in [o for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]:
        if t.device.type == "cpu" and t.layout == torch.strided:  # (not the fake tensors of opcheck)
            ranges.setdefault(t.dtype, []).append(_storage_range(t))
    return ranges


def assert_owned(ws):
    """Every address of every table ``ws`` holds lies inside a tensor that table keeps alive."""
    tables = ws.plans()
    for table in tables:
        ranges = [_storage_range(o) for o in table.owners]
        starts = {o.data_ptr(): o for o in table.owners}
        for address in table.addresses():
            assert any(lo <= address < hi for lo, hi in ranges), (hex(address), type(table).__name__)
            owner = starts.get(address)  # the tensor the kernels read there, with its extent
            assert owner is not None and owner.data_ptr() + owner.numel() * owner.element_size() <= \
                _storage_range(owner)[1]
    return len(tables)


_TL = None


def _torch_dtype(tl_dtype):
    global _TL
    if _TL is None:
        _TL = {str(v): k for k, v in kernels._TL_DTYPES.items()}
    return _TL[str(tl_dtype)]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


KERNELS = ("_sums_kernel", "_group_sq_kernel", "_finish_kernel", "_elementwise_kernel", "_metric_prox_kernel")


@pytest.fixture
def no_kernels(monkeypatch):
    """Every kernel launch is a no-op (applied before ``live_operands`` wraps them)."""
    for name in KERNELS:
        monkeypatch.setattr(kernels, name, _NoLaunch())


class _Checked:
    """Wraps a kernel that reads pointer tables: checks them at every launch, then launches."""

    def __init__(self, kernel, tables, launches):
        self.kernel, self.tables, self.launches = kernel, tables, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            info = args[len(self.tables)]  # the per-tensor geometry follows the pointer tables
            numels = info.reshape(-1, tables.TENSOR_FIELDS)[:, 0].tolist()
            live = _live_ranges()
            for table, key in zip(args, self.tables):
                dtype = _torch_dtype(kwargs[key])
                size = torch.empty((), dtype=dtype).element_size()
                ranges = live.get(dtype, [])
                for address, numel in zip(table.tolist(), numels):
                    end = address + numel * size
                    assert any(lo <= address and end <= hi for lo, hi in ranges), (
                        f"launch reads/writes {hex(address)}..{hex(end)} ({dtype}), in no live tensor")
            self.launches.append(self.tables)
            return self.kernel[grid](*args, **kwargs)

        return launch


class _CheckedMetric:
    """Wraps ``_metric_prox_kernel``: at every launch, w and (where the metric table says they are
    read) v and m lie, with their extents, in live tensors of their dtypes; the v of an IDENTITY
    row and a missing m point at w (never read there)."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            w_ptrs, _, v_ptrs, m_ptrs, info, _, _, _, metric = args[:9]
            live = _live_ranges()
            rows = info.reshape(-1, tables.TENSOR_FIELDS)
            for t, (numel, param) in enumerate(zip(rows[:, 0].tolist(), rows[:, 6].tolist())):
                flags = metric[param]
                reads = [(w_ptrs[t], kwargs["DTYPE"], True),
                         (v_ptrs[t], kwargs["V_DTYPE"], flags[MetricSlot.IDENTITY] == 0),
                         (m_ptrs[t], kwargs["V_DTYPE"], flags[MetricSlot.CENTERED] != 0)]
                for address, tl_dtype, read in reads:
                    address = int(address)
                    if not read:
                        assert address == int(w_ptrs[t]), "an unread operand must point at w"
                        continue
                    dtype = _torch_dtype(tl_dtype)
                    end = address + numel * torch.empty((), dtype=dtype).element_size()
                    assert any(lo <= address and end <= hi for lo, hi in live.get(dtype, [])), (
                        f"the metric step reads {hex(address)}..{hex(end)} ({dtype}), in no live tensor")
            self.launches.append(kwargs["MODE"])
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def live_metric_operands(monkeypatch):
    """Checks every launch of the metric step against the live tensors; yields the launches made."""
    launches = []
    monkeypatch.setattr(kernels, "_metric_prox_kernel", _CheckedMetric(kernels._metric_prox_kernel, launches))
    yield launches


@pytest.fixture
def live_operands(monkeypatch):
    """Checks every launch's pointer tables against the live tensors; yields the launches made."""
    launches = []
    monkeypatch.setattr(kernels, "_sums_kernel", _Checked(kernels._sums_kernel, ("DTYPE", "DTYPE"), launches))
    monkeypatch.setattr(kernels, "_elementwise_kernel",
                        _Checked(kernels._elementwise_kernel, ("DTYPE", "DTYPE", "OUT_DTYPE"), launches))
    yield launches


# ------------------------------------------------------------------------ the invariant

def _layouts(dtype, seed):
    """Params of every mode and layout, with centers (same order, or another order: copied)."""
    params = [
        randn((6, 20), dtype, seed + 1),  # runs (dim 0) / rows (dim 1)
        randn((20, 6), dtype, seed + 2).t(),  # dense, transposed
        randn((6, 60), dtype, seed + 3)[:, ::3],  # not dense: read through a copy
        randn((4, 2, 3, 3), dtype, seed).to(memory_format=torch.channels_last),  # channels_last
        randn((1, 300), dtype, seed + 4)[:, 3:],  # odd offset
        randn((70,), dtype, seed + 5),
        randn((0, 3), dtype, seed + 6),
    ]
    same = [(p.detach() + 0.25).to(dtype) for p in params]  # torch keeps a dense layout: read as is
    other = [randn(p.shape, dtype, seed + 20 + i).contiguous() for i, p in enumerate(params)]  # contiguous
    other[0] = randn((20, 6), dtype, seed + 40).t()  # a transposed center of a contiguous param
    return params, same, other


EVERY_MODE = ((-1, F64), (0, BF16), (1, F16), (1, F32), (0, F32))  # (group dim, gradient dtype)


def _every_call(params, centers, ws, check, modes=EVERY_MODE):
    """Every contract call, every mode, gradients of every dtype; ``check()`` after each call."""
    dtype = params[0].dtype
    for group_dim, g_dtype in modes:
        B.sums(params, centers, group_dim, workspace=ws)
        check()
        B.sums(params, centers, group_dim, 0.125, workspace=ws)
        B.sums(params, centers, group_dim, torch.tensor([0.25]), workspace=ws)
        check()
        B.grads(params, centers, group_dim, coeffs(dtype, 0.1, 0.2), None, workspace=ws)
        check()
        grads = [torch.zeros(p.shape, dtype=g_dtype) for p in params]
        grads[0] = torch.zeros(params[0].shape[::-1], dtype=g_dtype).t()  # in another order: a copy
        B.add_grad_(params, grads, centers, group_dim, coeffs(dtype, 0.1, 0.2, 0.3), None, workspace=ws)
        check()
        B.prox_(params, centers, group_dim, coeffs(dtype, 0.01, 1.01, 0.02), None, workspace=ws)
        check()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_every_table_address_is_owned(dtype, no_kernels):
    ws = Workspace(limit=64)  # keep every table built, to check them all
    params, same, other = _layouts(dtype, 0)
    dense = [i for i in range(len(params)) if i != 2]  # without the param read through a copy
    for index in (dense, range(len(params))):
        for centers in (None, same, other):
            _every_call([params[i] for i in index], None if centers is None else [centers[i] for i in index], ws,
                        lambda: assert_owned(ws))
    # The tables without copies were cached (and checked after every call); those with were not.
    assert all(t.direct for t in ws.entries.values())
    assert len(ws.entries) == 6  # (params, same centers) x (dims -1, 0, 1)
    assert assert_owned(ws) == 6


def test_every_launch_reads_and_writes_live_memory(no_kernels, live_operands):
    """Without a workspace (tables for one call), with every kind of copy: non-dense params,
    centers in another order, gradients in another order; each call's launches are checked."""
    params, _, other = _layouts(BF16, 0)
    _every_call(params, other, None, lambda: None, modes=EVERY_MODE[:3])
    assert len(live_operands) >= 30


def test_tables_hold_aliases_not_the_parameters_data(live_operands):
    """``p.data = ...`` after a call: the cached tables still point into the old storage, which
    they keep alive; the next call, at new pointers, builds its own."""
    ws = Workspace()
    p = torch.nn.Parameter(randn((6, 30), F32, 1))
    old = StorageWeakRef(p.untyped_storage())
    B.sums([p], None, 0, workspace=ws)
    p.data = randn((6, 30), F32, 2)
    gc.collect()
    assert not old.expired()
    assert_owned(ws)
    got, _ = B.sums([p], None, 0, workspace=ws)
    assert ws.builds == 2
    torch.testing.assert_close(got[0, 0].double(), p.detach().double().abs().sum(), rtol=1e-6, atol=0)
    gc.collect()
    assert old.expired()  # the new tables replaced the old ones: the swapped-out storage is freed
    assert len(ws.entries) == 1


# -------------------------------------------------- regression: a center copied for one call

@pytest.mark.parametrize("with_workspace", [False, True], ids=["no-workspace", "workspace"])
def test_a_center_copied_into_its_params_order_lives_through_the_launch(with_workspace, live_operands):
    # A center in another memory order than its param is copied into the param's order; the
    # copy must live until the kernels have read it (it used to be dropped when the tables were
    # built, and its memory handed to the next allocation: the partials the kernel writes).
    ws = Workspace() if with_workspace else None
    params = [randn((24, 6), BF16, 1).t(), randn((3, 2, 3, 3), BF16, 2).to(memory_format=torch.channels_last)]
    centers = [randn((6, 24), BF16, 3), randn((3, 2, 3, 3), BF16, 4)]  # contiguous
    d = [(p.double() - c.double()) for p, c in zip(params, centers)]
    expected = torch.stack([x.abs().sum() for x in d])
    for group_dim in (-1, 0, 1):
        got, _ = B.sums(params, centers, group_dim, workspace=ws)
        torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-5, atol=0)
    grads = [torch.zeros_like(p, dtype=F32) for p in params]
    B.add_grad_(params, grads, centers, 1, coeffs(BF16, 1.0, 0.0), None, workspace=ws)
    for g, x in zip(grads, d):
        assert torch.equal(g, torch.sign(x).float())
    B.prox_([p.clone() for p in params], centers, 0, coeffs(BF16, 0.01, 1.0, 0.01), None, workspace=ws)
    assert len(live_operands) >= 6
    if ws is not None:
        assert not ws.entries  # tables reading copies are valid for one call only


# ------------------------------------------------------------- nothing outlives its owner

@pytest.mark.parametrize("with_workspace", [False, True], ids=["no-workspace", "workspace"])
def test_parameters_are_freed_with_their_workspace(with_workspace, no_kernels):
    ws = Workspace() if with_workspace else None
    params = [randn((40, 20), F32, 1), randn((20, 40), F32, 2).t(),
              randn((8, 4, 3, 3), F32, 3).to(memory_format=torch.channels_last), randn((300,), F32, 4)]
    centers = [torch.zeros_like(p) for p in params]  # same layouts: the tables are cached
    grads = [torch.zeros_like(p) for p in params]
    refs = [StorageWeakRef(t.untyped_storage()) for t in params + centers + grads]
    c = coeffs(F32, 0.1, 0.2, 0.3)
    states = [torch.rand(p.shape) for p in params]  # an optimizer's state: the metric of a step
    refs += [StorageWeakRef(t.untyped_storage()) for t in states]
    metric = MetricOperand.of([Metric(v, 1.0, 1e-3) for v in states], params, F32)
    for group_dim in (-1, 0, 1):
        B.sums(params, centers, group_dim, workspace=ws)
        B.grads(params, centers, group_dim, c, None, workspace=ws)
        B.add_grad_(params, grads, centers, group_dim, c, None, workspace=ws)
        B.prox_(params, centers, group_dim, c, None, workspace=ws)
        B.prox_(params, centers, group_dim, c, None, workspace=ws, metric=metric)
        B.sums(params, None, group_dim, 0.5, workspace=ws)
    if ws is not None:
        assert ws.entries and ws.hits
    del params, centers, grads, ws, states, metric
    gc.collect()
    assert all(r.expired() for r in refs), [i for i, r in enumerate(refs) if not r.expired()]


def _module_containers():
    """``(module.name, container)`` for every module-level dict, list and set of the backend's
    package and its modules (tuning, kernels, tables, launch, aot)."""
    modules = [B] + [m for m in vars(B).values() if isinstance(m, types.ModuleType) and
                     m.__name__.startswith(B.__name__ + ".")]
    assert {m.__name__.rsplit(".", 1)[1] for m in modules[1:]} >= {"tuning", "kernels", "tables", "launch", "aot"}
    return [(f"{m.__name__}.{name}", value) for m in modules for name, value in vars(m).items()
            if not name.startswith("__") and isinstance(value, (dict, list, set))]


def _containers():
    """The modules' containers and their sizes (module-level state that could grow)."""
    return {name: len(value) for name, value in _module_containers()}


def test_thousands_of_calls_leave_nothing_behind(no_kernels):
    # The host side only (tables, constants, target tables).
    ws = Workspace()
    params = [randn((40, 20), F32, 1), randn((300,), F32, 2)]
    c = coeffs(F32, 0.1, 0.2, 0.3)
    metric = MetricOperand.of([Metric(torch.rand(p.shape)) for p in params], params, F32)
    B.sums(params, None, 0, 0.5, workspace=ws)
    before = _containers()
    for i in range(2000):
        B.sums(params, None, 0, 1e-3 * (i + 1), workspace=ws)  # an lr schedule through the threshold
        if i % 10 == 0:
            B.grads(params, None, 0, c, None, workspace=ws)  # fresh outputs: new target pointers
            B.add_grad_(params, [torch.zeros_like(p) for p in params], None, 0, c, None, workspace=ws)
            B.prox_(params, None, -1, c, None, workspace=ws)
            B.prox_(params, None, 0, c, None, workspace=ws, metric=metric)  # a metric table per call
    assert _containers() == before
    assert len(ws.entries) <= ws.limit and not ws.captured
    assert ws.builds <= 3  # the tables of (params, dim 0) and (params, dim -1)
    for name, value in _module_containers():  # no module-level container holds a tensor or a table
        items = value.values() if isinstance(value, dict) else value
        assert not any(isinstance(v, (torch.Tensor, tables._Tables, tables._Targets, tuple)) for v in items), name


# ------------------------------------------------------------------- CUDA-graph capture

def test_tables_built_during_capture_are_kept_apart(monkeypatch):
    ws = Workspace()
    params = [randn((40, 20), F32, 1), randn((300,), F32, 2)]
    grads = [torch.zeros_like(p) for p in params]
    c = coeffs(F32, 0.1, 0.2, 0.3)
    expected = torch.stack([p.double().abs().sum() for p in params])

    monkeypatch.setattr(B, "_capturing", lambda device: True)
    got, _ = B.sums(params, None, 0, workspace=ws)
    B.add_grad_(params, grads, None, 0, c, None, workspace=ws)
    assert not ws.entries
    captured = list(ws.captured)
    # the sums' tables, add_grad_'s (same key, but tables built during capture are never looked
    # up) and add_grad_'s per-call target table
    assert sum(isinstance(t, tables._Tables) for t in captured) == 2
    assert sum(isinstance(t, tables._Targets) for t in captured) == 1
    assert_owned(ws)
    torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-6, atol=0)

    monkeypatch.setattr(B, "_capturing", lambda device: False)
    got, _ = B.sums(params, None, 0, workspace=ws)  # eager: builds its own, into entries
    torch.testing.assert_close(got[:, 0].double(), expected, rtol=1e-6, atol=0)
    assert len(ws.entries) == 1 and ws.builds == 3
    eager = next(iter(ws.entries.values()))
    assert all(eager is not t for t in captured) and len(ws.captured) == len(captured)

    # Captured again: the cached tables are used, and kept for the graph (once) even if the LRU
    # later drops them.
    monkeypatch.setattr(B, "_capturing", lambda device: True)
    B.sums(params, None, 0, workspace=ws)
    B.sums(params, None, 0, workspace=ws)
    assert ws.builds == 3 and sum(t is eager for t in ws.captured) == 1


def test_capture_without_a_workspace_is_refused(monkeypatch):
    params = [randn((40, 20), F32, 1)]
    monkeypatch.setattr(B, "_capturing", lambda device: True)
    c = coeffs(F32, 0.1, 0.2)
    for call in (lambda: B.sums(params, None, -1), lambda: B.grads(params, None, -1, c, None),
                 lambda: B.add_grad_(params, [torch.zeros_like(params[0])], None, -1, c, None),
                 lambda: B.prox_(params, None, -1, c, None)):
        with pytest.raises(RuntimeError, match="without a workspace while a CUDA graph"):
            call()


# --------------------------------------------------- a cached table is not reused for a new view

def test_a_cached_table_is_not_reused_for_another_view_of_the_same_memory():
    # Same data pointer and shape, other strides (a square weight and its transpose): with a
    # center, whether c is read in w's order depends on the strides; a gradient target is laid
    # out in the order of the param as it is now.
    ws = Workspace()
    w = randn((30, 30), F32, 1)
    center = randn((30, 30), F32, 2)
    for p in (w, w.t(), w):
        expected = (p.double() - center.double()).abs().sum()
        got, _ = B.sums([p], [center], -1, workspace=ws)
        torch.testing.assert_close(got[0, 0].double(), expected, rtol=1e-6, atol=0)
        g = torch.zeros(30, 30)
        B.add_grad_([p], [g], None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
        assert torch.equal(g, p)


# -------------------------------------------------- through the public API, every table a Penalty holds

def test_every_public_call_leaves_only_owned_tables(no_kernels, live_operands):
    """value, backward, add_to_grad_, prox_, attach, with every term and centers, on strided,
    transposed and channels_last parameters and gradients of another dtype: after each call,
    every table of every workspace of the Penalty is owned, and every launch read live memory."""
    import fastreg

    layouts, same, _ = _layouts(F32, 7)
    layouts = [p.requires_grad_() for p in layouts[:5]]
    dense = [0, 1, 3, 4]  # (layouts[2] is read through a copy: its tables are never cached)
    for index, center in ((dense, None), (dense, True), (range(5), True)):
        params = [layouts[i] for i in index]
        centers = [same[i] for i in index] if center else None
        reg = fastreg.Penalty(params, l1=0.1, l2=0.2, group=0.3, group_dim=1, center=centers, backend="triton")
        workspaces = [kg.workspace for kg in reg._plan.kernel_groups()]

        def check():
            for ws in workspaces:
                assert_owned(ws)

        reg()
        check()
        reg().backward()
        check()
        for p in params:
            p.grad_dtype = None
            p.grad = torch.zeros(p.shape, dtype=F64)  # gradients of another dtype
        reg.add_to_grad_()
        check()
        reg.prox_(0.01)
        check()
        optimizer = torch.optim.SGD(params, lr=0.01)
        handle = reg.attach(optimizer, mode="prox")
        optimizer.step()
        handle.remove()
        check()
        assert sum(len(ws.entries) for ws in workspaces) >= (1 if len(params) == len(dense) else 0)


def test_a_cached_table_is_not_reused_for_a_non_dense_view_at_the_same_address():
    """Found in review: the same pointer and shape, now a non-dense view: the tables read one
    flat run, so they must be rebuilt (reading through a copy), and prox_ must write only the
    parameter's own elements."""
    ws = Workspace()
    base = randn((4, 8), F32, 1)
    w = torch.nn.Parameter(base.view(-1)[:16].view(4, 4))
    B.sums([w], None, -1, workspace=ws)
    w.data = base[:, :4]  # same address, same shape, not dense
    got, _ = B.sums([w], None, -1, workspace=ws)
    torch.testing.assert_close(got[0, 0].double(), w.detach().double().abs().sum(), rtol=1e-6, atol=0)
    outside = base[:, 4:].clone()
    with torch.no_grad():
        B.prox_([w], None, -1, coeffs(F32, 0.5, 1.0, 0.0), None, workspace=ws)
    assert torch.equal(base[:, 4:], outside)


# ----------------------------------------------------------------- the step in a metric

def _metric_layouts(seed):
    """bf16 params of every layout with float32 metric tensors (an optimizer's state) in their
    own order, in another, or of a param read through a copy; an IDENTITY row; a centered one."""
    params, _, _ = _layouts(BF16, seed)
    g = torch.Generator().manual_seed(seed)

    def state(shape):
        return torch.rand(shape, generator=g) + 0.1

    metrics = [Metric(state(p.shape), 1.0, 1e-3) for p in params]
    metrics[0] = Metric(state(params[0].shape[::-1]).t(), 1.0, 1e-3)  # another order than its param
    metrics[1] = None  # the Euclidean step: its v is the param (bf16), never read
    metrics[3] = Metric(state(params[3].shape), 1.0, 1e-3, centered=0.1 * state(params[3].shape))
    groups = Groups((0, 1, 0, WHOLE, NO_GROUPS, 0, 0), (1, 2, 2, 1, 1, 5, 1))
    return params, metrics, groups


def test_the_metric_step_reads_live_memory(live_metric_operands):
    """Without a workspace, real kernels: every metric tensor the kernels read is alive at the
    launch (copies in the param's order included), and nothing else is read for an IDENTITY row."""
    params, metrics, groups = _metric_layouts(3)
    expected = [p.clone() for p in params]
    table = torch.tensor([0.01, 1.1, 0.05])
    from fastreg import _ops

    _ops.prox_("torch", expected, None, groups, table, metric=metrics)
    _ops.prox_("triton", params, None, groups, table, metric=metrics)
    assert live_metric_operands == [kernels.MODE_FLAT, kernels.MODE_GROUP]  # one call: one metric dtype
    for x, y in zip(params, expected):
        torch.testing.assert_close(x.double(), y.double(), rtol=2e-2, atol=1e-2)


def test_the_metric_tables_are_owned_and_kept_for_a_graph(monkeypatch, no_kernels, live_metric_operands):
    """A metric table is per call (never in the workspace's cache); under capture it is kept with
    the workspace, holding every tensor it points into; it keeps no user tensor beyond that."""
    ws = Workspace()
    params, metrics, groups = _metric_layouts(5)
    dense = [0, 1, 3, 4, 5, 6]  # (params[2] is read through a copy: those tables are never cached)
    params = [params[i] for i in dense]
    metrics = [metrics[i] for i in dense]
    groups = groups.subset(dense)
    operand = MetricOperand.of(metrics, params, F32)
    table = torch.tensor([0.01, 1.1, 0.05])
    B.prox_(params, None, groups, table, None, workspace=ws, metric=operand)
    assert len(ws.entries) == 1 and not ws.captured
    assert not any(isinstance(t, tables._Targets) for t in ws.entries.values())
    monkeypatch.setattr(B, "_capturing", lambda device: True)
    B.prox_(params, None, groups, table, None, workspace=ws, metric=operand)
    kept = [t for t in ws.captured if isinstance(t, tables._Targets)]
    assert len(kept) == 1 and len(kept[0].pointers) == 2 * sum(p.numel() > 0 for p in params)
    assert assert_owned(ws) == 3  # the param tables (cached, and kept for the graph) and the metric table
    # Those read where they are (a state in another order than its param is read through a copy,
    # which the table keeps instead; an empty param's is not read).
    states = [StorageWeakRef(m.v.untyped_storage()) for m, p in zip(metrics, params)
              if m is not None and p.numel() and tables._in_order(m.v, p) is m.v]
    assert len(states) == 2
    del metrics, operand, kept
    gc.collect()
    assert not any(r.expired() for r in states)  # kept by the captured table, as long as the workspace
    ws.clear()
    gc.collect()
    assert all(r.expired() for r in states)
    assert len(live_metric_operands) == 4
