"""fastreg touches only what it owns (see fastreg/backends/_workspace.py for the rules).

Each test is a regression test of one finding of the review of the eager backward (issue 17,
items 1-4) or of the rules themselves: no write into memory a user holds, every hook sees the
penalty's gradient, a parameter replaced under a ``Penalty`` is followed (or named in an error),
every in-place write bumps a version counter, nothing keeps a user's tensor alive after its
``Penalty`` is gone, and the one-call ``penalty()`` shares no coefficients between calls.
The Triton backend's tables have their own invariant tests under tests/triton_interpret/.
"""

import gc
import threading
import weakref

import pytest
import torch
from torch import nn

import fastreg
import reference as ref


def _leaf(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(torch.get_default_device()).requires_grad_()


# ------------------------------------------------------------------------------------------
# 1. Memory a user holds is never written.


def test_a_held_storage_of_an_old_gradient_keeps_its_values(backend):
    w = _leaf(256, 256)
    reg = fastreg.Penalty([w], l2=0.5, backend=backend)
    reg().backward()
    storage = w.grad.untyped_storage()  # the user keeps the storage, not the tensor
    snapshot = w.grad.clone()
    w.grad = None
    with torch.no_grad():
        w.mul_(2)
    reg().backward()
    kept = torch.empty(0, dtype=torch.float64, device=w.device).set_(storage).view(256, 256)
    assert torch.equal(kept, snapshot)
    torch.testing.assert_close(w.grad, 2 * 0.5 * w.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("holder", ["tensor", "view", "detach", "numpy", "dlpack"])
def test_gradients_held_every_way_keep_their_values(backend, holder):
    w = _leaf(300, 220)
    reg = fastreg.Penalty([w], l1=0.1, l2=0.5, backend=backend)
    for _ in range(2):
        w.grad = None
        reg().backward()
    grab = {"tensor": lambda g: g, "view": lambda g: g[3], "detach": lambda g: g.detach(),
            "numpy": lambda g: torch.from_numpy(g.cpu().numpy()) if g.device.type == "cpu" else g,
            "dlpack": lambda g: torch.from_dlpack(torch.utils.dlpack.to_dlpack(g))}[holder]
    held = grab(w.grad)
    snapshot = held.clone()
    w.grad = None
    with torch.no_grad():
        w.add_(1)
    reg().backward()
    assert torch.equal(held, snapshot)


# ------------------------------------------------------------------------------------------
# 2. Every hook sees the penalty's gradient.


def test_a_prehook_on_the_accumulate_grad_node_sees_the_penalty(backend):
    w = _leaf(20, 30)
    reg = fastreg.Penalty([w], l1=0.1, l2=0.5, backend=backend)
    node = torch.autograd.graph.get_gradient_edge(w).node
    seen_pre, seen_post = [], []
    pre = node.register_prehook(lambda grads: seen_pre.append(grads[0].clone()))
    post = node.register_hook(lambda inputs, outputs: seen_post.append(outputs[0].clone()))
    reg().backward()
    expected = ref.grad(w.detach(), 0.1, 0.5, 0, 0)
    torch.testing.assert_close(seen_pre[0], expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(seen_post[0], expected, rtol=1e-12, atol=1e-14)
    pre.remove()
    post.remove()


def test_tensor_and_post_accumulate_hooks_see_the_penalty(backend):
    w = _leaf(20, 30)
    reg = fastreg.Penalty([w], l2=0.5, backend=backend)
    seen = []
    w.register_hook(lambda g: seen.append(("tensor", g.clone())))
    w.register_post_accumulate_grad_hook(lambda p: seen.append(("post", p.grad.clone())))
    reg().backward()
    assert [kind for kind, _ in seen] == ["tensor", "post"]
    for _, g in seen:
        torch.testing.assert_close(g, w.detach(), rtol=0, atol=0)  # 2·0.5·w


# ------------------------------------------------------------------------------------------
# 3. Parameters replaced under a Penalty: followed, or an error naming them.


def _grown_linear_step(reg_of, lin, rows):
    x = torch.randn(5, 4, dtype=torch.float64)
    reg = reg_of(lin)
    reg().backward()
    lin.zero_grad(set_to_none=True)
    with torch.no_grad():
        lin.weight.data = torch.randn(rows, 4, dtype=torch.float64)
        lin.bias.data = torch.randn(rows, dtype=torch.float64)
    (lin(x).sum() + reg_of(lin)()).backward()
    # d/db of Σ(xWᵀ + b) is the batch size (5); the penalty adds 2·0.5·b.
    torch.testing.assert_close(lin.bias.grad, lin.bias.detach() + 5, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lin.weight.grad, lin.weight.detach() + x.sum(0).expand(rows, 4), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3], ids=["same-rows", "2-to-3-rows"])
def test_a_penalty_follows_parameters_that_change_shape(backend, rows):
    lin = nn.Linear(4, 2 if rows == 3 else 1).double()
    reg = fastreg.Penalty(lin, l2=0.5, backend=backend)
    _grown_linear_step(lambda m: reg, lin, rows if rows == 3 else 3)


def test_the_one_call_penalty_follows_parameters_that_change_shape(backend):
    lin = nn.Linear(4, 1).double()
    _grown_linear_step(lambda m: (lambda: fastreg.penalty(m, l2=0.5, backend=backend)), lin, 3)


def test_a_penalty_follows_a_parameter_that_changes_dtype(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    reg = fastreg.Penalty(model, l2=0.5, backend=backend)
    reg().backward()
    model.zero_grad(set_to_none=True)
    model[0].weight.data = model[0].weight.data.float()  # one float32 tensor among float64 ones
    reg().backward()
    for p in model.parameters():
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, p.detach(), rtol=0, atol=0)  # exact: 2·0.5·w in each dtype
    assert "float32" in reg.explain() and "float64" in reg.explain()


def test_a_centered_parameter_that_changes_shape_is_an_error_naming_it(backend):
    lin = nn.Linear(4, 2).double()
    reg = fastreg.Penalty(lin, l2=0.5, center="init", backend=backend)
    lin.weight.data = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="'weight' changed shape"):
        reg()


def test_a_centered_parameter_that_changes_dtype_keeps_its_center(backend):
    lin = nn.Linear(4, 2).double()
    reg = fastreg.Penalty(lin, l2=0.5, center="init", backend=backend)
    start = lin.weight.detach().clone()
    lin.weight.data = (lin.weight.data + 1).float()
    reg.add_to_grad_()
    torch.testing.assert_close(lin.weight.grad, (lin.weight.detach().double() - start).float(), rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# 4. In-place writes bump version counters.


def test_an_in_place_write_into_a_gradient_autograd_saved_is_caught(backend):
    # Plain torch raises here ("modified by an inplace operation"): so must every backend.
    w = _leaf(8, 8)
    reg = fastreg.Penalty([w], l2=0.5, backend=backend)
    reg().backward(create_graph=True)
    gp = (w.grad ** 2).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        reg().backward()
        gp.backward()


@pytest.mark.parametrize("operation", ["add_to_grad_", "prox_"])
def test_every_in_place_operation_bumps_the_version_of_what_it_writes(backend, operation):
    params = [_leaf(33, 7), _leaf(5, seed=1)]
    for p in params:
        p.grad = torch.zeros_like(p)
    reg = fastreg.Penalty(params, l1=0.1, l2=0.5, group=0.1, backend=backend)
    written = (lambda: [p.grad for p in params]) if operation == "add_to_grad_" else (lambda: params)
    before = [t._version for t in written()]
    getattr(reg, operation)(*(() if operation == "add_to_grad_" else (0.1,)))
    assert all(t._version > v for t, v in zip(written(), before))


# ------------------------------------------------------------------------------------------
# Nothing keeps a user's tensors alive after their Penalty is gone.


@pytest.mark.parametrize("mode", ["value", "backward", "add_to_grad_", "prox_", "attach-grad", "attach-prox",
                                  "one-call", "explain"])
def test_deleting_the_model_and_the_penalty_frees_the_parameters(backend, mode):
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    alive = weakref.ref(model[0].weight)
    storage = weakref.ref(model[0].weight.untyped_storage())
    reg = fastreg.Penalty(model, l1=0.1, l2=0.2, group=0.1, center="init", backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(2, 6)).sum()
    if mode == "value":
        reg()
    elif mode == "backward":
        (loss + reg()).backward()
    elif mode == "add_to_grad_":
        loss.backward()
        reg.add_to_grad_()
    elif mode == "prox_":
        reg.prox_(0.1)
    elif mode.startswith("attach"):
        handle = reg.attach(optimizer, mode=mode.split("-")[1])
        loss.backward()
        optimizer.step()
        del handle
    elif mode == "one-call":
        (loss + fastreg.penalty(model, l2=0.1, backend=backend)).backward()
    else:
        reg.explain()
    del model, reg, optimizer, loss
    gc.collect()
    assert alive() is None and storage() is None


def test_the_cpu_backends_handles_die_with_their_penalty():
    # csrc/operands.cpp's registries hold tensors for the cpu backend's calls (each kernel group's
    # bound operands, the plan's layout watch) while their Penalty lives, and only then.
    from fastreg.backends import cpu
    if cpu.unavailable_reason() is not None:
        pytest.skip("the C++ CPU backend is not built")
    gc.collect()
    before = cpu.handles_held()
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3).double())  # two kernel groups
    alive = weakref.ref(model[0].weight)
    reg = fastreg.Penalty(model, l2=0.1, backend="cpu")
    for _ in range(2):
        reg().backward()
        reg.add_to_grad_()
    held = cpu.handles_held()
    assert held[0] == before[0] + 2 and held[1] == before[1] + 1
    model[0].bias.data = model[0].bias.data.double()  # a regroup drops the old ones
    reg().backward()
    gc.collect()
    assert cpu.handles_held()[0] == before[0] + 2  # (two kernel groups again: the old ones' handles released)
    del model, reg
    gc.collect()
    assert cpu.handles_held() == before and alive() is None


