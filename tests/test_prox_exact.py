"""The proximal step of every combination of terms and constraints is exact: for one group,
``_terms.prox_group_factor`` (what every backend applies) against a numerical solve of

    x* = argmin ½‖x − y‖² + t1‖x‖₁ + t2‖x‖² + t3‖x‖   subject to  lo <= ‖x‖ <= hi  (and x >= 0)

in float64 with scipy's SLSQP from several starts (x = x⁺ − x⁻ makes the L1 term smooth). The
closed form must reach an objective no worse than the solver's, and agree with it to the
solver's precision; random feasible perturbations must not improve on it."""

import itertools
import math

import numpy as np
import pytest
import torch

from fastreg.backends._terms import Prox, prox_group_factor

optimize = pytest.importorskip("scipy.optimize")

TERMS = {"l1": (0.3, 0.0, 0.0), "l2": (0.0, 0.4, 0.0), "group": (0.0, 0.0, 0.8), "l1+group": (0.3, 0.0, 0.8),
         "all": (0.3, 0.4, 0.8), "none": (0.0, 0.0, 0.0)}
CONSTRAINTS = {"free": (0.0, math.inf, False), "max_norm": (0.0, 0.7, False), "min_max_norm": (0.9, 1.6, False),
               "unit_norm": (1.0, 1.0, False), "nonneg": (0.0, math.inf, True), "nonneg+max_norm": (0.0, 0.7, True)}


def closed_form(y, t1, t2, t3, lo, hi, nonneg):
    y = torch.as_tensor(y, dtype=torch.float64)
    s = (y - t1).clamp(min=0) if nonneg else torch.sign(y) * (y.abs() - t1).clamp(min=0)
    factor = prox_group_factor(s.norm().reshape(1), torch.tensor(t3, dtype=torch.float64),
                               torch.tensor(1 + 2 * t2, dtype=torch.float64), torch.tensor(lo, dtype=torch.float64),
                               torch.tensor(hi, dtype=torch.float64))
    return (s * factor).numpy()


def objective(x, y, t1, t2, t3):
    return 0.5 * np.sum((x - y) ** 2) + t1 * np.sum(np.abs(x)) + t2 * np.sum(x ** 2) + t3 * np.linalg.norm(x)


def solve(y, t1, t2, t3, lo, hi, nonneg, starts):
    n = len(y)

    def f(z):
        x = z[:n] - z[n:]
        return (0.5 * np.sum((x - y) ** 2) + t1 * np.sum(z) + t2 * np.sum(x ** 2)
                + t3 * math.sqrt(np.sum(x ** 2) + 1e-30))

    constraints = []
    if hi < math.inf:
        constraints.append({"type": "ineq", "fun": lambda z: hi ** 2 - np.sum((z[:n] - z[n:]) ** 2)})
    if lo > 0:
        constraints.append({"type": "ineq", "fun": lambda z: np.sum((z[:n] - z[n:]) ** 2) - lo ** 2})
    bounds = [(0, None)] * n + [(0, 0) if nonneg else (0, None)] * n
    best = None
    for start in starts:
        z0 = np.concatenate([np.maximum(start, 0), np.zeros(n) if nonneg else np.maximum(-start, 0)])
        result = optimize.minimize(f, z0, method="SLSQP", bounds=bounds, constraints=constraints,
                                   options={"ftol": 1e-15, "maxiter": 2000})
        x = _project(result.x[:n] - result.x[n:], lo, hi, nonneg)  # the solver's small violations removed
        if _feasible(x, lo, hi, nonneg, 1e-12) and (best is None or objective(x, y, t1, t2, t3)
                                                    < objective(best, y, t1, t2, t3)):
            best = x
    return best


def _project(x, lo, hi, nonneg):
    if nonneg:
        x = np.maximum(x, 0)
    norm = np.linalg.norm(x)
    return x * min(max(norm, lo), hi) / norm if norm > 0 else x


def _feasible(x, lo, hi, nonneg, tol):
    norm = np.linalg.norm(x)
    return lo - tol <= norm <= hi + tol and (not nonneg or (x >= -tol).all())


def _allowed(terms, constraint):
    lo = CONSTRAINTS[constraint][0]
    return not (lo > 0 and (TERMS[terms][0] > 0 or CONSTRAINTS[constraint][2]))  # refused by the plan


@pytest.mark.parametrize("terms, constraint", [c for c in itertools.product(TERMS, CONSTRAINTS) if _allowed(*c)])
def test_the_closed_form_is_the_argmin(terms, constraint):
    t1, t2, t3 = TERMS[terms]
    lo, hi, nonneg = CONSTRAINTS[constraint]
    rng = np.random.default_rng(7)
    for scale in (0.2, 1.0, 3.0):  # groups zeroed, shrunk, clipped
        y = rng.normal(size=5) * scale
        x = closed_form(y, t1, t2, t3, lo, hi, nonneg)
        if lo > 0 and not np.any(x):
            assert not np.any(y)  # a zero group stays zero only if it was zero
            continue
        assert _feasible(x, lo, hi, nonneg, 1e-12)
        best = objective(x, y, t1, t2, t3)
        starts = [x + rng.normal(size=5) * 0.3 for _ in range(4)] + [y, rng.normal(size=5)]
        numeric = solve(y, t1, t2, t3, lo, hi, nonneg, starts)
        assert numeric is not None
        assert best <= objective(numeric, y, t1, t2, t3) + 1e-10
        np.testing.assert_allclose(x, numeric, atol=2e-4)
        for _ in range(200):  # no feasible point nearby does better
            z = _project(x + rng.normal(size=5) * rng.choice([1e-6, 1e-3, 1e-1]), lo, hi, nonneg)
            assert best <= objective(z, y, t1, t2, t3) + 1e-12


def test_without_constraints_the_factor_is_bitwise_the_unconstrained_one():
    norms = torch.tensor([0.0, 0.3, 1.0, 7.5], dtype=torch.float64)
    t3, den = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.2, dtype=torch.float64)
    free = prox_group_factor(norms, t3, den, torch.tensor(0.0, dtype=torch.float64),
                             torch.tensor(math.inf, dtype=torch.float64))
    positive = norms > 0
    old = torch.where(positive, (1 - t3 / torch.where(positive, norms, 1)).clamp(min=0), 0) / den
    assert torch.equal(free, old)
    assert len(Prox) == 6
