"""The proximal step in a diagonal metric (an optimizer's preconditioner D): for one group,
``argmin ½‖x − y‖²_D + t1‖x‖₁ + t2‖x‖² + t3‖x‖`` subject to ``‖x‖ <= hi`` (and ``x >= 0``), the
torch backend's closed forms and root-finding against scipy's SLSQP in float64 (as
tests/test_prox_exact.py does for D = I), and D = I against the Euclidean step bitwise-close.
With a lower norm bound (non-convex: a trust-region problem on the sphere) the step is checked
against SLSQP from many starts, and its hard case against its closed form."""

import itertools
import math

import numpy as np
import pytest
import torch

from fastreg.backends import torch as torch_backend
from fastreg.backends._geometry import NO_GROUPS, WHOLE, Groups
from fastreg.backends._terms import Metric, MetricOperand, Prox

optimize = pytest.importorskip("scipy.optimize")

TERMS = {"l1": (0.3, 0.0, 0.0), "l2": (0.0, 0.4, 0.0), "group": (0.0, 0.0, 0.8), "all": (0.3, 0.4, 0.8)}
CONSTRAINTS = {"free": (math.inf, False), "max_norm": (0.7, False), "nonneg": (math.inf, True),
               "nonneg+max_norm": (0.7, True)}


def _row(t1, t2, t3, hi, nonneg, lo=0.0):
    row = torch.zeros(len(Prox), dtype=torch.float64)
    row[Prox.THRESHOLD], row[Prox.DENOMINATOR], row[Prox.GROUP_THRESHOLD] = t1, 1 + 2 * t2, t3
    row[Prox.MIN_NORM], row[Prox.MAX_NORM], row[Prox.NONNEG] = lo, hi, float(nonneg)
    return row


def _operand(metric, param):
    return MetricOperand.of([metric], [param], torch.float64)


def _objective(x, y, d, t1, t2, t3):
    return 0.5 * np.sum(d * (x - y) ** 2) + t1 * np.abs(x).sum() + t2 * np.sum(x * x) + t3 * np.linalg.norm(x)


def _solve(y, d, t1, t2, t3, hi, nonneg, starts, lo=0.0):
    n = len(y)

    def f(z):
        x = z[:n] - z[n:]
        return 0.5 * np.sum(d * (x - y) ** 2) + t1 * z.sum() + t2 * np.sum(x * x) + t3 * math.sqrt(np.sum(x * x) + 1e-30)

    constraints = [{"type": "ineq", "fun": lambda z: hi ** 2 - np.sum((z[:n] - z[n:]) ** 2)}] if hi < math.inf else []
    if lo > 0:
        constraints.append({"type": "ineq", "fun": lambda z: np.sum((z[:n] - z[n:]) ** 2) - lo ** 2})
    bounds = [(0, None)] * n + [(0, 0) if nonneg else (0, None)] * n
    best = None
    for start in starts:
        z0 = np.concatenate([np.maximum(start, 0), np.zeros(n) if nonneg else np.maximum(-start, 0)])
        x = optimize.minimize(f, z0, method="SLSQP", bounds=bounds, constraints=constraints,
                              options={"ftol": 1e-15, "maxiter": 2000}).x
        x = x[:n] - x[n:]
        norm = np.linalg.norm(x)
        if norm > hi or 0 < norm < lo:
            x = x * min(max(norm, lo), hi) / norm  # the solver's small violations removed
        if best is None or _objective(x, y, d, t1, t2, t3) < _objective(best, y, d, t1, t2, t3):
            best = x
    return best


