"""The deferred backward (fastreg._ops, "The deferred backward"): the penalty's gradient added to
``p.grad`` at the end of the backward instead of through the graph, taken only where no one can
tell. Each condition of the fast path, against plain autograd on a plain-torch penalty: where it
is taken (the spy counts it), and where it must not be (hooks, autograd.grad, create_graph,
...), the gradients, the hooks' inputs and the memory the user holds are those of autograd."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastreg
from fastreg import _dispatch, _ops
from fastreg.backends import cpu

L1, L2, GROUP = 1e-2, 3e-3, 2e-2

pytestmark = pytest.mark.skipif(_dispatch.unavailable_reason("cpu") is not None,
                                reason="the deferred backward reads the engine's state through the C++ extension")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _reference_penalty(model):
    total = 0
    for p in model.parameters():
        total = total + L1 * p.abs().sum() + L2 * p.square().sum()
        if p.ndim == 2:
            total = total + GROUP * p.norm(dim=1).sum()
    return total


X = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _task(model):
    return model(X).square().mean()


class _Additions:
    """The deferred additions run since the fixture started, as a list of their param counts:
    the Python callbacks (``_ops._add_deferred``, spied on) and the cpu backend's C++ ones (its
    ``deferral_log``)."""

    def __init__(self):
        self.python = []
        self.start = cpu.deferral_log()[0]

    def ran(self):
        log = cpu.deferral_log()
        count = log[0] - self.start
        return self.python + (log[len(log) - count:] if count else [])

    def __eq__(self, other):
        return self.ran() == other

    def __len__(self):
        return len(self.ran())

    def __repr__(self):
        return repr(self.ran())


@pytest.fixture(autouse=True, params=["node", "function"])
def value_node(request, monkeypatch):
    """Every test twice: the cpu backend's C++ value node (csrc/value_node.cpp), and the Python
    autograd.Function it replaces (fastreg._ops._EagerValue, still taken by a backend without it)."""
    if request.param == "function":
        monkeypatch.setattr(cpu, "penalty_value", None)
    return request.param


@pytest.fixture
def deferred(monkeypatch):
    """Counts the deferred additions (the end-of-backward callbacks that ran)."""
    additions = _Additions()
    original = _ops._add_deferred

    def spy(*args):
        additions.python.append(len(args[1]))
        return original(*args)

    monkeypatch.setattr(_ops, "_add_deferred", spy)
    return additions


def _pair(backend="cpu"):
    """Two identical models: one with the fastreg penalty, one with the plain-torch one."""
    ours, theirs = _model(), _model()
    return ours, theirs, fastreg.Penalty(ours, l1=L1, l2=L2, group=GROUP, backend=backend)


def _assert_same_grads(ours, theirs):
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-15, msg=name)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_taken_for_a_plain_backward_with_and_without_existing_grads(deferred, backend):
    ours, theirs, reg = _pair(backend)
    for _ in range(2):  # the second step accumulates into the existing p.grad, as autograd does
        held = [p.grad for p in ours.parameters()]
        (_task(ours) + reg()).backward()
        (_task(theirs) + _reference_penalty(theirs)).backward()
        _assert_same_grads(ours, theirs)
        if held[0] is not None:  # accumulation in place: the same tensors, as autograd keeps them
            assert all(h is p.grad for h, p in zip(held, ours.parameters()))
    assert deferred == [4, 4]


def test_set_to_none_and_retain_graph(deferred):
    ours, theirs, reg = _pair()
    loss, ref_loss = _task(ours) + reg(), _task(theirs) + _reference_penalty(theirs)
    loss.backward(retain_graph=True)
    ref_loss.backward(retain_graph=True)
    ours.zero_grad(set_to_none=True)
    theirs.zero_grad(set_to_none=True)
    loss.backward()
    ref_loss.backward()
    _assert_same_grads(ours, theirs)
    assert deferred == [4, 4]


def test_parameters_the_task_does_not_reach_get_the_penalty_gradient(deferred):
    ours, theirs, reg = _pair()
    (ours[0](X).square().mean() + reg()).backward()  # the last layer is not in the task
    (theirs[0](X).square().mean() + _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    assert deferred == [4]


def test_backward_inputs_fills_only_the_inputs(deferred):
    ours, theirs, reg = _pair()
    (_task(ours) + reg()).backward(inputs=[ours[0].weight, ours[2].bias])
    (_task(theirs) + _reference_penalty(theirs)).backward(inputs=[theirs[0].weight, theirs[2].bias])
    _assert_same_grads(ours, theirs)
    assert ours[0].bias.grad is None
    assert deferred == [2]


def test_autograd_grad_returns_the_whole_gradient_and_leaves_grad_alone(deferred):
    ours, theirs, reg = _pair()
    got = torch.autograd.grad(_task(ours) + reg(), list(ours.parameters()))
    expected = torch.autograd.grad(_task(theirs) + _reference_penalty(theirs), list(theirs.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-15)
    assert all(p.grad is None for p in ours.parameters())
    assert deferred == []


def test_create_graph_keeps_the_penalty_in_the_graph(deferred):
    ours, theirs, reg = _pair()
    v = [torch.randn_like(p) for p in ours.parameters()]

    def hvp(model, penalty):
        grads = torch.autograd.grad(_task(model) + penalty, list(model.parameters()), create_graph=True)
        return torch.autograd.grad(sum((g * u).sum() for g, u in zip(grads, v)), list(model.parameters()))

    for a, b in zip(hvp(ours, reg()), hvp(theirs, _reference_penalty(theirs))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    (_task(ours) + reg()).backward(create_graph=True)
    (_task(theirs) + _reference_penalty(theirs)).backward(create_graph=True)
    _assert_same_grads(ours, theirs)
    assert deferred == []


@pytest.mark.parametrize("hook", ["tensor", "post_accumulate", "node_post", "node_pre"])
def test_a_watched_gradient_goes_through_the_graph(deferred, hook):
    ours, theirs, reg = _pair()
    seen = {}
    for tag, model in (("ours", ours), ("theirs", theirs)):
        w = model[0].weight

        def record(*args, tag=tag):
            seen[tag] = [a.clone() for a in args if isinstance(a, torch.Tensor)] + [
                g.clone() for a in args if isinstance(a, tuple) for g in a if g is not None]

        if hook == "tensor":
            w.register_hook(record)
        elif hook == "post_accumulate":
            w.register_post_accumulate_grad_hook(lambda p, tag=tag: seen.__setitem__(tag, [p.grad.clone()]))
        else:
            node = torch.autograd.graph.get_gradient_edge(w).node
            (node.register_hook if hook == "node_post" else node.register_prehook)(record)
        model.keep = node if hook.startswith("node") else None  # the node lives as long as the model
    (_task(ours) + reg()).backward()
    (_task(theirs) + _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    for a, b in zip(seen["ours"], seen["theirs"]):  # the hook saw task + penalty, as in autograd
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert deferred == []


def test_memory_the_user_holds_is_never_written(deferred):
    """A task gradient the user still holds (the engine copies it rather than adopt it): the
    penalty is added to p.grad, never into the held tensor."""
    held = torch.ones(8, 6, dtype=torch.float64)

    class Hand(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w):
            return w.sum()

        @staticmethod
        def backward(ctx, grad):
            return held  # the same tensor every time, still referenced here

    ours, theirs, reg = _pair()
    (Hand.apply(ours[0].weight) + reg()).backward()
    (Hand.apply(theirs[0].weight) + _reference_penalty(theirs)).backward()
    assert torch.equal(held, torch.ones(8, 6, dtype=torch.float64))
    assert ours[0].weight.grad is not held
    _assert_same_grads(ours, theirs)
    assert deferred == [4]


def test_reentrant_checkpointing(deferred):
    ours, theirs, reg = _pair()

    def run(model):  # reentrant checkpointing needs an input that requires grad
        return checkpoint(lambda x: model[1](model[0](x)), X.clone().requires_grad_(), use_reentrant=True)

    ours[2](run(ours)).square().mean().add(reg()).backward()
    theirs[2](run(theirs)).square().mean().add(_reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    assert deferred == [4]


def test_without_the_extension_the_graph_is_used(deferred, monkeypatch):
    monkeypatch.setattr(_dispatch, "gradient_routes", lambda params: None)
    monkeypatch.setattr(cpu, "defer_add_grad", None)  # the C++ deferral and value node are in the same extension
    monkeypatch.setattr(cpu, "penalty_value", None)
    ours, theirs, reg = _pair()
    (_task(ours) + reg()).backward()
    (_task(theirs) + _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    assert deferred == []


def test_create_graph_runs_each_hook_once_on_the_whole_gradient(deferred):
    """The second-derivative path forms the value again inside the backward: that inner
    differentiation must not reach the params' own hooks (a scaling hook would apply twice)."""
    ours, theirs, reg = _pair()
    calls = {"ours": 0, "theirs": 0}
    for tag, model in (("ours", ours), ("theirs", theirs)):
        def hook(g, tag=tag):
            calls[tag] += 1
            return 2 * g
        model[0].weight.register_hook(hook)
    (_task(ours) + reg()).backward(create_graph=True)
    (_task(theirs) + _reference_penalty(theirs)).backward(create_graph=True)
    _assert_same_grads(ours, theirs)
    assert calls == {"ours": 1, "theirs": 1} and deferred == []


