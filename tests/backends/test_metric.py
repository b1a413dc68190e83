"""The proximal step in a diagonal metric (``prox_(..., metric=...)``), on every backend: every
structure of tests/backends/test_structures.py, every dtype, each tensor with its own metric
(Adam's √v̂ + ε, a metric given as it is, RMSprop's centered form, none) and its own terms and
constraints, metric tensors of another dtype and layout than the parameter, with and without
centers, against a float64 reference computed here (closed forms, and each group's multiplier
by bisection — not the Newton iteration of the backends).

The Triton interpreter suite runs this file with smaller shapes."""

import math

import pytest
import torch

import backends.test_structures as structures
from fastreg import _ops
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups
from fastreg.backends._terms import Metric, Prox

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOLERANCE = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-2, 1e-2),
             torch.float16: (4e-3, 1e-3)}  # (rtol, atol) against the float64 reference rounded once


def _metric(kind, p, g, metric_dtype):
    """A metric of ``kind`` for ``p`` (values drawn from ``g``), with tensors of ``metric_dtype``."""
    shape = p.shape
    if kind == "identity":
        return None
    if kind == "given":  # D in [0.1, 10]
        return Metric(torch.exp(torch.rand(shape, generator=g, dtype=torch.float64) * 4.6 - 2.3).to(metric_dtype),
                      root=False)
    v = (torch.exp(torch.randn(shape, generator=g, dtype=torch.float64)) * 1e-2).to(metric_dtype)
    if kind == "adam":
        return Metric(v, 1 / (1 - 0.999 ** 7), 1e-3)
    if kind == "transposed" and p.ndim == 2:  # the optimizer's state in another layout than the param
        return Metric(v.t().contiguous().t(), 1.0, 1e-3)
    if kind == "centered":  # RMSprop(centered=True): v - m² > 0
        m = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e-2).to(metric_dtype)
        return Metric(v + m.double().square().to(metric_dtype), 1.0, 1e-3, centered=m)
    return Metric(v, 1.0, 1e-3)


KINDS = ["adam", "given", "identity", "centered", "transposed"]


ROWS = [  # (t1, t2, t3, lo, hi, nonneg); a lower bound only without L1 and nonneg (the plan's rule)
    (0.02, 0.1, 0.3, 0.0, math.inf, 0), (0.0, 0.0, 0.5, 0.0, 0.8, 0), (0.05, 0.0, 0.0, 0.0, math.inf, 1),
    (0.01, 0.2, 1e3, 0.0, math.inf, 0), (0.0, 0.3, 0.2, 0.0, 1.5, 1), (0.03, 0.0, 0.1, 0.0, math.inf, 0),
    (0.0, 0.1, 0.3, 1.0, 1.0, 0),  # unit_norm
    (0.0, 0.0, 0.0, 2.0, math.inf, 0),  # every group pushed out to a norm of 2
    (0.0, 0.2, 1e3, 0.5, 3.0, 0),  # groups the group term would zero, held at 0.5
]


def _row(i):
    """Tensor ``i``'s terms and constraint: varied, some group exactly zero, some at max_norm,
    some at a lower bound."""
    t1, t2, t3, lo, hi, nonneg = ROWS[i % len(ROWS)]
    row = torch.zeros(len(Prox), dtype=torch.float64)
    row[Prox.THRESHOLD], row[Prox.DENOMINATOR], row[Prox.GROUP_THRESHOLD] = t1, 1 + 2 * t2, t3
    row[Prox.MIN_NORM], row[Prox.MAX_NORM], row[Prox.NONNEG] = lo, hi, nonneg
    return row


def _d_values(metric, shape):
    if metric is None:
        return torch.ones(shape, dtype=torch.float64)
    v = metric.v.double()
    if not metric.root:
        return v
    if metric.centered is not None:
        v = v - metric.centered.double() ** 2
    return torch.sqrt(v * metric.scale) + metric.eps


