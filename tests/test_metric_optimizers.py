"""``attach(optimizer, mode="prox")`` in the optimizer's metric with the ways torch's Adam and
AdamW are run: ``foreach`` / ``fused`` implementations (the state layout: ``step`` a tensor,
float32 for fused), ``maximize``, param groups with their own betas / eps / lr, steps that
``torch.amp.GradScaler`` skips, and parameters the optimizer has no state for yet.

The reference is independent of fastreg: a twin model stepped by a plain optimizer (no hook), then
the L1 proximal step in its metric by hand in float64 from that optimizer's state,
``D = √(exp_avg_sq / (1 − β₂ᵗ)) + ε`` and ``x = sign(y)·max(D·|y| − lr·l1, 0)/D``. Every check
also asserts that the Euclidean step (``max(|y| − lr·l1, 0)``) or another group's metric would
have failed it, so a hook that ignored the metric could not pass."""

import math

import pytest
import torch
from torch import nn

import fastreg

L1, LR, STEPS = 0.05, 0.05, 3
IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _batches(n=STEPS):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=generator, dtype=torch.float64),
             torch.randn(16, 3, generator=generator, dtype=torch.float64)) for _ in range(n)]


def _optimizer(cls, params, **kwargs):
    try:
        return cls(params, **kwargs)
    except (RuntimeError, ValueError) as exc:  # a torch without this implementation on the CPU
        pytest.skip(f"{cls.__name__}({kwargs}) cannot be built here: {exc}")


def _backward(model, batch, scaler=None, poison=False):
    x, y = batch
    loss = nn.functional.mse_loss(model(x), y)
    (loss if scaler is None else scaler.scale(loss)).backward()
    if poison:
        model[0].weight.grad[0, 0] = math.inf  # an overflow: the scaler skips this step


def _hand_metric_prox(optimizer, l1=L1):
    """The L1 step in the optimizer's metric, in float64, from its state; returns the weights
    before it (``y``) and the Euclidean step of them, per parameter."""
    before, euclidean = [], []
    with torch.no_grad():
        for group in optimizer.param_groups:
            beta2, eps, lr = group["betas"][1], group["eps"], float(group["lr"])
            for p in group["params"]:
                state = optimizer.state[p]
                t = float(state["step"])
                d = (state["exp_avg_sq"].double() / (1 - beta2 ** t)).sqrt() + eps
                y = p.detach().double().clone()
                p.copy_(torch.sign(y) * torch.clamp(d * y.abs() - lr * l1, min=0) / d)
                before.append(y)
                euclidean.append(torch.sign(y) * torch.clamp(y.abs() - lr * l1, min=0))
    return before, euclidean


def _assert_close_but_not_euclidean(got_params, want_params, euclidean):
    got = [p.detach() for p in got_params]
    for g, w in zip(got, want_params):
        torch.testing.assert_close(g, w.detach(), rtol=1e-12, atol=1e-12)
    # the metric matters: the Euclidean step differs, and L1 leaves some weights and zeroes others
    assert max((g - e).abs().max().item() for g, e in zip(got, euclidean)) > 1e-3
    zeros = sum(int((g == 0).sum()) for g in got)
    assert 0 < zeros < sum(g.numel() for g in got)


