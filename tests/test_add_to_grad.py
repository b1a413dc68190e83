"""``add_to_grad_`` in one call per kernel group (a penalty with one param group on the cpu
backend: ``csrc/add_to_grad.cpp``, through ``_ops.add_to_grad_value``) is the Python path
(``grads_of``, ``_ops.add_grad_``, ``_ops.weighted_total``) bitwise: the value, every ``p.grad``
(created where None, in its ``grad_dtype``, with ``zeros_like``'s strides), the version counters;
where it declines (a gradient the Python path refuses, or several gradient dtypes) it writes
nothing, and the Python path raises the error naming the parameter, or makes the call."""

import pytest
import torch
from torch import nn

import fastreg
from fastreg import _ops
from fastreg.backends import cpu

pytestmark = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="the C++ CPU backend is not built")


@pytest.fixture
def one_calls(monkeypatch):
    """What each call of the backend's one-call entry returned (None: it declined)."""
    returned = []
    entry = cpu.add_to_grad

    def recorded(*args):
        out = entry(*args)
        returned.append(out)
        return out

    monkeypatch.setattr(cpu, "add_to_grad", recorded)
    return returned


def _python_path(monkeypatch):
    monkeypatch.setattr(_ops, "add_to_grad_value", lambda *args: None)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1)).to(dtype)


def _case(name):
    """``(params, penalty keyword arguments)`` of one case, freshly made (same values each time)."""
    torch.manual_seed(1)
    if name == "grads-none":
        return list(_mlp().parameters()), {"l1": 0.03, "l2": 0.1}
    if name == "grads-held":
        params = list(_mlp().parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        return params, {"l1": 0.03, "l2": 0.1}
    if name == "non-contiguous":  # a transposed param, a strided gradient, a transposed gradient
        w = nn.Parameter(torch.randn(7, 5).t())
        v = nn.Parameter(torch.randn(9, 4))
        v.grad = torch.randn(9, 8)[:, ::2]
        u = nn.Parameter(torch.randn(6, 3))
        u.grad = torch.randn(3, 6).t()
        return [w, v, u], {"l2": 0.5, "l1": 0.25}
    if name == "bf16-fp32-grads":  # fp32 gradients of bf16 weights, created and held
        params = list(_mlp(torch.bfloat16).parameters())
        for p in params:
            p.grad_dtype = torch.float32
        params[0].grad = torch.randn(params[0].shape)
        return params, {"l2": 0.1}
    if name == "fp16":
        return list(_mlp(torch.float16).parameters()), {"l1": 0.5}
    if name == "fp64-center-groups":
        params = list(_mlp(torch.float64).parameters())
        return params, {"l2": 0.1, "group": 0.2, "group_dim": 0,
                        "center": [torch.randn_like(p.detach()) for p in params]}
    if name == "empty-and-one":
        return [nn.Parameter(torch.randn(0, 3)), nn.Parameter(torch.randn(1)), nn.Parameter(torch.randn(65537))], \
            {"l1": 0.1, "l2": 0.2}
    if name == "two-kernel-groups":  # fp32 and fp64 params: one call each
        return [nn.Parameter(torch.randn(33)), nn.Parameter(torch.randn(5, 3, dtype=torch.float64))], {"l2": 0.3}
    if name == "grad-dtypes-mixed":  # declined: two gradient dtypes in one kernel group
        a, b = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(4))
        a.grad_dtype = None
        a.grad = torch.randn(8, dtype=torch.float64)
        return [a, b], {"l2": 0.3}
    raise AssertionError(name)


CASES = ["grads-none", "grads-held", "non-contiguous", "bf16-fp32-grads", "fp16", "fp64-center-groups",
         "empty-and-one", "two-kernel-groups", "grad-dtypes-mixed"]
DECLINED = {"grad-dtypes-mixed"}