@pytest.mark.parametrize("terms, constraint", list(itertools.product(TERMS, CONSTRAINTS)))
def test_the_metric_step_is_the_argmin(terms, constraint):
    t1, t2, t3 = TERMS[terms]
    hi, nonneg = CONSTRAINTS[constraint]
    rng = np.random.default_rng(3)
    for scale in (0.3, 1.0, 3.0):
        y = rng.normal(size=5) * scale
        d = np.exp(rng.normal(size=5))  # a preconditioner spanning an order of magnitude
        w = torch.tensor(y)[None, :].clone()
        torch_backend.prox_([w], None, Groups((WHOLE,), (1,)), _row(t1, t2, t3, hi, nonneg), None,
                            metric=_operand(Metric(torch.tensor(d)[None, :], root=False), w))
        x = w[0].numpy()
        best = _objective(x, y, d, t1, t2, t3)
        numeric = _solve(y, d, t1, t2, t3, hi, nonneg, [x + rng.normal(size=5) * 0.3 for _ in range(3)] + [y])
        assert best <= _objective(numeric, y, d, t1, t2, t3) + 1e-10
        np.testing.assert_allclose(x, numeric, atol=2e-4)
        assert np.linalg.norm(x) <= hi * (1 + 1e-12) and (not nonneg or (x >= 0).all())


BOUNDS = {"min_norm": (1.5, math.inf), "min_max_norm": (0.8, 1.2), "unit_norm": (1.0, 1.0)}


def _metric_step(y, d, t2, t3, lo, hi):
    w = torch.tensor(y)[None, :].clone()
    torch_backend.prox_([w], None, Groups((WHOLE,), (1,)), _row(0.0, t2, t3, hi, False, lo), None,
                        metric=_operand(Metric(torch.tensor(d)[None, :], root=False), w))
    return w[0].numpy()


@pytest.mark.parametrize("terms, bounds", list(itertools.product(["none", "l2", "group", "l2+group"], BOUNDS)))
def test_a_lower_norm_bound_in_the_metric_is_the_argmin(terms, bounds):
    """The bound pushes a group out (λ < 0: beyond the free step's norm) or holds it (a group the
    group term would zero): the step's objective is no worse than SLSQP's best of many starts."""
    t2, t3 = {"none": (0.0, 0.0), "l2": (0.4, 0.0), "group": (0.0, 0.8), "l2+group": (0.4, 0.8)}[terms]
    lo, hi = BOUNDS[bounds]
    rng = np.random.default_rng(7)
    for scale in (0.1, 0.5, 2.0, 6.0):
        y = rng.normal(size=5) * scale
        d = np.exp(rng.normal(size=5))
        x = _metric_step(y, d, t2, t3, lo, hi)
        assert lo * (1 - 1e-12) <= np.linalg.norm(x) <= hi * (1 + 1e-12)
        starts = [y, x] + [v * lo / np.linalg.norm(v) for v in rng.normal(size=(12, 5))]
        numeric = _solve(y, d, 0.0, t2, t3, hi, False, starts, lo=lo)
        assert _objective(x, y, d, 0.0, t2, t3) <= _objective(numeric, y, d, 0.0, t2, t3) + 1e-10
        np.testing.assert_allclose(x, numeric, atol=2e-4)


def test_the_hard_case_of_a_lower_bound_spreads_the_rest_of_the_norm_over_the_smallest_metric():
    """No y where D is smallest and a bound beyond what x = D·y/(D + λ) reaches as λ → −min D:
    λ = −min D, the other coordinates at D·y/(D − min D) and the rest of the norm spread evenly
    (positive) over the smallest-D coordinates, one minimiser of many (any sign or direction
    within them); its objective is SLSQP's best. A zero y stays zero, as in the Euclidean step."""
    y = np.array([0.0, 0.3, 0.0, -0.2])
    d = np.array([0.5, 1.5, 0.5, 2.0])
    lo = 3.0
    x = _metric_step(y, d, 0.0, 0.0, lo, math.inf)
    rest = d[[1, 3]] * y[[1, 3]] / (d[[1, 3]] - 0.5)
    expected = np.array([0.0, rest[0], 0.0, rest[1]])
    expected[[0, 2]] = math.sqrt((lo ** 2 - np.sum(rest ** 2)) / 2)
    np.testing.assert_allclose(x, expected, rtol=1e-12)
    starts = [v * lo / np.linalg.norm(v) for v in np.random.default_rng(0).normal(size=(12, 4))]
    numeric = _solve(y, d, 0.0, 0.0, 0.0, math.inf, False, starts, lo=lo)
    assert abs(_objective(x, y, d, 0, 0, 0) - _objective(numeric, y, d, 0, 0, 0)) <= 1e-9
    near = y + np.array([1e-3, 0, 0, 0])  # a little y where D is smallest: not the hard case, and close to it
    x_near = _metric_step(near, d, 0.0, 0.0, lo, math.inf)
    assert np.linalg.norm(x_near) == pytest.approx(lo, rel=1e-12) and x_near[0] > 0 and x_near[2] == 0
    np.testing.assert_array_equal(_metric_step(np.zeros(4), d, 0.0, 0.0, lo, math.inf), np.zeros(4))