def test_a_hook_anywhere_in_the_graph_keeps_the_graph(deferred):
    """A hook on another parameter may read this one's p.grad before the backward ends: with a
    hook anywhere in the graph the penalty's gradient goes through the graph, not to the end."""
    ours, theirs, reg_all = _pair()
    reg = fastreg.Penalty(ours[2], l1=L1, l2=L2, group=GROUP, backend="cpu")  # the last layer only
    seen = {}
    for tag, model in (("ours", ours), ("theirs", theirs)):
        model[0].weight.register_post_accumulate_grad_hook(
            lambda _, tag=tag, model=model: seen.__setitem__(tag, None if model[2].weight.grad is None
                                                             else model[2].weight.grad.clone()))
    (_task(ours) + reg()).backward()
    theirs_penalty = sum(L1 * p.abs().sum() + L2 * p.square().sum() + (GROUP * p.norm(dim=1).sum() if p.ndim == 2
                                                                       else 0) for p in theirs[2].parameters())
    (_task(theirs) + theirs_penalty).backward()
    # (What the hook sees mid-backward depends on the engine's order of AccumulateGrad nodes, which
    # differs between any two graphs; what matters is that the penalty's gradient is not held back.)
    assert set(seen) == {"ours", "theirs"}
    _assert_same_grads(ours, theirs)
    assert deferred == [] and reg_all is not None