@pytest.mark.parametrize("maximize", [False, True], ids=["minimize", "maximize"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_step_is_the_l1_step_in_adams_metric(name, implementation, maximize):
    # maximize=True: the optimizer ascends the loss; the penalty is still a cost on the weights
    # (the composite step ascends loss − l1·‖w‖₁), so its proximal step still shrinks toward zero,
    # with the same metric (v is the running mean of g², whatever the sign of the step).
    cls, kwargs = OPTIMIZERS[name], dict(lr=LR, maximize=maximize, **IMPLEMENTATIONS[implementation])
    model, twin = _model(), _model()
    optimizer, reference = _optimizer(cls, model.parameters(), **kwargs), _optimizer(cls, twin.parameters(), **kwargs)
    handle = fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    for batch in _batches():
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad(set_to_none=True)
            _backward(m, batch)
            opt.step()
        _, euclidean = _hand_metric_prox(reference)
        _assert_close_but_not_euclidean(model.parameters(), list(twin.parameters()), euclidean)
    assert handle._steps == STEPS


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_each_param_group_steps_in_its_own_metric_and_lr(implementation):
    def groups(model):
        return [{"params": model[0].parameters(), "lr": LR, "betas": (0.9, 0.999), "eps": 1e-8},
                {"params": model[2].parameters(), "lr": 4 * LR, "betas": (0.5, 0.9), "eps": 0.05}]

    model, twin = _model(), _model()
    optimizer = _optimizer(torch.optim.Adam, groups(model), **IMPLEMENTATIONS[implementation])
    reference = _optimizer(torch.optim.Adam, groups(twin), **IMPLEMENTATIONS[implementation])
    fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    for batch in _batches():
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad(set_to_none=True)
            _backward(m, batch)
            opt.step()
        # the second group's step had it taken the first group's beta2, eps and lr instead
        first = reference.param_groups[0]
        beta2, eps, lr = first["betas"][1], first["eps"], first["lr"]
        wrong = []
        for p in reference.param_groups[1]["params"]:
            state = reference.state[p]
            d = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
            y = p.detach()
            wrong.append(torch.sign(y) * torch.clamp(d * y.abs() - lr * L1, min=0) / d)
        _, euclidean = _hand_metric_prox(reference)
        _assert_close_but_not_euclidean(model.parameters(), list(twin.parameters()), euclidean)
        assert max((p.detach() - w).abs().max().item() for p, w in zip(model[2].parameters(), wrong)) > 1e-3


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_a_step_grad_scaler_skips_takes_no_proximal_step(implementation):
    # GradScaler does not call step() of a for-loop / foreach Adam on inf/NaN; it does call a
    # fused one's (it skips the update in its kernel, with optimizer.found_inf set): the hook
    # must skip the proximal step in both cases.
    kwargs = dict(lr=LR, **IMPLEMENTATIONS[implementation])
    model, twin = _model(), _model()
    optimizer = _optimizer(torch.optim.Adam, model.parameters(), **kwargs)
    reference = _optimizer(torch.optim.Adam, twin.parameters(), **kwargs)
    handle = fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step, batch in enumerate(_batches()):
        skipped = step == 1
        if skipped:
            weights = [p.detach().clone() for p in model.parameters()]
            state = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
        for m, opt, scaler in ((model, optimizer, scalers[0]), (twin, reference, scalers[1])):
            opt.zero_grad(set_to_none=True)
            _backward(m, batch, scaler, poison=skipped)
            scaler.step(opt)
            scaler.update()
        if skipped:
            assert scalers[0].get_scale() == 2.0**9  # the scaler saw the inf
            assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))  # bitwise
            for p in model.parameters():
                assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state[id(p)].items())
            assert handle._steps == 1
            continue
        _, euclidean = _hand_metric_prox(reference)
        _assert_close_but_not_euclidean(model.parameters(), list(twin.parameters()), euclidean)
    assert handle._steps == 2


def test_a_fused_adam_whose_first_step_grad_scaler_skips_takes_no_proximal_step():
    # The fused kernel makes the state (step = 0: its bias correction would be 1/0) and skips.
    model = _model()
    optimizer = _optimizer(torch.optim.Adam, model.parameters(), lr=LR, fused=True)
    handle = fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    weights = [p.detach().clone() for p in model.parameters()]
    _backward(model, _batches(1)[0], scaler, poison=True)
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert handle.last_value is None


@pytest.mark.parametrize("name", ["adam", "adagrad"])
def test_a_parameter_without_optimizer_state_is_an_error_before_any_proximal_step(name):
    # Adam makes no state for a parameter without a gradient; Adagrad makes it in its constructor
    # (sum = 0, step = 0), where D = eps would zero the parameter (threshold lr·l1/eps). Both:
    # ValueError from optimizer.step() (the optimizer's own update is done by then), and no
    # group's proximal step is taken, not even that of a group whose parameters have state.
    make = {"adam": lambda groups: torch.optim.Adam(groups, lr=LR),
            "adagrad": lambda groups: torch.optim.Adagrad(groups, lr=LR)}[name]
    model, twin = _model(), _model()
    optimizer = make([{"params": model[0].parameters()}, {"params": model[2].parameters()}])
    reference = make([{"params": twin[0].parameters()}, {"params": twin[2].parameters()}])
    fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    batch = _batches(1)[0]
    for m, opt in ((model, optimizer), (twin, reference)):
        _backward(m, batch)
        m[2].bias.grad = None  # e.g. a parameter this batch does not reach
        if opt is optimizer:
            with pytest.raises(ValueError, match=r"has no state for a parameter of shape \(3,\) yet"):
                opt.step()
        else:
            opt.step()
    for got, want in zip(model.parameters(), twin.parameters()):  # the optimizer's step, no prox
        assert torch.equal(got, want)


def test_a_parameter_without_a_gradient_later_is_shrunk_in_its_last_metric():
    # Once Adam has state for a parameter, a step without its gradient leaves the state (and
    # the parameter) alone, and the proximal step still shrinks it, in the metric of its last
    # update: the prox of the penalty follows every optimizer step, as with SGD.
    model, twin = _model(), _model()
    optimizer, reference = torch.optim.Adam(model.parameters(), lr=LR), torch.optim.Adam(twin.parameters(), lr=LR)
    fastreg.Penalty(model, l1=L1).attach(optimizer, mode="prox")
    for step, batch in enumerate(_batches(2)):
        for m, opt in ((model, optimizer), (twin, reference)):
            opt.zero_grad(set_to_none=True)
            _backward(m, batch)
            if step == 1:
                m[2].bias.grad = None
            opt.step()
        before, _ = _hand_metric_prox(reference)
    for got, want in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-12)
    assert float(optimizer.state[model[2].bias]["step"]) == 1
    # the bias moved at step 2 by the proximal step alone (Adam skipped it)
    assert (model[2].bias.detach() != before[-1]).any()
