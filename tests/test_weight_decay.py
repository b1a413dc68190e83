"""``weight_decay = fastreg.l2_to_weight_decay(l2)`` (= 2·l2) takes the same steps as an
``l2·Σw²`` penalty in the loss; the widely copied "weight_decay is λ/2" does not.

torch.optim's ``weight_decay=wd`` adds ``wd·w`` to the gradient: the gradient of ``(wd/2)·Σw²``.
So ``l2·Σw²`` needs ``wd = 2·l2``; ``wd = l2/2`` is the penalty ``(l2/4)·Σw²``, 4x too weak.
Everything runs in float64, so "the same steps" is checked to ~1e-12.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastreg

L2 = 0.03
LR = 0.1
STEPS = 12
TIGHT = dict(rtol=1e-11, atol=1e-12)

OPTIMIZERS = {
    "sgd": lambda params, wd: torch.optim.SGD(params, lr=LR, weight_decay=wd),
    "sgd_momentum": lambda params, wd: torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=wd),
    "sgd_nesterov": lambda params, wd: torch.optim.SGD(params, lr=LR, momentum=0.9, nesterov=True,
                                                       weight_decay=wd),
    "sgd_dampening": lambda params, wd: torch.optim.SGD(params, lr=LR, momentum=0.5, dampening=0.3,
                                                        weight_decay=wd),
    # Adam's weight_decay is coupled L2 too (added to the gradient before the moments).
    "adam": lambda params, wd: torch.optim.Adam(params, lr=1e-2, weight_decay=wd),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops: one thread is faster, and does not crawl on a busy machine (measured 6x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(STEPS)]


def train(make_optimizer, *, weight_decay=0.0, penalty_l2=0.0, how="loss"):
    """``STEPS`` optimizer steps; the L2 term in the loss (``how="loss"``), by
    ``add_to_grad_`` (``how="add_to_grad"``), or as the optimizer's ``weight_decay``."""
    model = make_model()
    optimizer = make_optimizer(model.parameters(), weight_decay)
    reg = fastreg.Penalty(model, l2=penalty_l2)
    for x, y in batches():
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if penalty_l2 and how == "loss":
            loss = loss + reg()
        loss.backward()
        if penalty_l2 and how == "add_to_grad":
            reg.add_to_grad_()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def assert_same_steps(a, b):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **TIGHT)


def test_l2_to_weight_decay_is_twice_l2():
    assert fastreg.l2_to_weight_decay(L2) == 2 * L2
    assert fastreg.l2_to_weight_decay(0) == 0.0
    with pytest.raises(ValueError):
        fastreg.l2_to_weight_decay(-1.0)


def test_gradient_of_the_penalty_is_weight_decay_times_w():
    model = make_model()
    fastreg.penalty(model, l2=L2).backward()
    wd = fastreg.l2_to_weight_decay(L2)
    for p in model.parameters():
        torch.testing.assert_close(p.grad, wd * p.detach(), **TIGHT)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_weight_decay_takes_the_same_steps_as_the_penalty(name):
    make_optimizer = OPTIMIZERS[name]
    with_penalty = train(make_optimizer, penalty_l2=L2)
    with_decay = train(make_optimizer, weight_decay=fastreg.l2_to_weight_decay(L2))
    with_add_to_grad = train(make_optimizer, penalty_l2=L2, how="add_to_grad")
    plain = train(make_optimizer)
    assert_same_steps(with_decay, with_penalty)
    assert_same_steps(with_add_to_grad, with_penalty)
    assert max_diff(plain, with_penalty) > 1e-3  # the penalty did change the steps


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_tutorials_half_lambda_does_not(name):
    make_optimizer = OPTIMIZERS[name]
    with_penalty = train(make_optimizer, penalty_l2=L2)
    half = train(make_optimizer, weight_decay=L2 / 2)
    plain = train(make_optimizer)
    # Far from the penalty's trajectory (measured 0.02 to 0.12; the equivalence above holds to 1e-16).
    assert max_diff(half, with_penalty) > 1e-3
    # weight_decay = l2/2 is exactly the penalty (l2/4)·Σw²: a factor of 4 off.
    assert_same_steps(half, train(make_optimizer, penalty_l2=L2 / 4))
    # and l2 itself (the other common guess) is the penalty (l2/2)·Σw², a factor of 2 off.
    assert max_diff(train(make_optimizer, weight_decay=L2), with_penalty) > 1e-3
    assert max_diff(plain, half) > 0


def test_adamw_decay_is_not_an_l2_penalty():
    """AdamW decouples the decay from the gradient: no coupled L2 penalty reproduces it."""
    adamw = lambda params, wd: torch.optim.AdamW(params, lr=1e-2, weight_decay=wd)  # noqa: E731
    adam = OPTIMIZERS["adam"]
    decoupled = train(adamw, weight_decay=fastreg.l2_to_weight_decay(L2))
    coupled = train(adam, penalty_l2=L2)
    assert max_diff(decoupled, coupled) > 1e-5
