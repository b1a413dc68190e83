"""The Triton backend's cache hits (host time per call): each condition under which a cached
table is reused, and each change that must make a call build its own instead.

    TRITON_INTERPRET=1 python -m pytest tests/triton_interpret/test_triton_host_cache.py

The conditions are listed in ``tables._tables`` (the parameters' tables) and
``tables._targets_of`` (the write targets' table). Values are checked with real kernels on
tiny tensors; the ownership checks of ``test_triton_ownership`` (``live_operands``) run at
every launch.
"""

import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from triton_interpret.test_triton_ownership import assert_owned, coeffs, live_operands, randn  # noqa: F401  (fixture)

from fastreg import _dispatch
from fastreg.backends._geometry import Groups
from fastreg.backends._workspace import Workspace

checked = pytest.mark.usefixtures("live_operands")  # every launch reads and writes live memory only

B = _dispatch.backend("triton")
tables = B.tables
F32 = torch.float32


def _abs_sums(params):
    return torch.stack([p.detach().double().abs().sum() for p in params])


def test_a_second_call_finds_the_tables_and_a_hit_is_counted_once():
    ws = Workspace()
    params = [randn((8, 6), F32, 1), randn((30,), F32, 2)]
    B.sums(params, None, 0, workspace=ws)
    B.sums(list(params), None, 0, workspace=ws)  # another list of the same tensors
    B.prox_(params, None, 0, coeffs(F32, 0.0, 1.0), None, workspace=ws)
    assert (ws.builds, ws.hits) == (1, 2)


@pytest.mark.parametrize("change", ["slice", "reshape", "transpose", "other-storage"])
@checked
def test_a_parameter_changed_in_place_of_its_data_is_never_read_through_its_old_tables(change):
    # Condition 1: the data pointer, shape and strides of every param. A slice and a reshape
    # keep the pointer (and a slice of a 1-D tensor its strides); a transpose of a square
    # weight keeps pointer and shape.
    ws = Workspace()
    base = randn((6, 6), F32, 1)
    p = torch.nn.Parameter(base.clone())
    other = randn((4,), F32, 3)
    params = [p, other]
    for group_dim in (-1, 0):
        B.sums(params, None, group_dim, workspace=ws)
    new = {"slice": lambda d: d[:3], "reshape": lambda d: d.view(4, 9), "transpose": lambda d: d.t(),
           "other-storage": lambda d: randn((6, 6), F32, 2)}[change](p.data)
    p.data = new
    for group_dim in (-1, 0):
        got, group_sq = B.sums(params, None, group_dim, workspace=ws)
        torch.testing.assert_close(got[:, 0].double(), _abs_sums(params), rtol=1e-6, atol=0)
        if group_dim == 0:  # the row norms of the param as it is now
            rows = p.detach().double().reshape(p.shape[0], -1).square().sum(1)
            torch.testing.assert_close(group_sq[:p.shape[0]].double(), rows, rtol=1e-6, atol=0)
    assert ws.builds == 4
    assert_owned(ws)


@checked
def test_centers_are_checked_like_the_parameters():
    ws = Workspace()
    p = randn((5, 5), F32, 1)
    c = randn((5, 5), F32, 2)
    for center in (c, c.t(), c):  # same pointer and shape, other strides: another order
        got, _ = B.sums([p], [center], -1, workspace=ws)
        torch.testing.assert_close(got[0, 0].double(), (p.double() - center.double()).abs().sum(), rtol=1e-6, atol=0)
    # The transposed center is read through a copy (tables for that call only, not counted as
    # builds); the first tables are found again by the third call only.
    assert (ws.builds, ws.hits) == (1, 1)


def test_other_structures_have_their_own_tables():
    ws = Workspace(limit=8)
    params = [randn((8, 6), F32, 1), randn((30,), F32, 2)]
    structures = (-1, 0, 1, Groups((0, -2), (2, 1)), Groups((0, -2), (4, 1)))
    for _ in range(2):
        for groups in structures:
            got, _ = B.sums(params, None, groups, workspace=ws)
            torch.testing.assert_close(got[:, 0].double(), _abs_sums(params), rtol=1e-6, atol=0)
    assert (ws.builds, ws.hits) == (len(structures), len(structures))