def _bisect(fn, lower, upper, steps=200):
    """The root of an increasing ``fn`` per entry, by bisection (independent of the backends)."""
    for _ in range(steps):
        mid = (lower + upper) / 2
        above = fn(mid) > 0
        upper, lower = torch.where(above, mid, upper), torch.where(above, lower, mid)
    return (lower + upper) / 2


def _reference(p, c, metric, row, dim, size):
    y = p.double() - (0 if c is None else c.double())
    D = _d_values(metric, y.shape)
    t1, den, t3, lo, hi, nonneg = (row[s].item() for s in (Prox.THRESHOLD, Prox.DENOMINATOR, Prox.GROUP_THRESHOLD,
                                                             Prox.MIN_NORM, Prox.MAX_NORM, Prox.NONNEG))
    u = torch.clamp(D * (y.clamp(min=0) if nonneg else y.abs()) - t1, min=0) * (1 if nonneg else torch.sign(y))
    a = D + den - 1
    if dim == NO_GROUPS:
        x = u / a
    else:
        ur, ar = structures._rows(u, dim, size), structures._rows(a, dim, size)
        norm_u = ur.norm(dim=1)

        def f(mu):
            return (ur / (ar + mu[:, None])).norm(dim=1)

        top = torch.full_like(norm_u, 1e30)
        mu = _bisect(lambda m: m * f(m) - t3, torch.zeros_like(norm_u), top) if t3 > 0 else torch.zeros_like(norm_u)
        if hi < math.inf:
            mu = torch.where(f(mu) > hi, _bisect(lambda m: hi - f(m), mu, top), mu)
        xr = torch.where((norm_u <= t3)[:, None], 0.0, ur / (ar + mu[:, None]))
        if lo > 0:  # below the bound (or zero, with u): f(λ) = lo, in σ = λ + min a on (0, ∞)
            above = ar - ar.min(dim=1, keepdim=True).values
            under = (norm_u > 0) & ((norm_u <= t3) | (f(mu) < lo))
            sigma = _bisect(lambda s: (ur / (above + s[:, None])).norm(dim=1) * -1 + lo, torch.zeros_like(norm_u), top)
            xr = torch.where(under[:, None], ur / (above + sigma[:, None]), xr)
        x = _from_rows(xr, u, dim, size)
    return x + (0 if c is None else c.double())


def _from_rows(rows, like, dim, size):
    if dim == WHOLE:
        return rows.reshape(like.shape)
    return rows.reshape(like.movedim(dim, 0).shape).movedim(0, dim)


