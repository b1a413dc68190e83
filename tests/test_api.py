"""fastreg.penalty / fastreg.Penalty against float64 references, on every available backend."""

import pytest
import torch
from torch import nn

import fastreg
import reference as ref


def seed_mlp(dtype=torch.float32):
    """The seed article's SimpleNet: 10-20-1."""
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 1)).to(dtype)


def seed_loop_l2(model):
    reg = torch.tensor(0.0, requires_grad=True, dtype=torch.float64)
    for p in model.parameters():
        reg = reg + torch.norm(p.double()) ** 2
    return reg


def seed_loop_l1(model):
    reg = torch.tensor(0.0, requires_grad=True, dtype=torch.float64)
    for p in model.parameters():
        reg = reg + torch.abs(p.double()).sum()
    return reg


@pytest.mark.parametrize("l1, l2", [(0.0, 1e-3), (1e-3, 0.0), (2e-3, 5e-3)], ids=["l2", "l1", "elastic"])
def test_value_and_grad_match_the_seed_loops(backend, l1, l2):
    model = seed_mlp()
    value = fastreg.penalty(model, l1=l1, l2=l2, backend=backend)
    assert value.dtype == torch.float32 and value.ndim == 0
    expected = l1 * seed_loop_l1(model) + l2 * seed_loop_l2(model)
    torch.testing.assert_close(value.double(), expected.detach(), rtol=1e-6, atol=0)
    value.backward()
    for p in model.parameters():
        ref.assert_close_elementwise(p.grad, ref.grad(p, l1, l2), l1 + 2 * l2 * p.double().abs(), p.dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("sizes", [[0], [1], [65535], [65537], [3, 0, 65536, 0, 7]], ids=str)
def test_dtypes_and_sizes(backend, dtype, sizes):
    params = [p.requires_grad_() for p in ref.make_tensors(sizes, dtype)]
    value = fastreg.penalty(params, l1=0.25, l2=0.5, backend=backend)
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(value.item(), ref.value(params, 0.25, 0.5), rtol=ref.sum_rtol(dtype), atol=0)
    grads = torch.autograd.grad(value, params)
    for p, g in zip(params, grads):
        ref.assert_close_elementwise(g, ref.grad(p, 0.25, 0.5), 0.25 + p.double().abs(), dtype)


def test_4000_tensors(backend):
    sizes = torch.randint(0, 50, (4000,), generator=torch.Generator().manual_seed(3)).tolist()
    params = [p.requires_grad_() for p in ref.make_tensors(sizes, torch.float32)]
    value = fastreg.penalty(params, l2=1e-2, backend=backend)
    torch.testing.assert_close(value.item(), ref.value(params, 0, 1e-2), rtol=1e-6, atol=0)
    value.backward()
    assert all(torch.equal(p.grad, (2 * 1e-2 * p).detach()) or
               torch.allclose(p.grad, 2e-2 * p.detach(), rtol=2e-7, atol=0) for p in params)


def test_non_contiguous_parameters(backend):
    params = [nn.Parameter(torch.randn(30, 40).t()), nn.Parameter(torch.randn(20, 30)[:, ::2])]
    value = fastreg.penalty(params, l1=0.1, l2=0.2, backend=backend)
    torch.testing.assert_close(value.item(), ref.value(params, 0.1, 0.2), rtol=1e-6, atol=0)
    value.backward()
    for p in params:
        ref.assert_close_elementwise(p.grad, ref.grad(p, 0.1, 0.2), 0.1 + 0.4 * p.double().abs(), p.dtype)


def test_shared_parameters_count_once(backend):
    model = seed_mlp()
    tied = nn.ModuleDict({"a": model[0], "b": model[0]})  # the same Linear twice
    expected = ref.value(list(model[0].parameters()), 0, 1.0)
    torch.testing.assert_close(fastreg.penalty(tied, l2=1.0, backend=backend).item(), expected, rtol=1e-6, atol=0)
    weight = model[0].weight
    torch.testing.assert_close(fastreg.penalty([weight, weight], l2=1.0, backend=backend).item(),
                               ref.value([weight], 0, 1.0), rtol=1e-6, atol=0)


def test_frozen_parameters_are_not_regularized(backend):
    model = seed_mlp()
    model[0].weight.requires_grad_(False)
    value = fastreg.penalty(model, l2=1.0, backend=backend)
    expected = ref.value([p for p in model.parameters() if p.requires_grad], 0, 1.0)
    torch.testing.assert_close(value.item(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("grad_preset", [False, True], ids=["grad-None", "grad-set"])
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_add_to_grad_matches_autograd(backend, grad_preset, dtype):
    model = nn.Sequential(nn.Linear(33, 65), nn.Linear(65, 3)).to(dtype)
    reg = fastreg.Penalty(model, l1=0.01, l2=0.2, backend=backend)
    initial = {}
    for name, p in model.named_parameters():
        if grad_preset:
            p.grad = torch.randn_like(p)
        initial[name] = p.grad.to(torch.float64, copy=True) if grad_preset else torch.zeros_like(p, dtype=torch.float64)
    value = reg.add_to_grad_()
    assert not value.requires_grad
    torch.testing.assert_close(value.item(), ref.value(list(model.parameters()), 0.01, 0.2),
                               rtol=ref.sum_rtol(dtype), atol=0)
    for name, p in model.named_parameters():
        expected = initial[name] + ref.grad(p, 0.01, 0.2)
        scale = initial[name].abs() + 0.01 + 0.4 * p.double().abs()
        ref.assert_close_elementwise(p.grad, expected, scale, dtype)


def test_add_to_grad_equals_backward_of_the_value(backend):
    model = seed_mlp()
    reg = fastreg.Penalty(model, l1=1e-2, l2=1e-2, backend=backend)
    reg().backward()
    autograd = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    reg.add_to_grad_()
    for a, p in zip(autograd, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=2e-7, atol=1e-9)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_prox_matches_the_formula_and_gives_exact_zeros(backend, dtype):
    params = [nn.Parameter(t) for t in ref.make_tensors([1000, 65537, 0, 1], dtype)]
    originals = [p.detach().clone() for p in params]
    reg = fastreg.Penalty(params, l1=0.5, l2=0.1, backend=backend)
    reg.prox_(lr=0.8)  # threshold 0.4, denominator 1.16
    for p, w in zip(params, originals):
        ref.assert_close_elementwise(p.detach(), ref.prox(w, 0.8, 0.5, 0.1), w.double().abs(), dtype)
        assert (p[w.double().abs() < 0.39] == 0).all()
    zeros = sum((p == 0).sum().item() for p in params)
    assert zeros > 0.25 * sum(p.numel() for p in params)


def test_prox_with_l1_only_is_soft_thresholding(backend):
    w = torch.tensor([-2.0, -0.5, -0.1, 0.0, 0.1, 0.5, 2.0])
    p = nn.Parameter(w.clone())
    fastreg.Penalty([p], l1=1.0, backend=backend).prox_(0.5)
    assert torch.equal(p.detach(), torch.tensor([-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5]))


def test_gradcheck(backend):
    params = [torch.randn(7, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(3, dtype=torch.float64, requires_grad=True),
              torch.randn(4, 6, dtype=torch.float64).t().requires_grad_()]
    fn = lambda *ts: fastreg.penalty(list(ts), l1=0.3, l2=0.7, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_gradient_flows_to_tensor_coefficients(backend):
    params = [torch.randn(50, requires_grad=True), torch.randn(4, 4, requires_grad=True)]
    l1 = torch.tensor(0.1, requires_grad=True)
    l2 = torch.tensor(0.2, requires_grad=True)
    fastreg.penalty(params, l1=l1, l2=l2, backend=backend).backward()
    s = ref.sums(params)
    torch.testing.assert_close(l1.grad.double(), s[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(l2.grad.double(), s[1], rtol=1e-6, atol=0)


def test_tensor_coefficients_can_change_in_place(backend):
    params = [torch.randn(100, requires_grad=True)]
    l2 = torch.tensor(1.0)
    reg = fastreg.Penalty(params, l2=l2, backend=backend)
    first = reg().item()
    l2.fill_(3.0)
    torch.testing.assert_close(reg().item(), 3 * first, rtol=1e-6, atol=0)
    reg.l2 = 0.5
    torch.testing.assert_close(reg().item(), 0.5 * first, rtol=1e-6, atol=0)


def test_forward_does_not_modify_parameters(backend):
    model = seed_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    fastreg.penalty(model, l1=1.0, l2=1.0, backend=backend)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_usable_twice_in_one_graph_and_with_autograd_grad(backend):
    model = seed_mlp()
    loss = fastreg.penalty(model, l2=1.0, backend=backend) + fastreg.penalty(model, l1=1.0, backend=backend)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for p, g in zip(model.parameters(), grads):
        ref.assert_close_elementwise(g, ref.grad(p, 1.0, 1.0), 1 + 2 * p.double().abs(), p.dtype)


def test_repeated_calls_are_bitwise_equal(backend):
    params = ref.make_tensors([1000] * 300 + [123_457], torch.float32)
    reg = fastreg.Penalty(params, l1=0.1, l2=0.3, backend=backend)
    first = reg()
    assert all(torch.equal(reg(), first) for _ in range(3))


def test_mixed_dtypes_are_grouped_and_summed(backend):
    params = [torch.randn(10, dtype=torch.float32), torch.randn(20, dtype=torch.float64),
              torch.randn(30, dtype=torch.bfloat16)]
    value = fastreg.penalty(params, l2=1.0, backend=backend)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value.item(), ref.value(params, 0, 1.0), rtol=1e-6, atol=0)


def test_half_precision_is_accumulated_in_fp32(backend):
    # 70000 copies of 1.0 in fp16: a fp16 accumulator would stop at 2048.
    params = [torch.ones(70000, dtype=torch.float16)]
    value = fastreg.penalty(params, l1=1.0, backend=backend)
    assert value.dtype == torch.float32 and value.item() == 70000.0


def test_empty_selection_is_zero(backend):
    value = fastreg.penalty([], l2=1.0, backend=backend)
    assert value.item() == 0.0 and value.ndim == 0
    model = nn.Sequential(nn.ReLU())
    assert fastreg.Penalty(model, l1=1.0, backend=backend).add_to_grad_().item() == 0.0


def test_penalty_does_not_return_nan_for_a_dropped_term(backend):
    params = [torch.tensor([float("inf"), 1.0])]
    assert fastreg.penalty(params, l2=1.0, backend=backend).item() == float("inf")


def test_named_parameters_and_explain():
    model = seed_mlp()
    reg = fastreg.Penalty(model, l2=1e-4, exclude="bias_and_norm")
    assert [name for name, _ in reg.named_parameters()] == ["0.weight", "2.weight"]
    assert all(t is dict(model.named_parameters())[name] for name, t in reg.named_parameters())
    table = reg.explain()
    assert "0.bias" in table and "no: bias_and_norm" in table
    assert "regularized: 2 tensors, 220 elements" in table
    assert "excluded:    2 tensors, 21 elements" in table


def test_l2_to_weight_decay():
    assert fastreg.l2_to_weight_decay(1e-4) == 2e-4
    with pytest.raises(ValueError, match="l2"):
        fastreg.l2_to_weight_decay(-1.0)


def test_second_derivative_for_the_coefficients_in_half_precision(backend):
    # Σ 2·w over 100k fp16 weights overflows fp16: the dot products must accumulate in fp32.
    coefficient = torch.tensor(0.3, requires_grad=True)
    w = (torch.rand(100_000, generator=torch.Generator().manual_seed(0)) + 0.5).half().requires_grad_()
    (g,) = torch.autograd.grad(fastreg.penalty([w], l1=coefficient, l2=coefficient, backend=backend), w,
                               create_graph=True)
    (second,) = torch.autograd.grad(g.float().sum(), coefficient)
    expected = (torch.sign(w.double()) + 2 * w.double()).sum()
    torch.testing.assert_close(second.double(), expected, rtol=1e-5, atol=0)


def test_zero_coefficients_give_zero_even_when_the_sums_overflow(backend):
    assert fastreg.penalty([torch.tensor([1e20, 1.0])], backend=backend).item() == 0.0


def test_one_call_penalty_is_cached_and_never_stale(backend, monkeypatch):
    from fastreg import api

    builds = []
    original = api.Plan

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(api, "Plan", counting)
    model = seed_mlp()
    first = fastreg.penalty(model, l2=1.0, backend=backend).item()
    assert fastreg.penalty(model, l2=1.0, backend=backend).item() == first
    assert fastreg.penalty(model, l2=2.0, backend=backend).item() == pytest.approx(2 * first, rel=1e-6)
    assert len(builds) == 1  # the plan was reused; coefficients are per call
    expected = lambda: ref.value([p for p in model.parameters() if p.requires_grad], 0, 1.0)  # noqa: E731

    model[0].weight = nn.Parameter(torch.randn(20, 10))  # a new parameter object
    torch.testing.assert_close(fastreg.penalty(model, l2=1.0, backend=backend).item(), expected(), rtol=1e-6, atol=0)
    model[0].bias.requires_grad_(False)  # frozen: no longer selected
    torch.testing.assert_close(fastreg.penalty(model, l2=1.0, backend=backend).item(), expected(), rtol=1e-6, atol=0)
    model[2].weight.data = torch.randn(1, 20) * 3  # new storage behind the same object
    torch.testing.assert_close(fastreg.penalty(model, l2=1.0, backend=backend).item(), expected(), rtol=1e-6, atol=0)
    assert len(builds) == 4

    calls = []
    exclude = lambda name, t: calls.append(name) or False  # noqa: E731  (a callable: never cached)
    fastreg.penalty(model, l2=1.0, exclude=exclude, backend=backend)
    fastreg.penalty(model, l2=1.0, exclude=exclude, backend=backend)
    assert len(calls) == 2 * sum(p.requires_grad for p in model.parameters())  # frozen ones are not asked
    fastreg.penalty(model, l2=1.0, exclude=["*.bias"], backend=backend)
    fastreg.penalty(model, l2=1.0, exclude=["*.bias"], backend=backend)
    assert len(builds) == 7  # two callable calls, one list build, one hit


def test_the_eager_backward_is_exact_on_every_path(backend):
    # Every way of asking autograd for the gradient sees exactly the penalty's gradient:
    # .backward() (creating and accumulating p.grad), autograd.grad, create_graph, hooks,
    # inputs=, and a task gradient reaching the same leaves.
    model = seed_mlp(torch.float64)
    reg = fastreg.Penalty(model, l1=1e-2, l2=0.3, group=0.2, backend=backend)
    params = list(model.parameters())
    expected = [ref.grad(p, 1e-2, 0.3, 0.2, 0) for p in params]

    def check(grads, extra=None):
        for i, (g, e) in enumerate(zip(grads, expected)):
            target = e if extra is None else e + extra[i]
            torch.testing.assert_close(g.double(), target, rtol=1e-12, atol=1e-14)

    model.zero_grad(set_to_none=True)
    reg().backward()  # p.grad None: created
    check([p.grad for p in params])
    reg().backward()  # p.grad set: accumulated in place
    check([p.grad for p in params], expected)
    check(torch.autograd.grad(reg(), params))  # p.grad untouched by autograd.grad
    check([p.grad for p in params], expected)
    first = torch.autograd.grad(reg(), params, create_graph=True)
    assert all(g.requires_grad for g in first)
    check(first)
    seen = []
    handle = params[0].register_hook(lambda g: seen.append(g.clone()))
    model.zero_grad(set_to_none=True)
    reg().backward()
    handle.remove()
    check(seen[:1] + [p.grad for p in params[1:]])  # the hook saw the full gradient
    model.zero_grad(set_to_none=True)
    reg().backward(inputs=params[:2])
    check([p.grad for p in params[:2]])
    assert all(p.grad is None for p in params[2:])
    # The task loss reaches the same parameters: the engine adds its gradient after the penalty's.
    model.zero_grad(set_to_none=True)
    x = torch.randn(8, 10, dtype=torch.float64)
    task = model(x).square().sum()
    task_grads = torch.autograd.grad(task, params, retain_graph=True)
    (task + reg()).backward()
    check([p.grad for p in params], [g.double() for g in task_grads])


def test_gradients_keep_their_grad_dtype(backend):
    w = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
    w.grad_dtype = torch.float32
    reg = fastreg.Penalty([w], l2=0.5, backend=backend)
    for _ in range(3):
        w.grad = None
        reg().backward()
        assert w.grad.dtype == torch.float32
        torch.testing.assert_close(w.grad, w.detach().float(), rtol=0, atol=0)  # 2·0.5·w, exact in fp32


