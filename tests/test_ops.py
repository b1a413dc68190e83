"""The torch.library registration: opcheck on the op and its backward, for every backend, with and
without centers and groups; the eager fast path must agree with the op bitwise."""

import pytest
import torch

import reference as ref
from fastreg import _ops
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups, group_sizes

MIXED = "mixed"  # a structure per tensor: blocks of rows, the whole tensor, none


def _structure(params, group_dim):
    """``(group_dims, group_sizes)`` lists for the op: one group_dim for all, or MIXED."""
    if group_dim == MIXED:
        dims = [(0 if p.ndim >= 2 and p.shape[0] % 2 == 0 else WHOLE) if i % 2 == 0 else NO_GROUPS
                for i, p in enumerate(params)]
        sizes = [2 if d == 0 else 1 for d in dims]
        return dims, sizes
    groups = Groups.uniform(params, group_dim)
    return list(groups.dims), list(groups.sizes)


def _groups():
    return {
        "small": [torch.randn(3, 4), torch.randn(0), torch.randn(7)],
        "large+noncontiguous": [torch.randn(300, 70).t(), torch.randn(20000)],
        "fp64": [torch.randn(5, 5, dtype=torch.float64)],
        "bf16": [torch.randn(33, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16)],
    }


def _centers(params, centered):
    return [torch.randn_like(p) for p in params] if centered else []


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1, MIXED])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums(backend, group, centered, group_dim):
    params = [p.requires_grad_() for p in _groups()[group]]
    torch.library.opcheck(_ops.sums, (params, _centers(params, centered), *_structure(params, group_dim), backend, 0))


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 1, MIXED])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums_backward(backend, group, centered, group_dim):
    params = _groups()[group]
    acc = torch.float64 if group == "fp64" else torch.float32
    grad_sums = torch.rand(len(params), 2, dtype=acc)  # each tensor's own [c1, c2]
    dims, sizes = _structure(params, group_dim)
    groups = sum(group_sizes(params, Groups(tuple(dims), tuple(sizes))))
    scale = torch.rand(groups, dtype=acc) if groups else None
    torch.library.opcheck(_ops.sums_backward, (params, _centers(params, centered), dims, sizes, grad_sums, scale,
                                               backend, 0))


def test_the_op_matches_the_reference(backend):
    params = ref.make_tensors([100, 0, 5000, (30, 40)], torch.float32)
    centers = [torch.randn_like(p) for p in params]
    sums, group_sq = _ops.sums(params, centers, *_structure(params, 0), backend, 0)
    assert sums.shape == (len(params), 3)
    torch.testing.assert_close(sums.double().sum(dim=0), ref.sums(params, centers, 0), rtol=1e-6, atol=0)
    torch.testing.assert_close(group_sq.double(), ref.group_sq(params, 0, centers), rtol=1e-6, atol=0)


def test_compile_sees_one_opaque_op_without_graph_breaks(backend):
    params = [torch.randn(10, 10, requires_grad=True), torch.randn(10, requires_grad=True)]

    @torch.compile(fullgraph=True, backend="eager")
    def step():
        s, _ = _ops.sums(params, [], [1, NO_GROUPS], [1, 1], backend, 0)
        return (s * torch.tensor([0.1, 0.2, 0.3])).sum()

    torch.testing.assert_close(step().item(), ref.value(params, 0.1, 0.2, 0.3, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("group_dim", [NO_GROUPS, 0, 1, MIXED])
@pytest.mark.parametrize("centered", [False, True], ids=["plain", "centered"])
def test_eager_fast_path_and_the_op_agree_bitwise(backend, centered, group_dim):
    params = [torch.randn(40, 30).requires_grad_(), torch.randn(20000).requires_grad_(),
              torch.randn(0).requires_grad_()]
    centers = _centers(params, centered)
    coeffs = torch.rand(len(params), 3)  # each tensor's own coefficients
    dims, sizes = _structure(params, group_dim)
    via_op = _ops.sums(params, centers, dims, sizes, backend, 0)
    via_eager = _ops.penalty_sums(params, centers, Groups(tuple(dims), tuple(sizes)), backend)
    assert torch.equal(via_op[0], via_eager[0]) and torch.equal(via_op[1], via_eager[1])
    grads_op = torch.autograd.grad((via_op[0] * coeffs).sum(), params)
    grads_eager = torch.autograd.grad((via_eager[0] * coeffs).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(grads_op, grads_eager))
