"""The pure-PyTorch backend: what is specific to it is how it stays accurate (row reductions)."""

import pytest
import torch

import reference as ref
from fastreg.backends import torch as torch_backend


def test_40m_fp32_elements_are_summed_to_1e_7():
    # torch.norm / _foreach_norm are off by 5e-3 (L2) and 2e-2 (L1) here (DESIGN.md §2).
    w = torch.randn(40_000_003, generator=torch.Generator().manual_seed(5)) + 0.5
    sums = torch_backend.sums([w])
    exact = ref.sums([w])
    relative = ((sums.double() - exact) / exact).abs()
    assert (relative < 1e-7).all(), relative


@pytest.mark.parametrize("n", [1000, 16383, torch_backend.ROW_ELEMS * 7 + 1, torch_backend.SMALL_ELEMS - 1,
                               torch_backend.SMALL_ELEMS, torch_backend.PIECE_ELEMS * 2 + 5])
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_a_single_tensor_of_any_size_is_summed_to_1e_7(n, dtype):
    # _foreach_norm's L1 is off by 1.1e-6 already on one 1000-element fp32 tensor.
    params = [(torch.randn(n, generator=torch.Generator().manual_seed(n)) + 0.5).to(dtype)]
    rtol = 1e-14 if dtype == torch.float64 else 1e-7
    torch.testing.assert_close(torch_backend.sums(params).double(), ref.sums(params), rtol=rtol, atol=0)


def test_sums_do_not_depend_on_the_thread_count():
    params = ref.make_tensors([3_000_001, 70_000, 5, 0, 1000], torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch_backend.sums(params)
        torch.set_num_threads(2)
        two = torch_backend.sums(params)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
