"""The backend contract (fastreg/backends/__init__.py), checked on every available backend."""

import pytest
import torch

import reference as ref
from fastreg import _dispatch

L1, L2 = 0.3, 0.7

SIZE_CASES = {
    "empty": [0],
    "one": [1],
    "65535": [65535],
    "65537": [65537],
    "chunk-edges-with-empties": [0, 65536, 0, 1, 65535, 0, 65537, 3],
    "555-and-7777x77": [555, 7777 * 77],
    "4000-tensors": None,  # built below: 4000 small tensors, some empty
}


def _sizes(case):
    if case == "4000-tensors":
        generator = torch.Generator().manual_seed(1)
        return torch.randint(0, 40, (4000,), generator=generator).tolist()
    return SIZE_CASES[case]


def _coeffs(a, b, dtype):
    return torch.tensor([a, b], dtype=_dispatch.acc_dtype(dtype))


def _backend(name):
    return _dispatch.backend(name)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", list(SIZE_CASES))
def test_sums(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype)
    sums = _backend(backend).sums(params)
    assert sums.shape == (2,) and sums.dtype == _dispatch.acc_dtype(dtype)
    torch.testing.assert_close(sums.double(), ref.sums(params), rtol=ref.sum_rtol(dtype), atol=0)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_grads(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype)
    grads = _backend(backend).grads(params, _coeffs(L1, L2, dtype))
    assert len(grads) == len(params)
    for p, g in zip(params, grads):
        ref.assert_close_elementwise(g, ref.grad(p, L1, L2), L1 + 2 * L2 * p.double().abs(), dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_add_grad_(backend, case, dtype):
    params = ref.make_tensors(_sizes(case), dtype, seed=0)
    grads = ref.make_tensors(_sizes(case), dtype, seed=1)
    before = [g.to(torch.float64, copy=True) for g in grads]
    storages = [g.data_ptr() for g in grads]
    sums = _backend(backend).add_grad_(params, grads, _coeffs(L1, L2, dtype))
    torch.testing.assert_close(sums.double(), ref.sums(params), rtol=ref.sum_rtol(dtype), atol=0)
    assert [g.data_ptr() for g in grads] == storages
    for p, g, g0 in zip(params, grads, before):
        scale = g0.abs() + L1 + 2 * L2 * p.double().abs()
        ref.assert_close_elementwise(g, g0 + ref.grad(p, L1, L2), scale, dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("case", ["one", "chunk-edges-with-empties", "4000-tensors"])
def test_prox_(backend, case, dtype):
    lr, threshold = 0.5, 0.25  # threshold = lr * l1 with l1 = 0.5; denominator 1 + 2*lr*l2, l2 = 0.3
    params = ref.make_tensors(_sizes(case), dtype)
    originals = [p.clone() for p in params]
    _backend(backend).prox_(params, _coeffs(threshold, 1 + 2 * lr * 0.3, dtype))
    for p, w in zip(params, originals):
        expected = ref.prox(w, lr, l1=0.5, l2=0.3)
        ref.assert_close_elementwise(p, expected, w.double().abs(), dtype)
        magnitude = w.double().abs()
        assert (p[magnitude < threshold * 0.99] == 0).all(), "L1 prox must give exact zeros"
        assert (p[magnitude > threshold * 1.01] != 0).all()


def _non_contiguous(dtype):
    base = torch.randn(64, 96, dtype=torch.float64)
    return [
        base.to(dtype).t(),                       # dense, transposed
        torch.randn(50, 40, dtype=torch.float64).to(dtype)[:, ::3],  # strided slice
        torch.randn(3, 70000, dtype=torch.float64).to(dtype)[:, 1:],  # large, row-strided
        torch.randn(5, dtype=torch.float64).to(dtype).expand(4, 5)[1:].contiguous().t(),
    ]


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_non_contiguous(backend, dtype):
    impl = _backend(backend)
    params = _non_contiguous(dtype)
    assert not any(p.is_contiguous() for p in params)
    torch.testing.assert_close(impl.sums(params).double(), ref.sums(params), rtol=ref.sum_rtol(dtype), atol=0)

    coeffs = _coeffs(L1, L2, dtype)
    for p, g in zip(params, impl.grads(params, coeffs)):
        ref.assert_close_elementwise(g, ref.grad(p, L1, L2), L1 + 2 * L2 * p.double().abs(), dtype)

    grads = [torch.randn_like(p.t().contiguous()).t() for p in params]  # grads non-contiguous too
    before = [g.to(torch.float64, copy=True) for g in grads]
    impl.add_grad_(params, grads, coeffs)
    for p, g, g0 in zip(params, grads, before):
        scale = g0.abs() + L1 + 2 * L2 * p.double().abs()
        ref.assert_close_elementwise(g, g0 + ref.grad(p, L1, L2), scale, dtype)

    originals = [p.clone() for p in params]
    impl.prox_(params, _coeffs(0.1, 1.5, dtype))  # lr=1, l1=0.1, l2=0.25
    for p, w in zip(params, originals):
        ref.assert_close_elementwise(p, ref.prox(w, 1.0, l1=0.1, l2=0.25), w.double().abs(), dtype)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_sums_are_deterministic(backend, dtype):
    params = ref.make_tensors([1000] * 50 + [300_001], dtype)
    first = _backend(backend).sums(params)
    for _ in range(3):
        assert torch.equal(_backend(backend).sums(params), first)
