"""The diagonal metric of an optimizer's step, read from its state: what ``attach(optimizer,
mode="prox")`` steps in, so that the proximal step's fixed points solve the objective the user
wrote (ProxGen, Yun et al. 2021; TensorFlow's ProximalAdagrad).

An adaptive optimizer moves coordinate ``i`` by ``lr·m_i / D_i``. A proximal step with threshold
``lr·l1`` after it is a different penalty for every coordinate (at a fixed point ``g_i =
−l1·D_i·sign(w_i)``: a lasso reweighted by the gradients' magnitudes). The step in the metric
``D``, ``argmin ½‖x − y‖²_D + lr·R(x)``, has fixed points with ``g + ∂R(w) ∋ 0``: the
minimizers of ``loss + R``, whatever D is.

    optimizer      D (per coordinate)                                   step size
    SGD            1 (the Euclidean step)                               lr
    Adam, AdamW    √(v / (1 − β₂^t)) + ε   (amsgrad: the max of v)     lr
    Adagrad        √(Σ g²) + ε                                          lr / (1 + (t − 1)·lr_decay)
    RMSprop        √v + ε   (centered: √(v − ḡ²) + ε)                   lr

Read with the optimizers' own state (foreach and fused implementations keep the same keys), each
param group with its own betas and eps. RMSprop with momentum and Adagrad before its first step
have no metric that makes the fixed point right: a ``ValueError`` saying so.
"""

import torch

from fastreg.backends._terms import Metric

SUPPORTED = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adagrad, torch.optim.RMSprop)


def check_supported(optimizer):
    """``ValueError`` unless the optimizer's metric is known here."""
    if not isinstance(optimizer, SUPPORTED):
        names = ", ".join(cls.__name__ for cls in SUPPORTED)
        raise ValueError(f"fastreg: attach(mode='prox') steps in the optimizer's own metric, known for {names}; "
                         f"{type(optimizer).__name__} is not one of them: pass metric='euclidean' (the plain "
                         "proximal step, AdamW's decoupled style), or call reg.prox_(lr, metric=...) with its "
                         "per-parameter preconditioner")
    if isinstance(optimizer, torch.optim.RMSprop) and any(g.get("momentum", 0) for g in optimizer.param_groups):
        raise ValueError("fastreg: RMSprop with momentum has no diagonal metric whose proximal step keeps the "
                         "objective's fixed points; use momentum=0, or metric='euclidean'")


def step_size(optimizer, group, param):
    """The step size the optimizer's last step used for ``param`` (Adagrad decays it)."""
    lr = group["lr"]
    lr = float(lr.item() if isinstance(lr, torch.Tensor) else lr)
    if isinstance(optimizer, torch.optim.Adagrad):
        step = _step(optimizer.state.get(param, {}), param)
        lr = lr / (1 + (step - 1) * group.get("lr_decay", 0.0))
    return lr


def metric(optimizer, group, param):
    """The ``Metric`` of ``param`` (None: the Euclidean step): the optimizer's state as it is,
    with the scalars that make it D (nothing is copied)."""
    if isinstance(optimizer, torch.optim.SGD):
        return None
    state = optimizer.state.get(param)
    # No metric before the parameter's first step. Adagrad makes its state (sum = 0, step = 0) in
    # its constructor: D would be eps, a threshold lr·l1/eps that zeroes the parameter; a fused
    # Adam whose first step GradScaler skipped keeps step = 0 (a bias correction of 1/0).
    if not state or _step(state, param) == 0:
        raise ValueError(f"fastreg: {type(optimizer).__name__} has no state for a parameter of shape "
                         f"{tuple(param.shape)} yet (no step has updated it): the metric step needs it")
    eps = group["eps"]
    if not eps > 0:  # D = √v + eps must stay positive where v is 0
        raise ValueError(f"fastreg: the proximal step in {type(optimizer).__name__}'s metric needs eps > 0, got {eps!r}")
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        return Metric(v, 1 / (1 - group["betas"][1] ** _step(state, param)), eps)
    if isinstance(optimizer, torch.optim.Adagrad):
        return Metric(state["sum"], 1.0, eps)
    return Metric(state["square_avg"], 1.0, eps, centered=state["grad_avg"] if group.get("centered") else None)


def _step(state, param):
    step = state.get("step", 0)
    return float(step.item() if isinstance(step, torch.Tensor) else step)
