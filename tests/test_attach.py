"""``Penalty.attach(optimizer)``: the penalty inside ``optimizer.step()``, step for step equal to
the explicit loops (float64, so "equal" is to 1e-12)."""

import math

import pytest
import torch
from torch import nn

import fastreg

L2, LR = 5e-2, 0.1


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n=6):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
             torch.randn(16, 3, generator=generator, dtype=torch.float64)) for _ in range(n)]


def _train(model, optimizer, batches, scheduler=None, after_step=None, clip=None):
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


def _assert_same(a, b, tol=1e-12):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_grad_mode_equals_sgd_weight_decay_step_for_step(backend, momentum):
    batches = _batches()
    reference = _model()
    wd = torch.optim.SGD(reference.parameters(), lr=LR, momentum=momentum, weight_decay=fastreg.l2_to_weight_decay(L2))
    expected = _train(reference, wd, batches, clip=1.0)

    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)
    handle = fastreg.Penalty(model, l2=L2, backend=backend).attach(sgd)
    got = _train(model, sgd, batches, clip=1.0)  # clipping before the hook, as with weight_decay
    _assert_same(got, expected)
    assert handle.attached and handle.mode == "grad"


def test_prox_mode_equals_the_manual_loop_with_a_scheduler_and_two_param_groups(backend):
    batches = _batches()

    def setup():
        model = _model()
        optimizer = torch.optim.SGD([{"params": model[0].parameters(), "lr": LR},
                                     {"params": model[2].parameters(), "lr": LR / 4}], lr=LR)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
        return model, optimizer, scheduler

    model, optimizer, scheduler = setup()
    regs = [fastreg.Penalty(model[0], l1=0.3, l2=L2, backend=backend),
            fastreg.Penalty(model[2], l1=0.3, l2=L2, backend=backend)]

    def manual_prox():  # each group's own lr at this step
        for reg, group in zip(regs, optimizer.param_groups):
            reg.prox_(group["lr"])

    expected = _train(model, optimizer, batches, scheduler, after_step=manual_prox)

    model, optimizer, scheduler = setup()
    handle = fastreg.Penalty(model, l1=0.3, l2=L2, backend=backend).attach(optimizer, mode="prox")
    got = _train(model, optimizer, batches, scheduler)
    _assert_same(got, expected)
    assert any((p == 0).any() for p in got)  # L1's prox gives exact zeros
    assert handle.last_value is not None


def test_grad_mode_under_grad_scaler_with_a_fused_optimizer(backend):
    """A fused optimizer unscales inside its own kernel (GradScaler hands it ``grad_scale``):
    the pre-hook sees scaled gradients and must add the penalty's gradient scaled too; the
    value it reports is the penalty's own."""
    model = _model().float()
    try:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, fused=True)
    except (RuntimeError, ValueError) as exc:  # pragma: no cover - a torch without fused CPU SGD
        pytest.skip(f"fused SGD: {exc}")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    reg = fastreg.Penalty(model, l1=1e-2, l2=0.5, backend=backend)
    handle = reg.attach(optimizer)
    x, y = (t.float() for t in _batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    grads = [p.grad.clone() / scaler.get_scale() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    for p, g, w0 in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.detach(), w0 - LR * (g + 1e-2 * torch.sign(w0) + 2 * 0.5 * w0), rtol=1e-5,
                                   atol=1e-6)
    expected = sum(1e-2 * w.abs().sum() + 0.5 * w.square().sum() for w in before)
    torch.testing.assert_close(handle.last_value, expected, rtol=1e-5, atol=0)


def test_a_step_skipped_by_grad_scaler_runs_no_hook(backend):
    model = _model().float()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    grad_handle = fastreg.Penalty(model, l2=L2, backend=backend).attach(optimizer)
    prox_handle = fastreg.Penalty(model, l1=1.0, backend=backend).attach(optimizer, mode="prox")
    x, y = (t.float() for t in _batches(1)[0])
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = math.inf  # an overflow: the scaler skips the step
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert grad_handle.last_value is None and prox_handle.last_value is None  # neither hook ran

    optimizer.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    grads = [p.grad.clone() / scaler.get_scale() for p in model.parameters()]
    scaler.step(optimizer)  # unscales, then steps: the pre-hook sees unscaled gradients
    scaler.update()
    for p, g, w0 in zip(model.parameters(), grads, before):
        step = w0 - LR * (g + 2 * L2 * w0)
        shrunk = torch.sign(step) * torch.clamp(step.abs() - LR * 1.0, min=0)
        torch.testing.assert_close(p.detach(), shrunk, rtol=1e-5, atol=1e-6)
    assert grad_handle.last_value is not None


def test_remove_stops_it_and_allows_attaching_again(backend):
    batches = _batches(3)
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    reg = fastreg.Penalty(model, l2=L2, backend=backend)
    handle = reg.attach(sgd)
    with pytest.raises(RuntimeError, match="already attached"):
        reg.attach(sgd)
    handle.remove()
    handle.remove()  # idempotent
    assert not handle.attached
    plain = _model()
    expected = _train(plain, torch.optim.SGD(plain.parameters(), lr=LR), batches)
    _assert_same(_train(model, sgd, batches), expected)  # no penalty any more
    reg.attach(sgd, mode="prox")  # a new attachment after remove()


def test_last_value_is_the_penalty_at_the_latest_step(backend):
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=LR)
    reg = fastreg.Penalty(model, l1=0.1, l2=L2, backend=backend)
    handle = reg.attach(sgd)
    assert handle.last_value is None
    x, y = _batches(1)[0]
    nn.functional.mse_loss(model(x), y).backward()
    before = reg().detach()
    sgd.step()
    assert not handle.last_value.requires_grad
    torch.testing.assert_close(handle.last_value, before, rtol=1e-12, atol=0)

    prox = fastreg.Penalty(model, l1=0.1, backend=backend)
    prox_handle = prox.attach(sgd, mode="prox")
    sgd.step()
    torch.testing.assert_close(prox_handle.last_value, prox().detach(), rtol=1e-12, atol=0)


def test_bad_attachments_are_clear_errors():
    model = _model()
    sgd = torch.optim.SGD(model[0].parameters(), lr=LR)
    reg = fastreg.Penalty(model, l1=0.1)
    with pytest.raises(ValueError, match="mode must be 'grad'.*or 'prox'"):
        reg.attach(sgd, mode="decay")
    with pytest.raises(ValueError, match=r"parameter\(s\) '2.weight', '2.bias' are in none of the optimizer"):
        reg.attach(sgd, mode="prox")
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        reg.attach(object())


def test_a_zero_learning_rate_group_is_left_alone(backend):
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    fastreg.Penalty(model, l1=10.0, backend=backend).attach(optimizer, mode="prox")
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