@checked
def test_misaligned_targets_get_their_own_launches_and_sums_never_use_them():
    # Condition 2: a target that does not start on 16 bytes turns off its tensor's vector
    # stores; a call without targets uses only tables built with every target aligned.
    ws = Workspace()
    params = [randn((8, 8), F32, 1), randn((64,), F32, 2)]
    aligned = [torch.zeros_like(p) for p in params]
    storage = torch.zeros(64 + 1)
    misaligned = [torch.zeros_like(params[0]), storage[1:]]  # 4 bytes past a 16-byte start
    assert misaligned[1].data_ptr() % 16
    c = coeffs(F32, 0.0, 0.5)
    B.add_grad_(params, aligned, None, -1, c, None, workspace=ws)
    B.add_grad_(params, misaligned, None, -1, c, None, workspace=ws)  # rebuilt: tensor 1 misaligned
    (plan,) = ws.entries.values()
    assert plan.misaligned == (1,)
    for g, p in zip(misaligned, params):
        assert torch.equal(g, p)
    B.add_grad_(params, misaligned, None, -1, c, None, workspace=ws)  # the same pointers: a hit
    assert (ws.builds, ws.hits) == (2, 1)
    B.sums(params, None, -1, workspace=ws)  # rebuilt with every target aligned
    (plan,) = ws.entries.values()
    assert plan.misaligned == () and ws.builds == 3
    B.add_grad_(params, [torch.zeros_like(p) for p in params], None, -1, c, None, workspace=ws)
    assert ws.builds == 3  # other pointers, all aligned: the same tables


@checked
def test_the_targets_table_is_reused_only_for_targets_at_the_same_addresses_and_strides():
    # The cached targets table holds addresses only: reused when the targets (p.grad may be a
    # new object every step) have the same data pointers and strides, else built again.
    ws = Workspace()
    p = randn((6, 6), F32, 1)
    params = [p, randn((10,), F32, 2)]
    c = coeffs(F32, 0.0, 0.5)
    grads = [torch.zeros_like(q) for q in params]
    B.add_grad_(params, grads, None, -1, c, None, workspace=ws)
    (plan,) = ws.entries.values()
    first = plan.targets_cache[2]
    B.add_grad_(params, [g.view_as(g) for g in grads], None, -1, c, None, workspace=ws)  # new objects
    assert plan.targets_cache[2] is first
    for g, q in zip(grads, params):
        assert torch.equal(g, 2 * q)  # p added twice
    moved = [torch.zeros_like(q) for q in params]
    B.add_grad_(params, moved, None, -1, c, None, workspace=ws)
    assert plan.targets_cache[2] is not first
    for g, q in zip(moved, params):
        assert torch.equal(g, q)
    # The same address and shape, other strides: the gradient of a square weight, transposed.
    square = torch.zeros(6, 6)
    B.add_grad_(params, [square, moved[1]], None, -1, c, None, workspace=ws)
    B.add_grad_(params, [square.t(), moved[1]], None, -1, c, None, workspace=ws)
    assert torch.equal(square, p + p.t())
    assert ws.builds == 1