def test_anomaly_mode_still_sees_a_nan_gradient(deferred):
    ours, _, reg = _pair()
    with torch.no_grad():
        ours[0].weight[0, 0] = float("nan")
    with torch.autograd.detect_anomaly(), pytest.raises(RuntimeError, match="nan"):
        reg().backward()
    assert deferred == []


def test_concurrent_backwards_on_shared_parameters(deferred):
    """Threads running backward on the same parameters (Hogwild-style): the deferred addition
    takes AccumulateGrad's locks, so no update is lost."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 256))
    reg = fastreg.Penalty(model, l1=L1, l2=L2, group=GROUP, backend="cpu")
    x = torch.randn(8, 256)
    (model(x).square().mean() + reg()).backward()
    one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    threads, rounds = 4, 25

    def work():
        for _ in range(rounds):
            (model(x).square().mean() + reg()).backward()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    for p, g in zip(model.parameters(), one):
        torch.testing.assert_close(p.grad, g * threads * rounds, rtol=2e-5, atol=1e-6)
    assert len(deferred) == 1 + threads * rounds  # (and the single backward above)


def test_gradients_of_several_dtypes_are_each_added_in_their_own(deferred):
    """One deferred addition over params whose gradients differ in dtype (``p.grad_dtype``): one
    kernel call per gradient dtype, the same numbers as add_to_grad_."""
    torch.manual_seed(0)
    ours = [torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    for p, q in zip(ours[1:], theirs[1:]):
        p.grad_dtype = q.grad_dtype = torch.float32
    reg, ref_reg = (fastreg.Penalty(ps, l1=L1, l2=L2, group=GROUP, backend="cpu") for ps in (ours, theirs))
    sum(p.float().sum() for p in ours).add(reg()).backward()
    sum(p.float().sum() for p in theirs).backward()
    ref_reg.add_to_grad_()
    assert [p.grad.dtype for p in ours] == [torch.bfloat16, torch.float32, torch.float32]
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
    assert deferred == [3]


@pytest.mark.parametrize("hooks", ["save_on_cpu", "checkpoint"])
def test_saved_tensor_hooks_keep_the_graph(deferred, hooks):
    """Saved-tensor hooks (save_on_cpu, non-reentrant checkpointing) hand the backward another
    tensor object pointing at the parameter's accumulator: its .grad is not p.grad, so the
    gradient goes through the graph, and p.grad is autograd's."""
    ours, theirs, reg = _pair()

    def loss(model, penalty):
        if hooks == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                return _task(model) + penalty()
        out = checkpoint(lambda x: model[1](model[0](x)), X, use_reentrant=False)
        return model[2](out).square().mean() + checkpoint(penalty, use_reentrant=False)

    loss(ours, reg).backward()
    loss(theirs, lambda: _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    assert deferred == []


def _node_and_function(monkeypatch, params, **settings):
    """The value and the gradients of ``params`` through the C++ node and through the Python
    autograd.Function, for each way the backward goes (deferred, through the graph because of a
    hook, under create_graph with a Hessian-vector product), for the caller to compare bitwise."""
    results = []
    for node in (True, False):
        with monkeypatch.context() as patch:
            if not node:
                patch.setattr(cpu, "penalty_value", None)
            ps = [p.detach().clone().requires_grad_() for p in params]
            reg = fastreg.Penalty(ps, backend="cpu", **settings)
            out = {}
            value = reg()
            assert ("PenaltyValueBackward" in type(value.grad_fn).__name__ + value.grad_fn.name()) == node
            (0.75 * value).backward()
            out["value"], out["deferred"] = value.detach(), [p.grad.clone() for p in ps]
            for p in ps:
                p.grad = None
            ps[0].register_hook(lambda g: g)  # a hook: the graph
            (0.75 * reg()).backward()
            out["graph"] = [p.grad.clone() for p in ps]
            vs = [torch.ones_like(p) for p in ps]
            grads = torch.autograd.grad(reg(), ps, create_graph=True)
            out["hvp"] = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), ps)
            out["first"] = [g.detach() for g in grads]
            results.append(out)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("centered", [False, True])
