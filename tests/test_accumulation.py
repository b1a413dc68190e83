"""Gradient accumulation: the penalty belongs once per optimizer step, not once per micro-batch.

k micro-batches of ``loss / k`` give the full batch's mean-loss gradient. The penalty is not
a per-sample term: ``add_to_grad_()`` and ``prox_()`` run once, after the last micro-batch;
an autograd-mode penalty is either added once or divided by k like the loss. Each recipe is
checked against one full-batch step computed in float64 without fastreg.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastreg
import reference as ref

L1, L2, LR, K = 1e-2, 5e-2, 0.1, 3

# Tensors are made on torch's default device: the conftest ``backend`` fixture sets it to the
# backend's device (cuda for triton).


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    generator = torch.Generator().manual_seed(1)
    x, y = (torch.randn(shape, generator=generator, device="cpu") for shape in ((12, 16), (12, 4)))
    return model, x.to(torch.get_default_device()), y.to(torch.get_default_device())


def reference_step(model, x, y, l1=L1, l2=L2, lr=LR):
    """One float64 full-batch SGD step on ``mse + l1·Σ|w| + l2·Σw²`` (hand-written penalty)."""
    ref_model = copy.deepcopy(model).double()
    loss = F.mse_loss(ref_model(x.double()), y.double())
    penalty = sum(l1 * p.abs().sum() + l2 * (p * p).sum() for p in ref_model.parameters())
    (loss + penalty).backward()
    return [(p - lr * p.grad).detach() for p in ref_model.parameters()]


def reference_prox_step(model, x, y, l1=L1, l2=L2, lr=LR):
    """A float64 SGD step on the loss alone, then the proximal step of the penalty."""
    stepped = reference_step(model, x, y, l1=0.0, l2=0.0, lr=lr)
    return [ref.prox(w, lr, l1, l2) for w in stepped]


def micro_batches(x, y):
    return zip(x.chunk(K), y.chunk(K))


def params_close(model, expected):
    return all(torch.allclose(p.detach().double(), e, rtol=1e-6, atol=1e-7)
               for p, e in zip(model.parameters(), expected))


def assert_params_close(model, expected):
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)


def accumulate(model, x, y, penalty_term=None):
    """Backward of ``loss_i / k`` (plus ``penalty_term(i)``) over the k micro-batches."""
    for i, (xb, yb) in enumerate(micro_batches(x, y)):
        loss = F.mse_loss(model(xb), yb) / K
        if penalty_term is not None:
            loss = loss + penalty_term(i)
        loss.backward()


def test_add_to_grad_once_per_step_equals_the_full_batch_step(backend):
    model, x, y = model_and_batch()
    expected = reference_step(model, x, y)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad(set_to_none=True)
    accumulate(model, x, y)
    reg.add_to_grad_()  # once, after the last micro-batch
    optimizer.step()
    assert_params_close(model, expected)


def k_fold_setup(backend):
    """A model and batch, the right step and the k-fold-penalty step, a penalty, a zeroed SGD."""
    model, x, y = model_and_batch()
    right = reference_step(model, x, y)
    k_fold = reference_step(model, x, y, l1=K * L1, l2=K * L2)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad(set_to_none=True)
    return model, x, y, right, k_fold, reg, optimizer


def test_add_to_grad_per_micro_batch_applies_the_penalty_k_times(backend):
    model, x, y, right, k_fold, reg, optimizer = k_fold_setup(backend)
    for xb, yb in micro_batches(x, y):
        (F.mse_loss(model(xb), yb) / K).backward()
        reg.add_to_grad_()  # wrong place
    optimizer.step()
    assert_params_close(model, k_fold)
    assert not params_close(model, right)


@pytest.mark.parametrize("recipe", ["divided-by-k", "added-once"])
def test_autograd_penalty_in_an_accumulation_loop(backend, recipe):
    model, x, y = model_and_batch()
    expected = reference_step(model, x, y)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad(set_to_none=True)
    if recipe == "divided-by-k":  # (loss_i + penalty) / k
        accumulate(model, x, y, lambda i: reg() / K)
    else:  # the penalty in one micro-batch only
        accumulate(model, x, y, lambda i: reg() if i == 0 else 0.0)
    optimizer.step()
    assert_params_close(model, expected)


def test_undivided_autograd_penalty_in_an_accumulation_loop_is_k_fold(backend):
    model, x, y, right, k_fold, reg, optimizer = k_fold_setup(backend)
    accumulate(model, x, y, lambda i: reg())  # wrong: loss_i / k + penalty
    optimizer.step()
    assert_params_close(model, k_fold)
    assert not params_close(model, right)


def test_prox_once_per_step_equals_the_full_batch_proximal_step(backend):
    model, x, y = model_and_batch()
    expected = reference_prox_step(model, x, y)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    optimizer.zero_grad(set_to_none=True)
    accumulate(model, x, y)
    optimizer.step()
    reg.prox_(LR)  # once, after the step
    assert_params_close(model, expected)
    assert sum((p == 0).sum().item() for p in model.parameters()) > 0  # L1 gives exact zeros
    # Once per micro-batch would shrink k times as hard.
    for _ in range(K - 1):
        reg.prox_(LR)
    assert not params_close(model, expected)


def test_accumulated_steps_with_adamw_track_the_full_batch_steps(backend):
    # An optimizer with state, several steps: accumulation + add_to_grad_ once per step gives
    # the same trajectory as full batches with the penalty in the loss.
    model, x, y = model_and_batch()
    full = copy.deepcopy(model)
    reg = fastreg.Penalty(model, l1=L1, l2=L2, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    full_optimizer = torch.optim.AdamW(full.parameters(), lr=1e-2)
    for _ in range(4):
        optimizer.zero_grad(set_to_none=True)
        accumulate(model, x, y)
        reg.add_to_grad_()
        optimizer.step()
        full_optimizer.zero_grad(set_to_none=True)
        penalty = sum(L1 * p.abs().sum() + L2 * (p * p).sum() for p in full.parameters())
        (F.mse_loss(full(x), y) + penalty).backward()
        full_optimizer.step()
    for p, q in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