def test_threads_sharing_a_penalty_never_see_a_released_handle():
    # Every call keeps the handle it uses alive over its op, though another thread may replace
    # the workspace's entry meanwhile (torch.ops releases the GIL inside the op).
    errors = []

    def work(reg):
        try:
            with torch.no_grad():
                for _ in range(3):
                    reg()
        except Exception as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    import sys
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads interleave at every bytecode: the first calls race to bind)
    try:
        for _ in range(400):
            reg = fastreg.Penalty([torch.randn(64, requires_grad=True) for _ in range(8)], l2=0.5, backend="cpu")
            threads = [threading.Thread(target=work, args=(reg,)) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []


@pytest.mark.parametrize("when", ["before", "after"])
def test_swap_module_params_on_conversion_finds_no_tensor_held(backend, when):
    # torch.utils.swap_tensors (what model.double() does under this flag) refuses a tensor that
    # something else holds: fastreg then holds nothing in C++ (handles made before the flag was
    # set are dropped at the next call).
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    reg = fastreg.Penalty(model, l2=0.5, backend=backend)
    if when == "after":
        for _ in range(2):
            reg(), reg.add_to_grad_()
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for _ in range(2):
            reg().backward()
            reg.add_to_grad_()
        model.zero_grad(set_to_none=True)
        model.double()
        value = reg()
        exact = sum(0.5 * p.detach().square().sum() for p in model.parameters())
        assert value.dtype == torch.float64
        torch.testing.assert_close(value, exact, rtol=1e-13, atol=0)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_an_inference_tensor_in_the_penalty_is_refused_as_torch_refuses_it(backend):
    w = torch.randn(4, 3, requires_grad=True)
    with torch.inference_mode():
        u = torch.randn(5)
    reg = fastreg.Penalty([w, u], l2=0.5, backend=backend)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        reg()


def test_a_deep_copy_of_a_penalty_regularizes_its_own_copies(backend):
    import copy
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double()
    reg = fastreg.Penalty(model, l2=0.5, backend=backend)
    reg(), reg.add_to_grad_(), reg()  # every cache of the original filled
    twin_model, twin = copy.deepcopy((model, reg))
    with torch.no_grad():
        for p in twin_model.parameters():
            p.mul_(2)
    twin_model[0].bias.data = twin_model[0].bias.data.float()  # a layout change only the copy sees

    def exact(m):
        return sum(0.5 * p.detach().double().square().sum() for p in m.parameters())

    torch.testing.assert_close(twin().double(), exact(twin_model), rtol=1e-6, atol=0)
    torch.testing.assert_close(reg().double(), exact(model), rtol=1e-13, atol=0)
    del twin, twin_model
    gc.collect()
    model.zero_grad(set_to_none=True)
    reg.add_to_grad_()  # the original's own caches still work after the copy is gone
    torch.testing.assert_close(model[0].weight.grad, model[0].weight.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# The one-call penalty() passes its coefficients to the call: nothing shared is written.


def test_the_one_call_penalty_never_writes_its_coefficients_into_the_cached_penalty(backend):
    model = nn.Linear(30, 20).double()
    expected = {l2: ref.value(list(model.parameters()), 0.0, l2, 0.0, 0) for l2 in (0.25, 4.0)}
    results, errors = [], []

    def worker(l2):
        try:
            for _ in range(150):
                value = fastreg.penalty(model, l2=l2, backend=backend).item()
                results.append(abs(value - expected[l2]) <= 1e-9 * expected[l2])
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(l2,)) for l2 in expected]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results) and len(results) == 300
    from fastreg import _one_call

    (cached, _), = _one_call._cache[model].values()
    assert cached.l2 in expected  # the l2 it was built with: never reassigned by later calls
    first = cached.l2
    fastreg.penalty(model, l2=first * 3, backend=backend)
    assert cached.l2 == first