def _run(name):
    params, kwargs = _case(name)
    held = [p.grad for p in params]
    versions = [None if g is None else g._version for g in held]
    value = fastreg.Penalty(params, backend="cpu", **kwargs).add_to_grad_()
    for p, g, v in zip(params, held, versions):
        if g is not None:
            assert p.grad is g and g._version > v  # written in place, its version bumped
    return value, [p.grad for p in params]


@pytest.mark.parametrize("name", CASES)
def test_one_call_is_the_python_path_bitwise(monkeypatch, one_calls, name):
    value, grads = _run(name)
    assert len(one_calls) >= 1 and all((out is None) == (name in DECLINED) for out in one_calls)
    with monkeypatch.context() as m:
        _python_path(m)
        want_value, want_grads = _run(name)
    assert value.dtype == want_value.dtype and value.requires_grad is False
    assert torch.equal(value, want_value) or (value.isnan() and want_value.isnan())
    for g, want in zip(grads, want_grads):
        assert g.dtype == want.dtype and g.stride() == want.stride()
        assert torch.equal(g, want)


def test_it_is_taken_once_per_kernel_group_and_matches_float64(one_calls):
    params, kwargs = _case("two-kernel-groups")
    value = fastreg.Penalty(params, backend="cpu", **kwargs).add_to_grad_()
    assert len(one_calls) == 2 and all(out is not None for out in one_calls)
    exact = sum(0.3 * p.detach().double().square().sum() for p in params)
    torch.testing.assert_close(value.double(), exact, rtol=1e-6, atol=0)
    for p in params:
        torch.testing.assert_close(p.grad.double(), 0.6 * p.detach().double(), rtol=1e-6, atol=0)


def _sparse(p):
    p.grad = torch.randn(p.shape).to_sparse()


def _stale_shape(p):
    p.grad = torch.zeros(p.shape)
    p.data = torch.zeros(p.shape[0] + 1, *p.shape[1:])


def _inference(p):
    with torch.inference_mode():
        p.grad = torch.zeros(p.shape)


@pytest.mark.parametrize("spoil, error, match", [
    (_sparse, TypeError, "'1.weight' has a torch.sparse_coo gradient"),
    (_stale_shape, ValueError, r"'1.weight' has shape \(2, 3\) but its \.grad has shape \(1, 3\)"),
    (_inference, RuntimeError, "inference tensor"),
])
def test_a_refused_gradient_writes_nothing_and_names_the_parameter(one_calls, spoil, error, match):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
    held = model[0].weight.grad = torch.ones(3, 4)
    spoil(model[1].weight)
    with pytest.raises(error, match=match):
        fastreg.Penalty(model, l2=0.1, backend="cpu").add_to_grad_()
    assert one_calls == [None]  # the one call declined, the Python path raised
    assert torch.equal(held, torch.ones(3, 4)) and held._version == 0
    assert model[0].bias.grad is None and model[1].bias.grad is None


def _non_leaf():
    w = torch.randn(4, 3, requires_grad=True)
    return [w * 2]  # (a non-leaf: the Python path reads its grad_dtype, which only a leaf has)


def _negated_grad():
    w = nn.Parameter(torch.randn(4, 3))
    w.grad = torch.randn(4, 3)._neg_view()  # a lazily negated gradient
    return [w]


@pytest.mark.parametrize("make", [_non_leaf, _negated_grad], ids=["non-leaf", "negated-grad"])
def test_the_one_call_declines_what_the_python_path_refuses(monkeypatch, one_calls, make):
    def outcome():
        try:
            return fastreg.Penalty(make(), l2=0.5, backend="cpu").add_to_grad_()
        except Exception as exc:  # noqa: BLE001 (the outcome compared is the error itself)
            return type(exc), str(exc).splitlines()[0]

    got = outcome()
    assert one_calls == [None]
    with monkeypatch.context() as m:
        _python_path(m)
        want = outcome()
    assert isinstance(got, tuple) and got == want  # the same error, from the same path
