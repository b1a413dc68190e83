"""The contenders: every way of computing the penalty that the benchmark puts side by side.

Each contender computes the same penalty term, ``LAMBDA * Σw²`` (L2) or ``LAMBDA * Σ|w|`` (L1),
as it would be added to the loss. ``Contender.prepare(params, penalty, clock)`` returns a
``Prepared``: one zero-argument call per mode it supports:

* ``FWD``: the value, computed with autograd recording (as in training); the graph is dropped.
* ``FWD_BWD``: the value and its gradient added to ``p.grad`` (``backward()``, or ``add_to_grad_``).
* ``PROX`` (the ``metric-prox-*`` terms only): one proximal step in Adam's diagonal metric, in
  place on the contender's own copy of the parameters (what ``attach(optimizer, mode="prox")``
  runs after each Adam step).

The byte model (what GB/s divides by) is ``passes * numel * itemsize``; ``passes`` per mode is
stated next to each kind below and in ``BYTE_MODEL``.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

import fastreg

# Per-parameter settings (issue: a whole recipe in one Penalty): tensor i has setting i % S, whose
# l2 is LAMBDA · 2^-(s % 4) (powers of two: every scaling stays exact), "S settings" in one Penalty
# (param groups) against one Penalty per setting and the uniform l2 row of the same run.
SETTINGS = {"l2-2-settings": 2, "l2-10-settings": 10}
# The proximal step in Adam's metric D = √(v / (1 − β₂ᵗ)) + ε, of L1 and of L2 toward c: the
# term each prox penalty steps, and the state it steps in (v: squares of N(0, ADAM_GRAD_STD)
# "gradients", an Adam-like second moment; METRIC_LR: Adam's usual step size).
METRIC_PROX = {"metric-prox-l1": "l1", "metric-prox-l2-center": "l2-center"}
METRIC_LR, ADAM_BETA2, ADAM_STEP, ADAM_EPS, ADAM_GRAD_STD = 1e-3, 0.999, 100, 1e-8, 1e-3
ADAM_SCALE = 1 / (1 - ADAM_BETA2 ** ADAM_STEP)  # v's bias correction
TERMS = ("l2", "l1", "group-rows", "group-cols", "l2-center", *SETTINGS)  # a value and a gradient
PENALTIES = (*TERMS, *METRIC_PROX)
GROUP_DIM = {"group-rows": 0, "group-cols": 1}


def setting_scale(index, penalty):
    """The l2 of tensor ``index`` under a settings penalty, relative to LAMBDA (1 otherwise)."""
    count = SETTINGS.get(penalty)
    return 1.0 if count is None else 2.0 ** -((index % count) % 4)


def settings_loop(params, penalty):
    """The hand-written loop with a coefficient per tensor."""
    total = 0.0
    for i, p in enumerate(params):
        total = total + setting_scale(i, penalty) * (p * p).sum()
    return total
FWD, FWD_BWD, PROX = "fwd", "fwd+bwd", "prox"
MODES = (FWD, FWD_BWD)  # the modes of the penalty terms; the metric-prox terms have PROX alone

# The penalty coefficient. A power of two, so that scaling by it is exact in every float format and
# the relative error of the value is the error of the sum alone.
LAMBDA = 2.0 ** -10

# Memory passes over the parameters (each pass moves numel * itemsize bytes): the least each mode needs.
FWD_PASSES = 1  # read w
AUTOGRAD_FWD_BWD_PASSES = 6  # fwd: read w | bwd: read w, write a fresh gradient | p.grad += it: read both, write p.grad
ADD_TO_GRAD_PASSES = 3  # read w, read p.grad, write p.grad
PROX_PASSES = 3  # read w, read v (or D), write w
CENTER_EXTRA_PASSES = {"fwd": 1, "autograd": 2, "add_to_grad_": 1, "prox": 1}  # l2-center also reads c wherever it reads w
# Of those, the passes over p.grad itself (the rest move the parameter's dtype): with fp32
# gradients of bf16 weights (--grad-dtype fp32) they move 4 bytes per element.
GRAD_PASSES = {"fwd": 0, "fwd+bwd": 2, "prox": 0}
BYTE_MODEL = {
    "fwd": f"{FWD_PASSES} x numel x itemsize: read w (l2-center: and c)",
    "fwd+bwd, autograd": (
        f"{AUTOGRAD_FWD_BWD_PASSES} x numel x itemsize: forward reads w; backward reads w and writes a fresh "
        "gradient; the autograd engine's in-place accumulation p.grad += gradient reads both and writes p.grad "
        "(l2-center: + 2 reads of c)"
    ),
    "fwd+bwd, add_to_grad_": (f"{ADD_TO_GRAD_PASSES} x numel x itemsize: read w, read-modify-write p.grad "
                              "(l2-center: + 1 read of c; group-cols needs the norms first: +1 read of w, not counted)"),
    "prox (metric-prox-*)": (f"{PROX_PASSES} x numel x itemsize: read w, read v (Adam's second moment; prox_ reads "
                             "D instead), write w (metric-prox-l2-center: + 1 read of c); torch.sum reads as many "
                             "bytes"),
    "gradients of another dtype": "the 2 passes over p.grad (read and write) count p.grad's bytes per element",
}


def passes(penalty, mode, fwd_bwd_passes):
    """Memory passes of ``mode`` for ``penalty`` (see BYTE_MODEL)."""
    if mode == PROX:
        return PROX_PASSES + (CENTER_EXTRA_PASSES["prox"] if METRIC_PROX[penalty] == "l2-center" else 0)
    base = FWD_PASSES if mode == FWD else fwd_bwd_passes
    if penalty != "l2-center":
        return base
    kind = "fwd" if mode == FWD else ("add_to_grad_" if fwd_bwd_passes == ADD_TO_GRAD_PASSES else "autograd")
    return base + CENTER_EXTRA_PASSES[kind]


@dataclass
class Prepared:
    """A contender made ready for one case and penalty."""

    calls: dict  # mode -> zero-argument callable
    value_mode: str | None = FWD  # the mode whose call returns the penalty value; None: not the penalty
    setup_s: float | None = None  # one-off cost worth reporting (torch.compile's compile time)
    keep_alive: list = field(default_factory=list)  # tensors owned by the contender (freed with it)
    outputs: list | None = None  # PROX: the tensors the step updates (checked against the float64 step)


@dataclass(frozen=True)
class Contender:
    name: str  # what --contenders takes
    label: str  # what the tables show
    penalties: tuple  # the penalties it implements
    fwd_bwd_passes: int | None  # memory passes of FWD_BWD (None: no FWD_BWD mode)
    prepare: Callable  # (params, penalty, clock) -> Prepared
    needs_flag: str | None = None  # an opt-in command-line flag, e.g. "--compile"
    is_baseline: bool = False  # the seed loop: what speedups are relative to
    has_fwd: bool = True

    @property
    def modes(self):
        return tuple(m for m, on in ((FWD, self.has_fwd), (FWD_BWD, self.fwd_bwd_passes is not None)) if on)

    def modes_for(self, penalty):
        """The modes it runs for ``penalty``: PROX alone for the metric-prox terms."""
        return (PROX,) if penalty in METRIC_PROX else self.modes


# -- the seed article's loops, verbatim ---------------------------------------------------------

def seed_loop_l2(params):
    l2_reg = torch.tensor(0., requires_grad=True)  # Initialize to zero, track gradients
    for param in params:
        l2_reg = l2_reg + torch.norm(param)**2  # Sum of squares for all parameters
    return l2_reg


def seed_loop_l1(params):
    l1_reg = torch.tensor(0., requires_grad=True)  # Initialize to zero, track gradients
    for param in params:
        l1_reg = l1_reg + torch.abs(param).sum()  # Sum of absolute values
    return l1_reg


# -- other plain-PyTorch ways ---------------------------------------------------------------

def foreach_norm_l2(params):
    return torch.stack(torch._foreach_norm(params)).pow(2).sum()


def foreach_norm_l1(params):
    return torch.stack(torch._foreach_norm(params, 1)).sum()


def square_loop_l2(params):
    return sum((p * p).sum() for p in params)


def abs_loop_l1(params):
    return sum(p.abs().sum() for p in params)


def group_loop(params, group_dim):
    """The hand-written group lasso + L2 term: ``Σ_g ‖w_g‖ + Σw²`` (strided norms for columns)."""
    total = 0
    for p in params:
        if p.ndim > 1:
            total = total + p.movedim(group_dim, 0).flatten(1).norm(dim=1).sum()
        total = total + (p * p).sum()
    return total


def center_loop(params, centers):
    """The hand-written L2-SP term (TLlib's SPRegularization): ``Σ(w - c)²``."""
    return sum(((p - c) ** 2).sum() for p, c in zip(params, centers))


def _autograd(sum_fn):
    """A contender that is a Python function of the parameter list, differentiated by autograd."""

    def prepare(params, penalty, clock, extras):
        fn = sum_fn[penalty]

        def value():
            return LAMBDA * fn(params, extras)

        return Prepared({FWD: value, FWD_BWD: lambda: value().backward()})

    return prepare


def _plain(fn):
    return lambda params, extras: fn(params)


HAND_LOOPS = {
    **{penalty: (lambda params, extras, penalty=penalty: settings_loop(params, penalty)) for penalty in SETTINGS},
    "group-rows": lambda params, extras: group_loop(params, 0),
    "group-cols": lambda params, extras: group_loop(params, 1),
    "l2-center": lambda params, extras: center_loop(params, extras["centers"]),
}


def _prepare_compiled(params, penalty, clock, extras):
    # A fresh dynamo cache per case: the same code object recompiled for every case would hit
    # the recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    fn = torch.compile({"l2": square_loop_l2, "l1": abs_loop_l1}[penalty])

    def value():
        return LAMBDA * fn(params)

    clock.synchronize()
    start = time.perf_counter()
    value().backward()  # compiles the forward and the backward graph
    clock.synchronize()
    compile_s = time.perf_counter() - start
    return Prepared({FWD: value, FWD_BWD: lambda: value().backward()}, setup_s=compile_s)


def _prepare_flat_sum(params, penalty, clock, extras):
    """``torch.sum`` over one flat tensor as large as all the parameters: the bandwidth reference
    (for l2-center, over two: it reads w and c; for a metric prox step, over one as many times
    larger as the step's passes: it reads w, v (and c) and writes w)."""
    total = sum(p.numel() for p in params)
    if penalty in METRIC_PROX:
        flat = torch.empty(total * passes(penalty, PROX, None), dtype=params[0].dtype,
                           device=params[0].device).normal_(0.0, 0.02)
        return Prepared({PROX: flat.sum}, value_mode=None, keep_alive=[flat])
    flats = [torch.empty(total, dtype=params[0].dtype, device=params[0].device).normal_(0.0, 0.02)
             for _ in range(2 if penalty == "l2-center" else 1)]
    if len(flats) == 1:
        return Prepared({FWD: flats[0].sum}, value_mode=None, keep_alive=flats)
    return Prepared({FWD: lambda: flats[0].sum() + flats[1].sum()}, value_mode=None, keep_alive=flats)


# -- the proximal step in Adam's metric -------------------------------------------------------

def adam_metric(v):
    """Adam's denominator ``D = √(v / (1 − β₂ᵗ)) + ε`` of one tensor."""
    return (v * ADAM_SCALE).sqrt_().add_(ADAM_EPS)


def metric_prox_loop(ws, vs, centers, penalty):
    """The hand-written loop: Adam's denominator, then the closed form, tensor by tensor."""
    lr, strength = METRIC_LR, LAMBDA
    with torch.no_grad():
        for i, (w, v) in enumerate(zip(ws, vs)):
            d = (v / (1 - ADAM_BETA2 ** ADAM_STEP)).sqrt() + ADAM_EPS
            if METRIC_PROX[penalty] == "l1":  # soft threshold lr·l1/D
                w.copy_(w.sign() * (w.abs() - lr * strength / d).clamp(min=0))
            else:  # argmin ½D(x − w)² + lr·l2·(x − c)²
                c = centers[i]
                w.copy_(c + (w - c) * d / (d + 2 * lr * strength))


def metric_prox_foreach(ws, vs, centers, penalty):
    """The same step in ``torch._foreach_*`` ops (a few kernels per op for all tensors)."""
    with torch.no_grad():
        d = torch._foreach_mul(vs, ADAM_SCALE)
        torch._foreach_sqrt_(d)
        torch._foreach_add_(d, ADAM_EPS)
        if METRIC_PROX[penalty] == "l1":
            torch._foreach_reciprocal_(d)
            torch._foreach_mul_(d, METRIC_LR * LAMBDA)  # the thresholds
            shrunk = torch._foreach_abs(ws)
            torch._foreach_sub_(shrunk, d)
            torch._foreach_clamp_min_(shrunk, 0.0)
            torch._foreach_mul_(shrunk, torch._foreach_sign(ws))
        else:
            torch._foreach_div_(d, torch._foreach_add(d, 2 * METRIC_LR * LAMBDA))  # D / (D + 2·lr·l2)
            shrunk = torch._foreach_sub(ws, centers)
            torch._foreach_mul_(shrunk, d)
            torch._foreach_add_(shrunk, centers)
        torch._foreach_copy_(ws, shrunk)


def _own_copies(params):
    """The contender's own weights: every prox call changes them, and the case's parameters stay
    as they are for the next contender (and the float64 reference)."""
    return [p.detach().clone().requires_grad_() for p in params]


def _metric_prox_torch(fn):
    def prepare(params, penalty, clock, extras):
        ws = _own_copies(params)
        vs, centers = extras["adam_v"], extras["centers"]
        return Prepared({PROX: lambda: fn(ws, vs, centers, penalty)}, value_mode=None, outputs=ws, keep_alive=ws)

    return prepare


def metric_prox_terms(penalty, extras):
    """The ``fastreg.Penalty`` keyword arguments of a metric prox term."""
    if METRIC_PROX[penalty] == "l1":
        return {"l1": LAMBDA}
    return {"l2": LAMBDA, "center": extras["centers"]}


def _fastreg_prox_metric(backend):
    """``reg.prox_(lr, metric=D)``: the public call, with Adam's D computed once beforehand."""

    def prepare(params, penalty, clock, extras):
        ws = _own_copies(params)
        ds = [adam_metric(v) for v in extras["adam_v"]]
        reg = fastreg.Penalty(ws, **metric_prox_terms(penalty, extras), backend=backend)
        return Prepared({PROX: lambda: reg.prox_(METRIC_LR, metric=ds)}, value_mode=None, outputs=ws,
                        keep_alive=[ws, ds])

    return prepare


class StateOnlyAdam(torch.optim.Adam):
    """An Adam whose ``step()`` changes nothing but runs its hooks: what ``attach(mode="prox")``
    adds to a step, with the case's v as its state."""

    def step(self, closure=None):
        return None


def _fastreg_attach_adam(backend):
    """``attach(optimizer, mode="prox")``: the post-step hook reads Adam's state (v, step, betas,
    eps) and steps in its metric; timed through ``optimizer.step()`` with a no-op update."""

    def prepare(params, penalty, clock, extras):
        ws = _own_copies(params)
        optimizer = StateOnlyAdam(ws, lr=METRIC_LR, betas=(0.9, ADAM_BETA2), eps=ADAM_EPS)
        for w, v in zip(ws, extras["adam_v"]):
            optimizer.state[w] = {"step": torch.tensor(float(ADAM_STEP)), "exp_avg_sq": v}
        reg = fastreg.Penalty(ws, **metric_prox_terms(penalty, extras), backend=backend)
        reg.attach(optimizer, mode="prox")
        return Prepared({PROX: optimizer.step}, value_mode=None, outputs=ws, keep_alive=[ws, optimizer, reg])

    return prepare


def apex_available():
    """apex's fused CUDA kernels (``amp_C``) are importable and a GPU is present."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("amp_C") is not None


def _prepare_apex(params, penalty, clock, extras):
    """apex's ``multi_tensor_l2norm`` (the kernel behind its clip_grad / LAMB): forward only."""
    import amp_C
    from apex.multi_tensor_apply import multi_tensor_applier

    overflow = torch.zeros(1, dtype=torch.int, device=params[0].device)
    tensors = [p for p in params if p.numel()]

    def value():
        norm, _ = multi_tensor_applier(amp_C.multi_tensor_l2norm, overflow, [tensors], False)
        return LAMBDA * norm.double().square().reshape(())

    return Prepared({FWD: value})


def fastreg_terms(penalty, extras):
    """The ``fastreg.Penalty`` keyword arguments of ``penalty``."""
    if penalty in GROUP_DIM:
        return dict(l2=LAMBDA, group=LAMBDA, group_dim=GROUP_DIM[penalty])
    if penalty == "l2-center":
        return dict(l2=LAMBDA, center=extras["centers"])
    return {penalty: LAMBDA}


def fastreg_penalty(params, penalty, extras, backend):
    """One ``fastreg.Penalty`` for ``penalty``: a settings penalty is one param group per setting."""
    count = SETTINGS.get(penalty)
    if count is None:
        return fastreg.Penalty(params, **fastreg_terms(penalty, extras), backend=backend)
    groups = [{"params": params[s::count], "l2": LAMBDA * setting_scale(s, penalty)} for s in range(count)]
    return fastreg.Penalty(groups, backend=backend)


def _fastreg_autograd(backend):
    def prepare(params, penalty, clock, extras):
        reg = fastreg_penalty(params, penalty, extras, backend)
        return Prepared({FWD: reg, FWD_BWD: lambda: reg().backward()})

    return prepare


def _fastreg_add_to_grad(backend):
    def prepare(params, penalty, clock, extras):
        reg = fastreg_penalty(params, penalty, extras, backend)
        return Prepared({FWD_BWD: reg.add_to_grad_}, value_mode=FWD_BWD)

    return prepare


def _fastreg_per_setting(backend, add_to_grad):
    """One ``Penalty`` per setting: a pass (and a call's fixed cost) each."""

    def prepare(params, penalty, clock, extras):
        count = SETTINGS[penalty]
        regs = [fastreg.Penalty(params[s::count], l2=LAMBDA * setting_scale(s, penalty), backend=backend)
                for s in range(count)]
        if add_to_grad:
            return Prepared({FWD_BWD: lambda: sum(reg.add_to_grad_() for reg in regs)}, value_mode=FWD_BWD)

        def value():
            return sum(reg() for reg in regs)

        return Prepared({FWD: value, FWD_BWD: lambda: value().backward()})

    return prepare


def all_contenders(backends):
    """Every contender, in table order; ``backends``: the fastreg backends to include."""
    contenders = [
        Contender("seed-loop", "seed loop", ("l2", "l1"), AUTOGRAD_FWD_BWD_PASSES,
                  _autograd({"l2": _plain(seed_loop_l2), "l1": _plain(seed_loop_l1)}), is_baseline=True),
        # For the group and center terms the baseline is the hand-written loop people use.
        Contender("hand-loop", "hand loop", ("group-rows", "group-cols", "l2-center", *SETTINGS),
                  AUTOGRAD_FWD_BWD_PASSES, _autograd(HAND_LOOPS), is_baseline=True),
        Contender("foreach-norm", "torch._foreach_norm", ("l2", "l1"), AUTOGRAD_FWD_BWD_PASSES,
                  _autograd({"l2": _plain(foreach_norm_l2), "l1": _plain(foreach_norm_l1)})),
        # For L1 the seed loop already is the plain sum loop.
        Contender("square-loop", "loop (p*p).sum()", ("l2",), AUTOGRAD_FWD_BWD_PASSES,
                  _autograd({"l2": _plain(square_loop_l2)})),
        Contender("compiled-loop", "torch.compile loop", ("l2", "l1"), AUTOGRAD_FWD_BWD_PASSES,
                  _prepare_compiled, needs_flag="--compile"),
        Contender("flat-sum", "torch.sum, 1 flat tensor", PENALTIES, None, _prepare_flat_sum),
        # The proximal step in Adam's metric: the hand-written loop is its baseline.
        Contender("metric-prox-loop", "hand loop (Adam's D per tensor)", tuple(METRIC_PROX), None,
                  _metric_prox_torch(metric_prox_loop), is_baseline=True, has_fwd=False),
        Contender("metric-prox-foreach", "torch._foreach_* ops", tuple(METRIC_PROX), None,
                  _metric_prox_torch(metric_prox_foreach), has_fwd=False),
    ]
    if apex_available():
        contenders.append(Contender("apex-l2norm", "apex multi_tensor_l2norm", ("l2",), None, _prepare_apex))
    for backend in backends:
        contenders += [
            Contender(f"fastreg-{backend}", f"fastreg[{backend}] autograd", TERMS,
                      AUTOGRAD_FWD_BWD_PASSES, _fastreg_autograd(backend)),
            Contender(f"fastreg-{backend}-add-to-grad", f"fastreg[{backend}] add_to_grad_", TERMS,
                      ADD_TO_GRAD_PASSES, _fastreg_add_to_grad(backend), has_fwd=False),
            Contender(f"fastreg-{backend}-per-setting", f"fastreg[{backend}] one Penalty per setting",
                      tuple(SETTINGS), AUTOGRAD_FWD_BWD_PASSES, _fastreg_per_setting(backend, False)),
            Contender(f"fastreg-{backend}-per-setting-add-to-grad",
                      f"fastreg[{backend}] add_to_grad_, one Penalty per setting", tuple(SETTINGS),
                      ADD_TO_GRAD_PASSES, _fastreg_per_setting(backend, True), has_fwd=False),
            Contender(f"fastreg-{backend}-prox-metric", f"fastreg[{backend}] prox_(lr, metric=D)", tuple(METRIC_PROX),
                      None, _fastreg_prox_metric(backend), has_fwd=False),
            Contender(f"fastreg-{backend}-attach-adam", f"fastreg[{backend}] attach(Adam, mode='prox')",
                      tuple(METRIC_PROX), None, _fastreg_attach_adam(backend), has_fwd=False),
        ]
    return contenders


def gradient_error(params, penalty, extras=None, chunk_elements=2**20):
    """max |p.grad - exact| / max |exact| over all parameters, exact = d(penalty)/dw.

    For l2 / l1 the exact gradient, ``2 LAMBDA w`` or ``LAMBDA sign(w)``, is exact in the parameter
    dtype (LAMBDA is a power of two), so the comparison is done in that dtype, chunk by chunk in one
    small scratch buffer (fresh full-size temporaries for 124M parameters take seconds on some machines).
    The group and center terms are compared in float64, tensor by tensor.
    """
    if penalty not in ("l2", "l1", *SETTINGS):
        return _float64_gradient_error(params, penalty, extras)
    scales = [setting_scale(i, penalty) for i, p in enumerate(params) if p.numel()]
    params = [p for p in params if p.numel()]
    if not params:
        return 0.0
    scratch = torch.empty(min(chunk_elements, max(p.numel() for p in params)),
                          dtype=params[0].dtype, device=params[0].device)
    exact_max, diff_max = [], []
    with torch.no_grad():
        for p, scale in zip(params, scales):
            flat_p = p.detach().reshape(-1)
            flat_grad = None if p.grad is None else p.grad.reshape(-1)
            for start in range(0, flat_p.numel(), chunk_elements):
                w = flat_p[start:start + chunk_elements]
                exact = scratch[: w.numel()]
                if penalty != "l1":
                    torch.mul(w, 2 * LAMBDA * scale, out=exact)
                else:
                    torch.sign(w, out=exact).mul_(LAMBDA)
                exact_max.append(_max_abs(exact))
                if flat_grad is not None:
                    exact.sub_(flat_grad[start:start + chunk_elements])
                diff_max.append(_max_abs(exact))
        worst_exact = torch.stack(exact_max).max().item()
        worst_diff = torch.stack(diff_max).max().item()
    return worst_diff / worst_exact if worst_exact else worst_diff


def metric_prox_error(params, outputs, penalty, extras, chunk_elements=2**22):
    """max |w − exact| / max |exact| over all parameters after one metric prox step from
    ``params`` (``outputs``: the contender's weights), exact = the closed form in float64 from
    the case's v (and c), chunk by chunk."""
    exact_max, diff_max = 0.0, 0.0
    centers = extras.get("centers")
    with torch.no_grad():
        for i, (p, w, v) in enumerate(zip(params, outputs, extras["adam_v"])):
            flats = [t.detach().reshape(-1) for t in (p, w, v, *([centers[i]] if centers is not None else []))]
            for start in range(0, flats[0].numel(), chunk_elements):
                y, got, sq, *c = (t[start:start + chunk_elements].double() for t in flats)
                d = (sq * ADAM_SCALE).sqrt() + ADAM_EPS
                if METRIC_PROX[penalty] == "l1":
                    exact = torch.sign(y) * torch.clamp(d * y.abs() - METRIC_LR * LAMBDA, min=0) / d
                else:
                    exact = c[0] + (y - c[0]) * d / (d + 2 * METRIC_LR * LAMBDA)
                exact_max = max(exact_max, exact.abs().max().item())
                diff_max = max(diff_max, (got - exact).abs().max().item())
    return diff_max / exact_max if exact_max else diff_max


def _max_abs(t):
    low, high = torch.aminmax(t)
    return torch.maximum(high, -low).float()


def _float64_gradient_error(params, penalty, extras):
    exact_max, diff_max = 0.0, 0.0
    centers = extras.get("centers") if extras else None
    with torch.no_grad():
        for i, p in enumerate(params):
            if not p.numel():
                continue
            w = p.detach().double()
            if penalty == "l2-center":
                exact = 2 * LAMBDA * (w - centers[i].double())
            else:
                exact = 2 * LAMBDA * w
                if p.ndim > 1:
                    dim = GROUP_DIM[penalty]
                    norms = w.movedim(dim, 0).flatten(1).norm(dim=1)
                    scale = torch.where(norms > 0, LAMBDA / torch.where(norms > 0, norms, 1), 0)
                    exact += (w.movedim(dim, -1) * scale).movedim(-1, dim)
            exact_max = max(exact_max, exact.abs().max().item())
            got = p.grad.double() if p.grad is not None else torch.zeros_like(w)
            diff_max = max(diff_max, (got - exact).abs().max().item())
            del w, exact, got
    return diff_max / exact_max if exact_max else diff_max