def test_the_node_and_the_function_agree_bitwise(monkeypatch, value_node, dtype, centered):
    if value_node == "function":
        pytest.skip("compares both itself")
    torch.manual_seed(0)
    params = [torch.randn(6, 4, dtype=dtype), torch.randn(5, dtype=dtype), torch.zeros(3, 2, dtype=dtype)]
    settings = dict(l1=L1, l2=L2, group=GROUP)
    if centered:
        settings["center"] = [torch.randn_like(p) for p in params]
    ours, python = _node_and_function(monkeypatch, params, **settings)
    for key in ours:
        a, b = ours[key], python[key]
        for x, y in (zip(a, b) if isinstance(a, (list, tuple)) else [(a, b)]):
            assert torch.equal(x, y), key


def test_the_node_releases_what_it_saved(value_node):
    """After a backward without retain_graph, a second one is an error (the saved params are
    released), as for any autograd node; with retain_graph it runs again."""
    p = torch.randn(4, 3, requires_grad=True)
    reg = fastreg.Penalty([p], l2=L2, backend="cpu")
    value = reg()
    value.backward(retain_graph=True)
    value.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        value.backward()
    value = reg()
    with torch.no_grad():
        p.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        value.backward()


def test_deferred_coefficients_round_as_the_aten_ops(deferred):
    """A float32 kernel group in a float64 penalty gets a float64 gradient of the value: its
    coefficients are double(table)·grad rounded to float32 (table.double().mul(grad).float()),
    the values the deferred addition uses."""
    from fastreg._plan import GRAD

    torch.manual_seed(0)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    reg = fastreg.Penalty([a, b], l1=L1, l2=L2, group=GROUP, backend="cpu")
    scale = torch.tensor(1 / 3, dtype=torch.float64)
    (reg() * scale).backward()
    assert len(deferred) == 2
    plan, coefficients = reg._plan, reg.coefficients()
    for kg, (groups, table) in zip(plan.local, plan.call(coefficients, GRAD)):
        grads = [torch.zeros_like(p) for p in kg.tensors]
        _, group_sq = _ops.plain_sums("cpu", kg.tensors, kg.centers, groups)
        _ops.add_grad_("cpu", kg.tensors, grads, kg.centers, groups, table.double().mul(scale).to(table.dtype),
                       group_sq.sqrt() if group_sq.numel() else None)
        for p, g in zip(kg.tensors, grads):
            assert torch.equal(p.grad, g)


