"""The torch.library registration: opcheck on the op and its backward, for every backend."""

import pytest
import torch

import reference as ref
from fastreg import _ops


def _groups():
    return {
        "small": [torch.randn(3, 4), torch.randn(0), torch.randn(7)],
        "large+noncontiguous": [torch.randn(300, 70).t(), torch.randn(20000)],
        "fp64": [torch.randn(5, 5, dtype=torch.float64)],
        "bf16": [torch.randn(33, dtype=torch.bfloat16)],
    }


@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums(backend, group):
    params = [p.requires_grad_() for p in _groups()[group]]
    torch.library.opcheck(_ops.sums, (params, backend))


@pytest.mark.parametrize("group", list(_groups()))
def test_opcheck_sums_backward(backend, group):
    params = _groups()[group]
    grad_sums = torch.tensor([0.3, 0.7], dtype=torch.float64 if group == "fp64" else torch.float32)
    torch.library.opcheck(_ops.sums_backward, (params, grad_sums, backend))


def test_the_op_matches_the_reference(backend):
    params = ref.make_tensors([100, 0, 5000], torch.float32)
    torch.testing.assert_close(_ops.sums(params, backend).double(), ref.sums(params), rtol=1e-6, atol=0)


def test_compile_sees_one_opaque_op_without_graph_breaks(backend):
    params = [torch.randn(10, 10, requires_grad=True), torch.randn(10, requires_grad=True)]

    @torch.compile(fullgraph=True, backend="eager")
    def step():
        s = _ops.sums(params, backend)
        return 0.1 * s[0] + 0.2 * s[1]

    torch.testing.assert_close(step().item(), ref.value(params, 0.1, 0.2), rtol=1e-6, atol=0)


def test_eager_fast_path_and_the_op_agree_bitwise(backend):
    params = [torch.randn(40, 30).requires_grad_(), torch.randn(20000).requires_grad_(), torch.randn(0).requires_grad_()]
    coeffs = torch.tensor([0.3, 0.7])
    via_op = _ops.sums(params, backend)
    via_eager = _ops.penalty_sums(params, backend)
    assert torch.equal(via_op, via_eager)
    grads_op = torch.autograd.grad((via_op * coeffs).sum(), params)
    grads_eager = torch.autograd.grad((via_eager * coeffs).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(grads_op, grads_eager))