# ------------------------------------------------------------------------------------------
# Caches stay bounded under schedules; nothing made during graph capture is shared.


SCHEDULE_STEPS = 2000  # (fewer under the Triton interpreter)


def test_thousands_of_steps_of_a_schedule_leave_every_cache_bounded(backend):
    from fastreg import _coefficients

    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 3))
    reg = fastreg.Penalty(model, l1=0.0, l2=0.0, group=0.0, backend=backend)
    for step in range(SCHEDULE_STEPS):
        reg.l1, reg.l2, reg.group = 1e-3 / (1 + step), 1e-2 / (1 + step), 1e-3 * (step % 7)
        model.zero_grad(set_to_none=True)
        reg.add_to_grad_()
        reg.prox_(0.1 / (1 + step))
    assert len(_coefficients._cache) <= _coefficients.CACHE_SIZE
    for kg in reg._plan.kernel_groups():
        assert len(kg.workspace.entries) <= kg.workspace.limit and not kg.workspace.captured


def test_coefficients_made_during_graph_capture_are_never_shared(monkeypatch):
    from fastreg import _coefficients

    values = (0.123456, 0.5, 0.25)
    monkeypatch.setattr(_coefficients, "capturing", lambda device: True)
    during = _coefficients.vector(values, torch.float32, torch.device("cpu"))
    monkeypatch.undo()
    after = _coefficients.vector(values, torch.float32, torch.device("cpu"))
    assert after is not during and after.data_ptr() != during.data_ptr()
    assert all(c is not during for c in _coefficients._cache.values())


