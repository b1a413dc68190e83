"""scikit-learn as the oracle: proximal gradient descent with ``prox_`` reaches the solutions of
``MultiTaskLasso`` (blocks: ``group_size``) and of ``Lasso`` / ``ElasticNet`` set up as param
groups, on least-squares problems whose minimizers sklearn computes by coordinate descent."""

import numpy as np
import pytest
import torch

import fastreg

linear_model = pytest.importorskip("sklearn.linear_model")


def _problem(n=60, features=12, tasks=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features))
    truth = rng.normal(size=(features, tasks))
    truth[rng.permutation(features)[: features // 2]] = 0  # half the features unused
    y = x @ truth + 0.1 * rng.normal(size=(n, tasks))
    return x, y


def _step_size(x):
    return 1.0 / np.linalg.eigvalsh(x.T @ x / len(x)).max()  # 1/L of ½n⁻¹‖Y − XW‖²


@pytest.mark.parametrize("k", [1, 2, 3])
def test_blocks_reach_multitask_lasso(backend, k):
    x, y = _problem()
    alpha = 0.3
    oracle = linear_model.MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000).fit(x, y)
    features, tasks = x.shape[1], y.shape[1]
    # Row j of W (one feature across the tasks) is a block of k rows of P = W.view(F·k, T/k).
    p = torch.zeros(features * k, tasks // k, dtype=torch.float64)
    reg = fastreg.Penalty([("P", p)], group=alpha, group_dim=0, group_size=k, backend=backend)
    xt, yt, lr = torch.from_numpy(x), torch.from_numpy(y), _step_size(x)
    for _ in range(4000):  # proximal gradient: W ← prox(W − lr·∇)
        w = p.view(features, tasks)
        with torch.no_grad():
            p -= lr * (xt.T @ (xt @ w - yt) / len(x)).view_as(p)
        reg.prox_(lr)
    w = p.view(features, tasks)
    np.testing.assert_allclose(w.numpy(), oracle.coef_.T, rtol=1e-6, atol=1e-8)
    assert np.array_equal((w == 0).all(dim=1).numpy(), (oracle.coef_.T == 0).all(axis=1))


def test_param_groups_reach_lasso_and_elastic_net_at_once(backend):
    # Two independent single-task problems stacked as two parameters of one Penalty, each with
    # its own settings: Lasso(α=0.2) and ElasticNet(α=0.3, l1_ratio=0.6).
    x, y = _problem(tasks=2, seed=1)
    lasso = linear_model.Lasso(alpha=0.2, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y[:, 0])
    enet = linear_model.ElasticNet(alpha=0.3, l1_ratio=0.6, fit_intercept=False, tol=1e-14,
                                   max_iter=100_000).fit(x, y[:, 1])
    a = torch.zeros(x.shape[1], 1, dtype=torch.float64)
    b = torch.zeros(x.shape[1], 1, dtype=torch.float64)
    # sklearn's ElasticNet: α·ρ·‖w‖₁ + ½α(1 − ρ)‖w‖²; fastreg's l2 multiplies ‖w‖² directly.
    reg = fastreg.Penalty([{"params": [("a", a)], "l1": 0.2},
                           {"params": [("b", b)], "l1": 0.3 * 0.6, "l2": 0.5 * 0.3 * 0.4}], backend=backend)
    xt, yt, lr = torch.from_numpy(x), torch.from_numpy(y), _step_size(x)
    for _ in range(4000):
        w = torch.cat([a, b], dim=1)
        grad = xt.T @ (xt @ w - yt) / len(x)
        with torch.no_grad():
            a -= lr * grad[:, :1]
            b -= lr * grad[:, 1:]
        reg.prox_(lr)
    np.testing.assert_allclose(a[:, 0].numpy(), lasso.coef_, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(b[:, 0].numpy(), enet.coef_, rtol=1e-7, atol=1e-10)
    assert np.array_equal(a[:, 0].numpy() == 0, lasso.coef_ == 0)
