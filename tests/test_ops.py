"""The torch.library registration: opcheck on the op and its backward, for every backend, with and
without centers and groups; the eager fast path must agree with the op bitwise."""

import pytest
import torch

import reference as ref
from fastreg import _ops
from fastreg.backends._geometry import NO_GROUPS


def _groups():
    return {
        "small": [torch.randn(3, 4), torch.randn(0), torch.randn(7)],
        "large+noncontiguous": [torch.randn(300, 70).t(), torch.randn(20000)],
        "fp64": [torch.randn(5, 5, dtype=torch.float64)],
        "bf16": [torch.randn(33, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16)],
    }


def _centers(params, centered):
    return [torch.randn_like(p) for p in params] if centered else []


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums(backend, group, centered, group_dim):
    params = [p.requires_grad_() for p in _groups()[group]]
    torch.library.opcheck(_ops.sums, (params, _centers(params, centered), group_dim, backend, 0))


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums_backward(backend, group, centered, group_dim):
    params = _groups()[group]
    acc = torch.float64 if group == "fp64" else torch.float32
    grad_sums = torch.tensor([0.3, 0.7], dtype=acc)
    groups = sum(p.shape[group_dim] for p in params if p.ndim >= 2) if group_dim >= 0 else 0
    scale = torch.rand(groups, dtype=acc) if groups else None
    torch.library.opcheck(_ops.sums_backward, (params, _centers(params, centered), group_dim, grad_sums, scale,
                                               backend, 0))


def test_the_op_matches_the_reference(backend):
    params = ref.make_tensors([100, 0, 5000, (30, 40)], torch.float32)
    centers = [torch.randn_like(p) for p in params]
    sums, group_sq = _ops.sums(params, centers, 0, backend, 0)
    torch.testing.assert_close(sums.double(), ref.sums(params, centers, 0), rtol=1e-6, atol=0)
    torch.testing.assert_close(group_sq.double(), ref.group_sq(params, 0, centers), rtol=1e-6, atol=0)


def test_compile_sees_one_opaque_op_without_graph_breaks(backend):
    params = [torch.randn(10, 10, requires_grad=True), torch.randn(10, requires_grad=True)]

    @torch.compile(fullgraph=True, backend="eager")
    def step():
        s, _ = _ops.sums(params, [], 1, backend, 0)
        return 0.1 * s[0] + 0.2 * s[1] + 0.3 * s[2]

    torch.testing.assert_close(step().item(), ref.value(params, 0.1, 0.2, 0.3, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_eager_fast_path_and_the_op_agree_bitwise(backend, centered, group_dim):
    params = [torch.randn(40, 30).requires_grad_(), torch.randn(20000).requires_grad_(),
              torch.randn(0).requires_grad_()]
    centers = _centers(params, centered)
    coeffs = torch.tensor([0.3, 0.7, 0.2])
    via_op = _ops.sums(params, centers, group_dim, backend, 0)
    via_eager = _ops.penalty_sums(params, centers, group_dim, backend)
    assert torch.equal(via_op[0], via_eager[0]) and torch.equal(via_op[1], via_eager[1])
    grads_op = torch.autograd.grad((via_op[0] * coeffs).sum(), params)
    grads_eager = torch.autograd.grad((via_eager[0] * coeffs).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(grads_op, grads_eager))
