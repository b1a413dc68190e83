"""The pure-PyTorch backend: what is specific to it is how it stays accurate (row reductions)."""

import pytest
import torch

import reference as ref
from fastreg.backends import torch as torch_backend
from fastreg.backends._geometry import NO_GROUPS, ROW_ELEMS


def l1_l2(params, centers=None, group_dim=NO_GROUPS):
    """The sums of all the tensors (the backend returns one row per tensor)."""
    return torch_backend.sums(params, centers, group_dim)[0].double().sum(dim=0)


def test_40m_fp32_elements_are_summed_to_1e_7():
    # torch.norm / _foreach_norm are off by 5e-3 (L2) and 2e-2 (L1) here (DESIGN.md §2).
    w = torch.randn(40_000_003, generator=torch.Generator().manual_seed(5)) + 0.5
    sums = l1_l2([w])[:2]
    exact = ref.sums([w])[:2]
    relative = ((sums.double() - exact) / exact).abs()
    assert (relative < 1e-7).all(), relative


@pytest.mark.parametrize("n", [1000, 16383, ROW_ELEMS * 7 + 1, torch_backend.SMALL_ELEMS - 1,
                               torch_backend.SMALL_ELEMS, torch_backend.PIECE_ELEMS * 2 + 5])
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_a_single_tensor_of_any_size_is_summed_to_1e_7(n, dtype):
    # _foreach_norm's L1 is off by 1.1e-6 already on one 1000-element fp32 tensor.
    params = [(torch.randn(n, generator=torch.Generator().manual_seed(n)) + 0.5).to(dtype)]
    rtol = 1e-14 if dtype == torch.float64 else 1e-7
    torch.testing.assert_close(l1_l2(params).double(), ref.sums(params), rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", [(3, ROW_ELEMS * 5 + 7), (ROW_ELEMS * 3 + 1, 2), (1, 300_000)])
def test_groups_longer_than_a_row_are_summed_to_1e_7(shape):
    params = [torch.randn(shape, generator=torch.Generator().manual_seed(1)) + 0.5]
    for group_dim in (0, 1):
        sums, group_sq = torch_backend.sums(params, None, group_dim)
        torch.testing.assert_close(sums.double()[0], ref.sums(params, group_dim=group_dim), rtol=1e-7, atol=0)
        # group_sq is returned in fp32: its rounding (and that of each square) is 1.2e-7 at most
        torch.testing.assert_close(group_sq.double(), ref.group_sq(params, group_dim), rtol=3e-7, atol=0)


def test_sums_do_not_depend_on_the_thread_count():
    params = ref.make_tensors([3_000_001, 70_000, 5, 0, 1000, (40_000, 3), (3, 40_000)], torch.float32)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append([torch_backend.sums(params, None, gd) for gd in (NO_GROUPS, 0, 1)])
    finally:
        torch.set_num_threads(before)
    for (a, b), (c, d) in zip(*results):
        assert torch.equal(a, c) and torch.equal(b, d)


def test_add_grad_with_given_norms_and_no_sums_wanted_makes_no_sums_pass(monkeypatch):
    from fastreg.backends import torch as backend

    calls = []
    original = backend.sums
    monkeypatch.setattr(backend, "sums", lambda *a, **k: calls.append(1) or original(*a, **k))
    params = [torch.randn(6, 5), torch.randn(7)]
    grads = [torch.zeros_like(p) for p in params]
    coeffs = torch.tensor([0.1, 0.2, 0.3])
    backend.add_grad_(params, grads, None, 0, coeffs, torch.ones(6), want_sums=False)
    assert calls == []
    backend.add_grad_(params, grads, None, 0, coeffs, None, want_sums=False)  # norms needed: one pass
    assert calls == [1]
