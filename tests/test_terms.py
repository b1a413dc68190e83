"""The group-lasso and center terms through the public API, on every backend: the value, the
gradient (autograd, gradcheck, gradgradcheck), add_to_grad_, prox_ (exact zero groups, exact
w == c), the center forms and their errors, explain(), torch.compile without recompiles for
tensor coefficients, autocast, and determinism. Float64 references from tests/reference.py."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastreg
import reference as ref


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Conv1d(1, 1, 1), nn.Flatten(), nn.Linear(24, 5)).to(dtype)


def mlp(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).to(dtype)


# ------------------------------------------------------------------------------- group lasso

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("group_dim", [0, 1])
def test_group_value_gradient_and_add_to_grad(backend, group_dim, dtype):
    net = mlp(dtype)
    params = list(net.parameters())
    reg = fastreg.Penalty(net, l1=0.01, l2=0.1, group=0.3, group_dim=group_dim, backend=backend)
    value = reg()
    expected = ref.value(params, 0.01, 0.1, 0.3, group_dim)
    torch.testing.assert_close(value.double().item(), expected, rtol=ref.sum_rtol(dtype), atol=0)
    value.backward()
    for p in params:
        g = ref.grad(p, 0.01, 0.1, 0.3, group_dim)
        ref.assert_close_elementwise(p.grad, g, 0.01 + 0.3 + 2 * 0.1 * p.double().abs() + g.abs(), dtype, ulps=4)
    autograd = [p.grad.clone() for p in params]
    net.zero_grad(set_to_none=True)
    torch.testing.assert_close(reg.add_to_grad_().double().item(), expected, rtol=ref.sum_rtol(dtype), atol=0)
    for p, a in zip(params, autograd):
        torch.testing.assert_close(p.grad.double(), a.double(), rtol=8 * ref.eps(dtype), atol=8 * ref.eps(dtype))


def test_a_zero_group_has_zero_gradient(backend):
    w = nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
    with torch.no_grad():
        w[1] = 0
    fastreg.penalty([w], group=1.0, backend=backend).backward()
    assert torch.equal(w.grad[1], torch.zeros(6, dtype=torch.float64))
    assert torch.isfinite(w.grad).all()


@pytest.mark.parametrize("group_dim", [0, 1])
def test_gradcheck_and_gradgradcheck_with_groups_and_centers(backend, group_dim):
    params = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True) + 1,
              torch.randn(3, 4, 2, dtype=torch.float64).requires_grad_(),
              torch.randn(3, dtype=torch.float64, requires_grad=True)]
    centers = [torch.randn_like(p) * 0.1 for p in params]

    def fn(*tensors):
        return fastreg.penalty(list(tensors), l1=0.2, l2=0.3, group=0.4, group_dim=group_dim,
                               center=list(centers), backend=backend)

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_group_prox_zeroes_whole_groups_exactly(backend):
    torch.manual_seed(1)
    w = nn.Parameter(torch.randn(30, 8) * torch.linspace(0.05, 2, 30)[:, None])  # rows of growing norm
    before = w.detach().double().clone()
    reg = fastreg.Penalty([w], l1=0.05, l2=0.1, group=1.0, backend=backend)
    reg.prox_(0.5)
    expected = ref.prox(before, 0.5, 0.05, 0.1, 1.0, 0)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-7)
    zero_rows = (w == 0).all(dim=1)
    assert zero_rows.sum() >= 3 and torch.equal(zero_rows, (expected == 0).all(dim=1))
    s = fastreg.sparsity([("w", w)], group_dim=0)
    assert s.zero_groups == int(zero_rows.sum()) and s.groups == 30
    assert f"{int(zero_rows.sum())} of 30" in s.table()


def test_group_dim_is_validated_and_explained():
    with pytest.raises(ValueError, match="group_dim must be 0 .*, 1 .* or None"):
        fastreg.Penalty(mlp(), group=0.1, group_dim=2)
    with pytest.raises(ValueError, match="group_dim"):
        fastreg.Penalty(mlp(), group=0.1, group_dim=True)
    with pytest.raises(ValueError, match="group must be finite"):
        fastreg.Penalty(mlp(), group=-1.0)
    table = fastreg.Penalty(mlp(), group=0.1, group_dim=1).explain()
    assert "9 (columns)" in table and "none (ndim < 2)" in table and "group=0.1 (group_dim=1)" in table


def test_group_coefficient_tensor_does_not_recompile(backend):
    net = mlp(torch.float32)
    group = torch.tensor(0.1)
    reg = fastreg.Penalty(net, l2=1e-3, group=group, backend=backend)
    compiles = []

    def counting(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(lambda x: net(x).square().mean() + reg(), backend=counting, fullgraph=True)
    x = torch.randn(4, 6)
    for value in (0.1, 0.2, 0.05):
        group.fill_(value)
        expected = net(x).square().mean().item() + ref.value(list(net.parameters()), 0, 1e-3, value, 0)
        torch.testing.assert_close(step(x).item(), expected, rtol=1e-5, atol=1e-6)
    assert len(compiles) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_group_term_of_half_precision_weights_is_accumulated_in_fp32(backend, dtype):
    w = torch.full((4, 70000), 0.5, dtype=dtype)  # a 16-bit accumulator would saturate
    value = fastreg.penalty([w], group=1.0, backend=backend)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.item(), 4 * (70000 * 0.25) ** 0.5, rtol=1e-6, atol=0)
    with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        assert fastreg.penalty([w], group=1.0, backend=backend).item() == value.item()


# --------------------------------------------------------------------------------- centers

def test_center_init_mapping_and_sequence_agree(backend):
    net = mlp()
    pretrained = {k: v.clone() for k, v in net.state_dict().items()}
    snapshot = fastreg.Penalty(net, l2=1.0, group=0.5, center="init", backend=backend)
    mapping = fastreg.Penalty(net, l2=1.0, group=0.5, center=pretrained, backend=backend)
    sequence = fastreg.Penalty(net, l2=1.0, group=0.5, center=list(pretrained.values()), backend=backend)
    assert snapshot().item() == mapping().item() == sequence().item() == 0.0
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.25)
    expected = ref.value(list(net.parameters()), 0, 1.0, 0.5, 0, centers=list(pretrained.values()))
    for reg in (snapshot, mapping, sequence):
        torch.testing.assert_close(reg().item(), expected, rtol=1e-12, atol=0)


def test_a_parameter_missing_from_the_mapping_is_pulled_toward_zero(backend):
    net = mlp()
    pretrained = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("0.")}  # a new head "2.*"
    reg = fastreg.Penalty(net, l2=1.0, center=pretrained, backend=backend)
    expected = ref.value(list(net.parameters())[2:], 0, 1.0)  # the head toward 0, the body at its center
    torch.testing.assert_close(reg().item(), expected, rtol=1e-12, atol=0)
    table = reg.explain()
    assert "given" in table and "none (not in mapping)" in table and "centered" in table


def test_center_prox_lands_exactly_on_the_center(backend):
    w = nn.Parameter(torch.randn(20, 10))
    c = w.detach() + 0.01 * torch.randn(20, 10)
    c[:5] += 3.0  # far from the center: those rows keep a difference
    reg = fastreg.Penalty([w], l1=1.0, group=2.0, center=[c], backend=backend)
    before = w.detach().double().clone()
    reg.prox_(0.1)
    expected = ref.prox(before, 0.1, 1.0, 0.0, 2.0, 0, c)
    torch.testing.assert_close(w.detach().double(), expected, rtol=1e-6, atol=1e-6)
    landed = expected == c.double()
    assert landed.sum() > 100 and torch.equal(w.detach()[landed], c[landed])  # exactly w == c


def test_centers_are_converted_once_and_kept(backend):
    w = nn.Parameter(torch.randn(8, 3))
    c64 = torch.randn(8, 3, dtype=torch.float64)
    reg = fastreg.Penalty([w], l2=1.0, center=[c64], backend=backend)
    stored = reg._plan.local[0].centers[0]
    assert stored.dtype == torch.float32 and stored.device == w.device and stored.stride() == w.stride()
    reg()
    reg.add_to_grad_()
    assert reg._plan.local[0].centers[0] is stored  # never re-copied per call
    c64.add_(1.0)  # a snapshot: later changes to the given tensor do not leak in
    torch.testing.assert_close(reg().item(), ref.value([w], 0, 1.0, centers=[c64 - 1.0]), rtol=1e-6, atol=0)


def test_center_errors_name_the_parameter():
    net = mlp()
    with pytest.raises(ValueError, match=r"center of parameter '0.weight' has shape \(9,\), the parameter \(9, 6\)"):
        fastreg.Penalty(net, l2=1.0, center={"0.weight": torch.zeros(9)})
    with pytest.raises(TypeError, match="center of parameter '0.bias' has dtype torch.int64"):
        fastreg.Penalty(net, l2=1.0, center={"0.bias": torch.zeros(9, dtype=torch.int64)})
    with pytest.raises(ValueError, match="center has 3 tensors"):
        fastreg.Penalty(net, l2=1.0, center=[torch.zeros(1)] * 3)
    with pytest.raises(ValueError, match="center must be None, 'init'"):
        fastreg.Penalty(net, l2=1.0, center="pretrained")
    with pytest.raises(ValueError, match="snapshot the weights at every call"):
        fastreg.penalty(net, l2=1.0, center="init")


def test_center_under_torch_compile_fullgraph(backend):
    net = mlp(torch.float32)
    reg = fastreg.Penalty(net, l2=torch.tensor(1e-2), center="init", backend=backend)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(1.5)
    x = torch.randn(4, 6)
    torch._dynamo.reset()
    step = torch.compile(lambda x: F.mse_loss(net(x), torch.zeros(4, 4)) + reg(), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(step(x), F.mse_loss(net(x), torch.zeros(4, 4)) + reg(), rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_results_are_bitwise_repeatable_with_groups_and_centers(backend):
    params = ref.make_tensors([(300, 200), (64, 3, 3, 3), 1001], torch.float32)
    centers = [p + 0.1 for p in params]
    reg = fastreg.Penalty(params, l1=0.1, l2=0.2, group=0.3, group_dim=1, center=centers, backend=backend)
    first = reg()
    assert all(torch.equal(reg(), first) for _ in range(3))
