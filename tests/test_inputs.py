"""No silent wrong number: inputs that used to give garbage, regularize nothing or crash inside
torch now work or fail with a clear error naming the parameter (issue 10, part 1)."""

import warnings

import pytest
import torch
from torch import nn

import fastreg
import reference as ref


# --------------------------------------------------------------------- gradients of another dtype

@pytest.mark.parametrize("grad_dtype", ref.DTYPES, ids=str)
@pytest.mark.parametrize("dtype", ref.DTYPES, ids=str)
def test_add_to_grad_updates_a_gradient_of_another_dtype_in_its_own_dtype(backend, dtype, grad_dtype):
    # torch >= 2.10: p.grad_dtype = None lets a parameter hold a gradient of any dtype (how fp32
    # gradient accumulation for bf16 weights works). Each backend must read g in its own dtype.
    w = nn.Parameter(torch.randn(257, 3, dtype=torch.float64).to(dtype))
    w.grad_dtype = None
    w.grad = torch.randn(257, 3, dtype=torch.float64).to(grad_dtype)
    before = w.grad.to(torch.float64, copy=True)
    value = fastreg.Penalty([w], l1=0.25, l2=1.0, group=0.5, backend=backend).add_to_grad_()
    assert w.grad.dtype == grad_dtype
    expected = before + ref.grad(w, 0.25, 1.0, 0.5, group_dim=0)
    scale = before.abs() + 0.25 + 2 * w.double().abs() + 0.5
    tolerance = ref.eps(grad_dtype) * expected.abs() + 4 * ref.eps(dtype if dtype != torch.float64 else dtype) * scale
    assert ((w.grad.double() - expected).abs() <= tolerance + 1e-30).all()
    torch.testing.assert_close(value.item(), ref.value([w], 0.25, 1.0, 0.5, 0), rtol=ref.sum_rtol(dtype), atol=0)


def test_the_issue_reproduction_fp64_gradient_of_an_fp32_weight(backend):
    w = torch.randn(10, requires_grad=True)
    w.grad_dtype = None
    w.grad = torch.zeros(10, dtype=torch.float64)
    fastreg.Penalty([w], l2=1.0, backend=backend).add_to_grad_()
    assert w.grad.dtype == torch.float64
    torch.testing.assert_close(w.grad, 2 * w.detach().double(), rtol=1e-7, atol=0)


def test_bf16_weights_with_fp32_gradients_first_class(backend):
    # The mixed-precision case: the update is formed in fp32 and never rounded to bf16.
    model = nn.Linear(64, 48).to(torch.bfloat16)
    for p in model.parameters():
        p.grad_dtype = torch.float32
    model(torch.randn(5, 64, dtype=torch.bfloat16)).float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    before = [p.grad.clone() for p in model.parameters()]
    fastreg.Penalty(model, l2=1e-3, backend=backend).add_to_grad_()
    for p, g0 in zip(model.parameters(), before):
        expected = g0.double() + 2e-3 * p.double()
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad.double(), expected, rtol=2 * ref.eps(torch.float32), atol=1e-12)


def test_a_missing_gradient_is_created_in_the_parameters_grad_dtype(backend):
    w = nn.Parameter(torch.randn(30, dtype=torch.bfloat16))
    w.grad_dtype = torch.float32
    fastreg.Penalty([w], l2=1.0, backend=backend).add_to_grad_()
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.double(), 2 * w.double(), rtol=1e-7, atol=0)


def test_a_gradient_of_another_shape_is_an_error_naming_the_parameter(backend):
    # p.grad's setter checks shapes, but replacing p.data afterwards leaves a stale .grad.
    model = nn.Linear(4, 3)
    model.weight.grad = torch.zeros(3, 4)
    model.weight.data = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"'weight' has shape \(5, 4\) but its \.grad has shape \(3, 4\)"):
        fastreg.Penalty(model, l2=1.0, backend=backend).add_to_grad_()


# --------------------------------------------------------------------------- iterators, bad tensors

def test_an_exhausted_iterator_warns_at_the_users_line():
    model = nn.Linear(3, 2)
    params = model.parameters()
    torch.optim.SGD(params, lr=0.1)  # consumes the generator
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = fastreg.Penalty(params, l2=1.0)
    messages = [w for w in caught if "yielded no tensors" in str(w.message)]
    assert len(messages) == 1 and messages[0].filename == __file__
    assert reg.named_parameters() == []


def test_an_empty_list_is_not_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fastreg.penalty([], l2=1.0).item() == 0.0


def test_a_meta_parameter_is_a_value_error_naming_it():
    model = nn.Linear(3, 2, device="meta")
    with pytest.raises(ValueError, match=r"parameter 'weight' is on the meta device"):
        fastreg.Penalty(model, l2=1.0)


def test_a_sparse_parameter_is_a_type_error_naming_it():
    s = torch.randn(3, 3).to_sparse().requires_grad_()
    with pytest.raises(TypeError, match=r"parameter 'emb' is a torch.sparse_coo tensor"):
        fastreg.penalty([("emb", s)], l2=1.0)


def test_an_integer_parameter_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"parameter 'steps' has integer/bool dtype torch.int64"):
        fastreg.penalty([("steps", torch.zeros(3, dtype=torch.int64))], l2=1.0)