@pytest.mark.parametrize("with_centers", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_the_metric_step_of_every_structure_and_metric(backend, dtype, with_centers):
    params, groups = structures._params(dtype)
    g = torch.Generator().manual_seed(11)
    device = params[0].device
    params = [p.to(device) for p in params]
    centers = ([(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1).to(dtype) for p in params]
               if with_centers else None)
    # bf16/fp16 params: fp32 metric tensors (AMP's optimizer state) for half of them
    metrics = [_metric(KINDS[i % len(KINDS)], p, g,
                       torch.float32 if dtype in (torch.bfloat16, torch.float16) and i % 2 else dtype)
               for i, p in enumerate(params)]
    table = torch.stack([_row(i) for i in range(len(params))])  # float64, as the plan makes it
    expected = [_reference(p, None if centers is None else centers[i], metrics[i], table[i].double(),
                           groups.dims[i], groups.sizes[i]) for i, p in enumerate(params)]
    before = [p._version for p in params]
    _ops.prox_(backend, params, centers, groups, table, metric=metrics)
    rtol, atol = TOLERANCE[dtype]
    for i, (p, x) in enumerate(zip(params, expected)):
        assert p._version > before[i], f"params[{i}]: the step must bump the version counter"
        torch.testing.assert_close(p.double(), x.to(dtype).double(), rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"params[{i}] {groups.dims[i], groups.sizes[i]}: {m}")
        center = 0 if centers is None else centers[i].double()
        zero_ref = (x - center) == 0
        assert torch.equal((p.double() - center)[zero_ref], torch.zeros_like(x[zero_ref])), (
            f"params[{i}]: the reference's exact zeros must be exact")


def test_groups_that_vanish_and_groups_at_the_norm_bound(backend):
    """One tensor of rows, some rows below the group threshold in the metric, one large row
    pulled to max_norm: exact zeros and ‖x_g‖ = hi."""
    w = torch.tensor([[0.05, -0.02, 0.01], [3.0, -4.0, 1.0], [0.3, 0.2, -0.1]], dtype=torch.float64)
    D = torch.tensor([[1.0, 2.0, 0.5], [0.5, 1.0, 2.0], [4.0, 3.0, 2.0]], dtype=torch.float64)
    row = torch.tensor([0.0, 1.0, 0.2, 0.0, 2.0, 0.0], dtype=torch.float64)
    _ops.prox_(backend, [w], None, Groups((0,), (1,)), row, metric=[Metric(D, root=False)])
    assert torch.equal(w[0], torch.zeros(3, dtype=torch.float64))
    assert w[1].norm().item() == pytest.approx(2.0, rel=1e-12)
    assert (w[2] != 0).all()


def test_groups_held_at_a_lower_bound_and_its_hard_case(backend):
    """unit_norm rows in the metric: a row pushed out (beyond the free step's norm), a row the
    group term would zero held at the bound, the hard case (no y where D is smallest: the rest of
    the norm spread evenly over those coordinates), a zero row that stays zero; as the float64
    reference of tests/test_metric_prox.py (_terms' maths)."""
    w = torch.tensor([[0.3, -0.2, 0.1, 0.05], [1e-3, 2e-3, -1e-3, 5e-4], [0.0, 0.3, 0.0, -0.2], [0.0, 0.0, 0.0, 0.0]],
                     dtype=torch.float64)
    D = torch.tensor([[1.0, 2.0, 0.5, 1.5], [0.5, 1.0, 2.0, 1.0], [0.5, 1.5, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0]],
                     dtype=torch.float64)
    row = torch.tensor([0.0, 1.0, 0.05, 1.0, 1.0, 0.0], dtype=torch.float64)
    x = w.to(torch.get_default_device(), copy=True)
    _ops.prox_(backend, [x], None, Groups((0,), (1,)), row, metric=[Metric(D.to(x.device), root=False)])
    x = x.cpu()
    torch.testing.assert_close(x[:3].norm(dim=1), torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.equal(x[3], torch.zeros(4, dtype=torch.float64))
    rest = D[2, [1, 3]] * w[2, [1, 3]] / (D[2, [1, 3]] - 0.5)  # λ = −min D (t3 adds nothing at the bound)
    hard = torch.stack([((1 - rest.square().sum()) / 2).sqrt(), rest[0], ((1 - rest.square().sum()) / 2).sqrt(),
                        rest[1]])
    torch.testing.assert_close(x[2], hard, rtol=1e-12, atol=1e-15)
    for i in range(2):  # on the sphere, x = D·y/(D + λ): the same λ for every coordinate
        lam = D[i] * w[i] / x[i] - D[i]
        torch.testing.assert_close(lam, lam[:1].expand(4), rtol=1e-9, atol=1e-12)


def test_a_small_l2_step_is_not_rounded_away(backend):
    """2·lr·l2 = 2e-7 next to D ~ 1e-3 for float32 params: the kernels read it from the float64
    table as it is (a float32 1 + 2e-7 would carry a 30% error into the L2 term)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 40, generator=g)
    D = torch.rand(50, 40, generator=g) * 1e-3 + 1e-4
    expected = (w.double() * D.double() / (D.double() + 2e-7)).float()
    row = torch.tensor([0.0, 1 + 2e-7, 0.0, 0.0, math.inf, 0.0], dtype=torch.float64)
    w = w.to(torch.get_default_device())  # (the backend's device: see the backend fixture)
    _ops.prox_(backend, [w], None, Groups((NO_GROUPS,), (1,)), row, metric=[Metric(D.to(w.device), root=False)])
    torch.testing.assert_close(w.cpu(), expected, rtol=2e-7, atol=0)