def test_a_lower_bound_in_the_metric_through_prox_(backend):
    """``unit_norm`` rows under ``prox_(metric=...)``: every row on the sphere, each the
    per-group step of the reference above, on every parameter (a whole-tensor bound as well)."""
    import fastreg

    g = torch.Generator().manual_seed(2)
    w = torch.randn(5, 4, generator=g, dtype=torch.float64)
    D = torch.exp(torch.randn(5, 4, generator=g, dtype=torch.float64))
    x = w.clone()
    fastreg.Penalty([("w", x)], l2=0.1, unit_norm=True, backend=backend).prox_(0.5, metric={"w": D})
    torch.testing.assert_close(x.norm(dim=1), torch.ones(5, dtype=torch.float64), rtol=1e-12, atol=0)
    for i in range(5):
        np.testing.assert_allclose(x[i].numpy(), _metric_step(w[i].numpy(), D[i].numpy(), 0.05, 0.0, 1.0, 1.0),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dim", [NO_GROUPS, 0, 1, WHOLE])
def test_an_identity_metric_is_the_euclidean_step(dim):
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64) * 2
    v = w.clone()
    row = _row(0.1, 0.1, 0.8, 0.9, False)
    torch_backend.prox_([w], None, Groups((dim,), (2 if dim == 0 else 1,)), row, None)
    torch_backend.prox_([v], None, Groups((dim,), (2 if dim == 0 else 1,)), row, None,
                        metric=_operand(Metric(torch.ones_like(v), root=False), v))
    torch.testing.assert_close(v, w, rtol=1e-13, atol=1e-15)


def test_prox_takes_a_metric_per_parameter_by_tensor_name_or_position():
    import fastreg

    torch.manual_seed(1)
    a, b = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    d_a, d_b = torch.rand(4, 3, dtype=torch.float64) + 0.5, torch.rand(5, dtype=torch.float64) + 0.5
    results = []
    for metric in ({"a": d_a, "b": d_b}, {a: d_a, b: d_b}, [d_a, d_b]):
        x, y = a.clone(), b.clone()
        reg = fastreg.Penalty([("a", x), ("b", y)], l1=0.2)
        reg.prox_(0.5, metric=metric if not isinstance(metric, dict) or "a" in metric else {x: d_a, y: d_b})
        results.append((x, y))
    for x, y in results:  # per coordinate: the threshold lr·l1/D
        torch.testing.assert_close(x, torch.sign(a) * (a.abs() - 0.1 / d_a).clamp(min=0), rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(y, torch.sign(b) * (b.abs() - 0.1 / d_b).clamp(min=0), rtol=1e-13, atol=1e-15)
    reg = fastreg.Penalty([("a", a)], l1=0.2)
    with pytest.raises(ValueError, match="metric of parameter 'a' has shape"):
        reg.prox_(0.5, metric={"a": torch.ones(3, 4, dtype=torch.float64)})


def test_a_metric_must_be_positive_and_given_once():
    import fastreg

    p = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    reg = fastreg.Penalty([("p", p)], l1=0.1)
    for bad in (-torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64),
                torch.full((1, 3), torch.inf, dtype=torch.float64), torch.tensor([[1.0, torch.nan, 1.0]])):
        with pytest.raises(ValueError, match="positive and finite"):
            reg.prox_(0.1, metric={"p": bad})
    with pytest.raises(ValueError, match="twice"):
        reg.prox_(0.1, metric={"p": torch.ones(1, 3, dtype=torch.float64), p: torch.ones(1, 3, dtype=torch.float64)})