def test_create_graph_after_fastreg_is_imported_again(value_node):
    """fastreg::value_graph_backward (the node's create_graph path) is registered once per
    process: importing fastreg again after its modules were dropped from sys.modules keeps it,
    and it runs the module as imported now."""
    if value_node == "function":
        pytest.skip("the node's path only")
    import subprocess
    import sys

    code = (
        "import sys, gc, torch\n"
        "import fastreg, fastreg._ops\n"
        "for name in [m for m in sys.modules if m.startswith('fastreg')]:\n"
        "    del sys.modules[name]\n"
        "gc.collect()\n"
        "import fastreg\n"
        "p = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)\n"
        "reg = fastreg.Penalty([p], l2=1e-2, group=1e-2, backend='cpu')\n"
        "g, = torch.autograd.grad(reg(), [p], create_graph=True)\n"
        "h, = torch.autograd.grad(g.sum(), [p])\n"
        "q = p.detach().requires_grad_()\n"
        "r, = torch.autograd.grad(1e-2 * q.square().sum() + 1e-2 * q.norm(dim=1).sum(), [q], create_graph=True)\n"
        "torch.testing.assert_close(h, torch.autograd.grad(r.sum(), [q])[0])\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("hooks", ["copying", "save_on_cpu"])
def test_saved_tensor_hooks(deferred, hooks):
    """Under saved-tensor hooks the backward unpacks another tensor than each param (a copy, or
    a new tensor over the same memory, carrying the param's AccumulateGrad): the deferred
    addition would write that tensor's .grad, never seen (it did before this check), so the
    gradient goes through the graph."""
    ours, theirs, reg = _pair()
    context = (torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t) if hooks == "copying"
               else torch.autograd.graph.save_on_cpu())
    with context:
        value = reg()
    (_task(ours) + value).backward()
    (_task(theirs) + _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)
    assert deferred == []


def test_non_reentrant_checkpointing(deferred):
    ours, theirs, reg = _pair()
    x = X.clone().requires_grad_()
    checkpoint(lambda x: _task_of(ours, x) + reg(), x, use_reentrant=False).backward()
    (_task_of(theirs, X) + _reference_penalty(theirs)).backward()
    _assert_same_grads(ours, theirs)


def _task_of(model, x):
    return model(x).square().mean()


def test_forward_mode_ad_is_refused_as_before():
    """The node has no jvp, as the autograd.Function it replaces (NotImplementedError), rather
    than a value without its tangent."""
    import torch.autograd.forward_ad as fwAD

    p = torch.randn(4, 3)
    with fwAD.dual_level():
        reg = fastreg.Penalty([fwAD.make_dual(p, torch.ones_like(p))], l2=L2, backend="cpu")
        with pytest.raises(NotImplementedError):
            reg()