def test_a_cached_targets_table_keeps_no_gradient_alive():
    ws = Workspace()
    params = [randn((6, 6), F32, 1)]
    grads = [torch.zeros(6, 6)]
    ref = StorageWeakRef(grads[0].untyped_storage())
    B.add_grad_(params, grads, None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
    outputs = B.grads(params, None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
    out_ref = StorageWeakRef(outputs[0].untyped_storage())
    assert next(iter(ws.entries.values())).targets_cache is not None
    del grads, outputs
    gc.collect()
    assert ref.expired() and out_ref.expired()


@checked
def test_grads_outputs_of_dense_parameters_in_any_order():
    # grads' outputs are empty_like(p): read as is for a dense param (its strides), through a
    # copy for the others.
    ws = Workspace()
    params = [randn((7, 5), F32, 1).t(), randn((2, 3, 2, 2), F32, 2).to(memory_format=torch.channels_last),
              randn((9,), F32, 3), randn((0, 4), F32, 4)]
    for _ in range(2):
        outputs = B.grads(params, None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
        for out, p in zip(outputs, params):
            assert out.stride() == p.stride() and torch.equal(out, p)
    params[0] = randn((5, 21), F32, 5)[:, ::3]  # not dense: read through a copy
    outputs = B.grads(params, None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
    for out, p in zip(outputs, params):
        assert torch.equal(out, p)


# ------------------------------------------------------------------------------------------
# The checks in C++ (csrc/operands.cpp, where the cpu extension is built): the same conditions,
# read through the tensors a table holds (memory_watch) and a call's targets through weak
# references (targets_watch, after the same targets came twice in a row).

watched = pytest.mark.skipif(B.tables.cpu.unavailable_reason() is not None, reason="the C++ extension is not built")


@watched
@checked
def test_a_list_of_other_tensors_never_finds_the_tables_of_the_same_first_pointer():
    ws = Workspace()
    a, b = randn((8,), F32, 1), randn((5,), F32, 2)
    B.sums([a, b], None, -1, workspace=ws)
    (plan,) = ws.entries.values()
    assert plan.watch is not None
    twin = b.clone()  # another tensor of the same shape: other ids, other pointer
    got, _ = B.sums([a, twin], None, -1, workspace=ws)
    assert ws.builds == 2
    torch.testing.assert_close(got[:, 0].double(), _abs_sums([a, twin]), rtol=1e-6, atol=0)
    got, _ = B.sums([a, twin], None, -1, workspace=ws)  # a new list of the same tensors: found by their ids
    assert (ws.builds, ws.hits) == (2, 1)
    got, _ = B.sums([a, b], None, -1, workspace=ws)  # (the key's tables are [a, twin]'s now: built again)
    assert ws.builds == 3
    torch.testing.assert_close(got[:, 0].double(), _abs_sums([a, b]), rtol=1e-6, atol=0)


@watched
@pytest.mark.parametrize("change", ["moved", "restrided", "replaced", "freed"])
@checked
def test_watched_targets_are_read_again_whenever_they_changed(change):
    ws = Workspace()
    p = randn((6, 6), F32, 1)
    params = [p, randn((10,), F32, 2)]
    c = coeffs(F32, 0.0, 0.5)
    grads = [torch.zeros(6, 6), torch.zeros(10)]
    for _ in range(3):  # the third call reads them through the watch
        B.add_grad_(params, grads, None, -1, c, None, workspace=ws)
    assert ws.targets.watch is not None and not ws.targets.watch()
    if change == "moved":  # the same object, other memory
        grads[0].data = torch.zeros(6, 6)
    elif change == "restrided":  # the same object, the same memory, transposed
        grads[0].data = grads[0].data.t()
    elif change == "replaced":  # another object in the list
        grads[0] = torch.zeros(6, 6)
    else:  # every old gradient gone; new ones, which may land at the old ids and addresses
        grads = None
        gc.collect()
        grads = [torch.zeros(6, 6), torch.zeros(10)]
    before = grads[0].clone()
    B.add_grad_(params, grads, None, -1, c, None, workspace=ws)
    assert torch.equal(grads[0], before + p)  # 0.5·2·p, element by element, whatever the layout


@watched
def test_the_watches_are_released_with_the_workspace():
    cpu = B.tables.cpu
    gc.collect()
    before = cpu.handles_held()
    ws = Workspace()
    params = [randn((6, 6), F32, 1)]
    grads = [torch.zeros(6, 6)]
    for _ in range(3):
        B.add_grad_(params, grads, None, -1, coeffs(F32, 0.0, 0.5), None, workspace=ws)
    held = cpu.handles_held()
    assert held[2] == before[2] + 1 and held[3] == before[3] + 1
    del ws
    gc.collect()
    assert cpu.handles_held() == before


@checked
def test_fresh_views_of_the_same_tensors_find_their_tables():
    # A DTensor's local shard comes as a fresh view at every call (KernelGroup.local): other ids,
    # the same pointers, shapes and strides: found by the comparison in Python.
    ws = Workspace()
    params = [randn((8, 6), F32, 1), randn((30,), F32, 2)]
    for _ in range(4):
        got, _ = B.sums([p.view_as(p) for p in params], None, -1, workspace=ws)
    assert (ws.builds, ws.hits) == (1, 3)
    torch.testing.assert_close(got[:, 0].double(), _abs_sums(params), rtol=1e-6, atol=0)