@pytest.mark.parametrize("max_norm", [None, 0.6])
def test_a_coupled_group_steps_in_the_metric_as_one_group(backend, max_norm):
    """A neuron (its row of w1, its bias, its column of w2) is one group in the metric: the same
    step as one tensor holding the three slices side by side (the float64 reference of
    tests/backends/test_metric.py), with its exact zeros; an uncoupled tensor of the same
    Penalty steps on its own."""
    import fastreg
    from backends.test_metric import _reference

    g = torch.Generator().manual_seed(5)
    w1, b1, w2 = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((6, 4), (6,), (3, 6)))
    w1[2], b1[2], w2[:, 2] = 1e-3, -1e-3, 2e-3  # a neuron the group term removes
    other = torch.randn(5, 2, generator=g, dtype=torch.float64)
    D = {name: torch.exp(torch.randn(t.shape, generator=g, dtype=torch.float64))
         for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("other", other))}
    joined = torch.cat([w1, b1[:, None], w2.t()], dim=1)  # neuron j = row j
    joined_D = torch.cat([D["w1"], D["b1"][:, None], D["w2"].t()], dim=1)
    lr, l1, l2, group = 0.5, 0.02, 0.05, 0.4
    row = torch.tensor([lr * l1, 1 + 2 * lr * l2, lr * group, 0.0, max_norm or math.inf, 0.0], dtype=torch.float64)
    expected = _reference(joined, None, Metric(joined_D, root=False), row, 0, 1)
    expected_other = _reference(other, None, Metric(D["other"], root=False), row, 0, 1)
    params = [("w1", w1), ("b1", b1), ("w2", w2), ("other", other)]
    reg = fastreg.Penalty(params, l1=l1, l2=l2, group=group, max_norm=max_norm,
                          coupled=[[("w1", 0), ("b1", 0), ("w2", 1)]], backend=backend)
    reg.prox_(lr, metric=D)
    torch.testing.assert_close(torch.cat([w1, b1[:, None], w2.t()], dim=1), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(other, expected_other, rtol=1e-10, atol=1e-12)
    assert torch.equal(expected[2], torch.zeros(8, dtype=torch.float64))
    assert not bool(w1[2].any() or b1[2] or w2[:, 2].any())


def test_a_small_l2_keeps_its_precision_in_float32(backend):
    """2·lr·l2 = 2e-7 next to D ~ 1e-3 in float32: the metric step reads it exactly (a float32
    table would hold 1 + 2e-7 to within 6e-8, a 30% error on the L2 term)."""
    import fastreg

    g = torch.Generator().manual_seed(2)
    w = torch.randn(50, 40, generator=g)
    D = torch.rand(50, 40, generator=g, dtype=torch.float64) * 1e-3 + 1e-4
    expected = w.double() * D / (D + 2 * 1e-3 * 1e-4)
    reg = fastreg.Penalty([("w", w)], l2=1e-4, backend=backend)
    reg.prox_(1e-3, metric={"w": D.float()})
    torch.testing.assert_close(w.double(), expected.float().double(), rtol=2e-7, atol=0)


def test_a_metric_that_broadcasts_is_the_same_as_its_expansion(backend):
    """``metric={"w": 2.0-tensor}`` (or a row) means D = 2 everywhere: the kernels take one metric
    element per parameter element, so a broadcast metric is expanded, not refused inside a kernel."""
    import fastreg

    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.sign(w) * (w.abs() - 0.5 * 0.1 / 2).clamp(min=0)
    for D in (torch.tensor(2.0, dtype=torch.float64), torch.full((1, 3), 2.0, dtype=torch.float64)):
        x = w.clone()
        fastreg.Penalty([("w", x)], l1=0.1, backend=backend).prox_(0.5, metric={"w": D})
        torch.testing.assert_close(x, expected, rtol=1e-13, atol=1e-15)