# ------------------------------------------------------------------------------------------
# Found in review: what follows a replaced parameter everywhere.


def test_attach_prox_after_a_dtype_swap_uses_followed_centers(backend):
    lin = nn.Linear(6, 4).double()
    start = [p.detach().clone() for p in lin.parameters()]
    reg = fastreg.Penalty(lin, l1=0.05, l2=0.1, center="init", backend=backend)
    lin.float()  # no call in between: attach's per-group plans must follow it
    optimizer = torch.optim.SGD(lin.parameters(), lr=0.1)
    reg.attach(optimizer, mode="prox")
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.5)
    expected = [ref.prox(p.detach().double(), 0.1, 0.05, 0.1, c=c) for p, c in zip(lin.parameters(), start)]
    optimizer.step()  # no gradients: the step leaves the weights; the prox moves them
    for p, e in zip(lin.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-6)


def test_a_center_that_follows_a_dtype_round_trip_stays_exact(backend):
    lin = nn.Linear(5, 3).double()
    reg = fastreg.Penalty(lin, l2=0.5, center="init", backend=backend)
    lin.float()
    reg()
    lin.double()
    assert reg().item() == 0.0  # the float64 center, not a float32-rounded copy of it


def test_a_graph_compiled_before_a_dtype_swap_is_an_error_not_a_wrong_number(backend):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    reg = fastreg.Penalty(model, l2=0.5, backend=backend)
    step = torch.compile(lambda: reg(), backend="eager", fullgraph=True)
    step()
    model[1].weight.data = model[1].weight.data.double()
    with pytest.raises(RuntimeError, match="changed dtype or device after this graph was traced"):
        step()
    torch._dynamo.reset()


def test_in_place_operations_on_inference_tensors_are_refused_like_torch(backend):
    with torch.inference_mode():
        w = torch.randn(4, 5)
    w.grad = torch.zeros(4, 5)
    reg = fastreg.Penalty([w], l1=0.1, backend=backend)
    with pytest.raises(RuntimeError, match="[Ii]nference"):
        reg.prox_(0.1)
    with torch.inference_mode():
        reg.prox_(0.1)  # allowed there, as for torch ops


def test_explain_shows_the_groups_of_the_parameters_as_they_are(backend):
    lin = nn.Linear(4, 2).double()
    reg = fastreg.Penalty(lin, group=0.1, backend=backend)
    lin.weight.data = torch.randn(5, 4, dtype=torch.float64)
    assert "5 (rows)" in reg.explain()
