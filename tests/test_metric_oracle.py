"""Fixed points that solve the objective: an adaptive optimizer with ``attach(mode="prox")`` in
its own metric reaches scikit-learn's Lasso / ElasticNet / MultiTaskLasso solutions, and the
Euclidean step under the same optimizer measurably does not (a gradient-reweighted lasso).
The same for the norm constraints, projections in the metric: least squares on a ball (convex)
and on a sphere (not), against the trust-region subproblem's solution from an eigendecomposition."""

import numpy as np
import pytest
import torch

import fastreg

linear_model = pytest.importorskip("sklearn.linear_model")

OPTIMIZERS = {
    "adam": lambda params: torch.optim.Adam(params, lr=0.05),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.05, weight_decay=0.0),
    "amsgrad": lambda params: torch.optim.Adam(params, lr=0.05, amsgrad=True),
    "adagrad": lambda params: torch.optim.Adagrad(params, lr=0.5),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01),
}


def _problem(tasks=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(80, 10)) * np.linspace(0.3, 3.0, 10)  # features of very different scales
    truth = rng.normal(size=(10, tasks))
    truth[[1, 4, 6, 8]] = 0
    y = x @ truth + 0.1 * rng.normal(size=(80, tasks))
    return x, y


def _train(x, y, penalty_kwargs, optimizer, metric, steps=1500):
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    w = torch.zeros(x.shape[1:] if y.ndim == 1 else (x.shape[1], y.shape[1]), dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[optimizer]([w])
    fastreg.Penalty([("w", w)], **penalty_kwargs).attach(opt, mode="prox", metric=metric)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / (1 + t / 100) ** 0.6)  # decaying
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((xt @ w - yt) ** 2).sum() / len(x)).backward()  # sklearn's ½n⁻¹‖y − Xw‖²
        opt.step()
        schedule.step()
    return w.detach().numpy()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_lasso_is_reached_in_the_optimizers_metric_and_missed_in_the_euclidean_one(optimizer):
    x, y = _problem()
    oracle = linear_model.Lasso(alpha=0.1, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y[:, 0]).coef_
    metric = _train(x, y, {"l1": 0.1}, optimizer, "optimizer")[:, 0]
    np.testing.assert_allclose(metric, oracle, rtol=1e-5, atol=1e-7)
    assert np.array_equal(metric == 0, oracle == 0)  # the same support, exact zeros
    euclidean = _train(x, y, {"l1": 0.1}, optimizer, "euclidean", steps=300)[:, 0]
    assert np.abs(euclidean - oracle).max() > 1e-3 * np.abs(oracle).max()


def test_elastic_net_under_adam():
    x, y = _problem(tasks=1, seed=1)
    enet = linear_model.ElasticNet(alpha=0.1, l1_ratio=0.7, fit_intercept=False, tol=1e-14,
                                   max_iter=100_000).fit(x, y[:, 0]).coef_
    # sklearn: α·ρ·‖w‖₁ + ½α(1 − ρ)‖w‖²
    got = _train(x, y, {"l1": 0.07, "l2": 0.5 * 0.1 * 0.3}, "adam", "optimizer")[:, 0]
    np.testing.assert_allclose(got, enet, rtol=1e-5, atol=1e-7)


def test_multitask_lasso_under_adam():
    x, y = _problem(tasks=3, seed=1)
    multi = linear_model.MultiTaskLasso(alpha=0.2, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y).coef_.T
    got = _train(x, y, {"group": 0.2, "group_dim": 0}, "adam", "optimizer")
    np.testing.assert_allclose(got, multi, rtol=1e-5, atol=1e-7)
    assert np.array_equal((got == 0).all(axis=1), (multi == 0).all(axis=1))


def test_an_optimizer_without_a_known_metric_is_an_error_naming_the_way_out():
    w = torch.zeros(3, requires_grad=True)
    reg = fastreg.Penalty([w], l1=0.1)
    with pytest.raises(ValueError, match="metric='euclidean'"):
        reg.attach(torch.optim.Adamax([w]), mode="prox")
    with pytest.raises(ValueError, match="momentum"):
        reg.attach(torch.optim.RMSprop([w], momentum=0.9), mode="prox")
    reg.attach(torch.optim.Adamax([w]), mode="prox", metric="euclidean")  # by name: the plain step


def _least_squares_on_a_sphere(x, y, radius, lower):
    """argmin ½n⁻¹‖y − Xw‖² on ‖w‖ = radius: w = (A + λI)⁻¹b with ‖w‖ = radius, λ > −λ_min(A)
    (the global minimiser; A = XᵀX/n, b = Xᵀy/n), from A's eigendecomposition and a bracketed
    root — no fastreg code. ``lower``: the free solution's norm is below the radius (λ < 0)."""
    brentq = pytest.importorskip("scipy.optimize").brentq
    a, b = x.T @ x / len(x), x.T @ y / len(x)
    values, vectors = np.linalg.eigh(a)
    b_eig = vectors.T @ b
    lam = brentq(lambda t: np.linalg.norm(b_eig / (values + t)) - radius,
                 -values[0] + 1e-12 if lower else 0.0, 0.0 if lower else 1e6)
    return vectors @ (b_eig / (values + lam)), a, b


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_max_norm_is_reached_in_the_optimizers_metric_and_missed_in_the_euclidean_one(optimizer):
    """A ball smaller than the free solution (‖w_ls‖ = 2.6): the projection in the metric has
    the constrained minimiser as its fixed point; the Euclidean projection does not (it stops
    where g/D, not g, is normal to the sphere)."""
    x, y = _problem(seed=2)
    oracle, _, _ = _least_squares_on_a_sphere(x, y[:, 0], 1.0, lower=False)
    metric = _train(x, y[:, 0], {"max_norm": 1.0}, optimizer, "optimizer")
    np.testing.assert_allclose(metric, oracle, rtol=1e-5, atol=1e-7)
    euclidean = _train(x, y[:, 0], {"max_norm": 1.0}, optimizer, "euclidean", steps=300)
    assert np.abs(euclidean - oracle).max() > 0.1 * np.abs(oracle).max()


def test_a_lower_norm_bound_is_reached_in_the_optimizers_metric():
    """unit_norm with a free solution of norm 0.4, a non-convex problem: every fixed point of
    the metric step is a KKT point of least squares on the sphere (g = −λw), whichever local
    minimiser the optimizer's path leads to. Adagrad reaches the global one to 1e-5; Adam a
    KKT point; the Euclidean step under Adam stops far from any (g/D, not g, normal to it)."""
    x, y = _problem(seed=2)
    y = 0.15 * y[:, 0]
    oracle, a, b = _least_squares_on_a_sphere(x, y, 1.0, lower=True)

    def kkt_residual(w):
        g = a @ w - b
        return np.linalg.norm(g - (g @ w) / (w @ w) * w) / np.linalg.norm(g)

    adagrad = _train(x, y, {"unit_norm": True}, "adagrad", "optimizer")
    np.testing.assert_allclose(adagrad, oracle, rtol=1e-5, atol=1e-7)
    adam = _train(x, y, {"unit_norm": True}, "adam", "optimizer")
    assert np.linalg.norm(adam) == pytest.approx(1.0, rel=1e-12) and kkt_residual(adam) < 1e-3
    euclidean = _train(x, y, {"unit_norm": True}, "adam", "euclidean")
    assert kkt_residual(euclidean) > 0.1
