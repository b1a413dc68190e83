"""Mixed precision: the penalty under autocast, and with torch.amp.GradScaler.

* Under ``torch.autocast`` the penalty is computed from the parameters' own dtype, accumulated
  in fp32, and returned in fp32: autocast changes nothing.
* GradScaler, autograd mode: the penalty is part of the loss, so it is scaled with it.
* GradScaler, ``add_to_grad_``: it writes unscaled gradients, so it belongs after
  ``scaler.unscale_(optimizer)``.

References are float64 and computed without fastreg (``reference.py`` and hand-written steps).
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastreg
import reference as ref

L1, L2, LR = 1e-2, 5e-2, 0.1
SCALE = 2.0 ** 10

# Tensors are made on torch's default device: the conftest ``backend`` fixture sets it to the
# backend's device (cuda for triton).


def device_type():
    return torch.get_default_device().type


def model_and_batch(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randn(shape, generator=generator, device="cpu") for shape in ((12, 16), (12, 4)))
    return model, x.to(torch.get_default_device()), y.to(torch.get_default_device())


def reference_grads(model, x, y, l1=L1, l2=L2):
    """Float64 gradients of ``mse + l1·Σ|w| + l2·Σw²``, with a hand-written penalty."""
    ref_model = copy.deepcopy(model).double()
    loss = F.mse_loss(ref_model(x.double()), y.double())
    penalty = sum(l1 * p.abs().sum() + l2 * (p * p).sum() for p in ref_model.parameters())
    (loss + penalty).backward()
    return [p.grad for p in ref_model.parameters()]


def reference_sgd_step(model, x, y, l1=L1, l2=L2, lr=LR):
    return [p.detach().double() - lr * g for p, g in zip(model.parameters(), reference_grads(model, x, y, l1, l2))]


def assert_params_close(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ autocast

def test_autocast_fp32_params_give_the_same_fp32_value_and_grads(backend):
    model, x, y = model_and_batch()
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    outside = reg()
    outside_grads = torch.autograd.grad(outside, list(model.parameters()))
    with torch.autocast(device_type(), dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16  # autocast is on
        inside = reg()
        loss = F.mse_loss(out.float(), y) + inside
    assert inside.dtype == torch.float32 and loss.dtype == torch.float32
    assert torch.equal(inside, outside)  # bitwise: autocast does not touch the penalty
    inside_grads = torch.autograd.grad(inside, list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(inside_grads, outside_grads))
    torch.testing.assert_close(inside.item(), ref.value(list(model.parameters()), L1, L2), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_low_precision_params_give_an_fp32_value(backend, dtype):
    model, x, _ = model_and_batch(dtype)
    params = list(model.parameters())
    outside = fastreg.penalty(model, l1=L1, l2=L2, backend=backend)
    with torch.autocast(device_type(), dtype=torch.bfloat16):
        inside = fastreg.penalty(model, l1=L1, l2=L2, backend=backend)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, outside)
    # Exact low-precision inputs, fp32 accumulation: within fp32 rounding of the float64 sum.
    torch.testing.assert_close(inside.item(), ref.value(params, L1, L2), rtol=ref.sum_rtol(dtype), atol=0)
    inside.backward()
    for p in params:
        assert p.grad.dtype == dtype
        ref.assert_close_elementwise(p.grad, ref.grad(p, L1, L2), L1 + 2 * L2 * p.double().abs(), dtype)


def test_autocast_add_to_grad_is_unchanged(backend):
    model, _, _ = model_and_batch()
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    outside_value = reg.add_to_grad_()
    outside = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type(), dtype=torch.bfloat16):
        inside_value = reg.add_to_grad_()
    assert inside_value.dtype == torch.float32 and torch.equal(inside_value, outside_value)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), outside))


# ------------------------------------------------------------------ GradScaler

def make_scaler():
    return torch.amp.GradScaler(device_type(), init_scale=SCALE)


def test_grad_scaler_scales_the_autograd_penalty_with_the_loss(backend):
    model, x, y = model_and_batch()
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = make_scaler()
    expected_grads = reference_grads(model, x, y)
    expected_params = reference_sgd_step(model, x, y)

    loss = F.mse_loss(model(x), y) + reg()
    scaler.scale(loss).backward()
    for p, g in zip(model.parameters(), expected_grads):  # scaled, penalty included
        torch.testing.assert_close(p.grad.double(), SCALE * g, rtol=1e-6, atol=SCALE * 1e-7)
    scaler.unscale_(optimizer)
    for p, g in zip(model.parameters(), expected_grads):  # unscaled
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-6, atol=1e-7)
    scaler.step(optimizer)
    scaler.update()
    assert_params_close(model, expected_params)


def run_scaled_steps(model, x, y, reg, order, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = make_scaler()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(F.mse_loss(model(x), y)).backward()
        if order == "before-unscale":  # wrong: adds an unscaled gradient to scaled ones
            reg.add_to_grad_()
        scaler.unscale_(optimizer)
        if order == "after-unscale":
            reg.add_to_grad_()
        scaler.step(optimizer)
        scaler.update()


def test_add_to_grad_after_unscale_equals_the_reference_step(backend):
    model, x, y = model_and_batch()
    reference_model = copy.deepcopy(model)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    run_scaled_steps(model, x, y, reg, "after-unscale", steps=3)
    # Reference: three plain SGD steps on loss + hand-written penalty, no scaler, in float64.
    for _ in range(3):
        new = reference_sgd_step(reference_model, x, y)
        with torch.no_grad():
            for p, e in zip(reference_model.parameters(), new):
                p.copy_(e)
    assert_params_close(model, [p.detach().double() for p in reference_model.parameters()])


def test_add_to_grad_before_unscale_is_wrong(backend):
    # Documents the order: before unscale_, the penalty gradient ends up divided by the scale.
    model, x, y = model_and_batch()
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    expected_right = reference_sgd_step(model, x, y)
    expected_wrong = reference_sgd_step(model, x, y, l1=L1 / SCALE, l2=L2 / SCALE)
    run_scaled_steps(model, x, y, reg, "before-unscale", steps=1)
    assert_params_close(model, expected_wrong)
    assert not all(torch.allclose(p.detach().double(), e, rtol=1e-4, atol=1e-5)
                   for p, e in zip(model.parameters(), expected_right))
