"""RPS-L2's fit (damped Newton) against a float64 scipy optimum, and the representer theorem."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import RPSAttributor
from dattri.algorithm import rps as rps_module
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

scipy_optimize = pytest.importorskip("scipy.optimize")


class _Net(nn.Module):
    def __init__(self, d_in=5, d_hidden=4, c=3):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, c)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _case(n=40, n_test=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n_test, 5, generator=g)
    y = (x[:, :3] + 0.8 * torch.randn(n + n_test, 3, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = _Net()
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=16)
    test = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=4)
    return model, train, test, x, y


def _features(model, x, normalize=False):
    h = torch.tanh(model.fc1(x)).detach().double()
    if normalize:
        h = h / h.norm(dim=1, keepdim=True)
    return torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], 1)


def _scipy_optimum(h, y, lam, c=3):
    """argmin (1/n) sum_j CE(W h_j, y_j) + lam ||W||^2 by scipy's BFGS, to gtol 1e-12."""
    n, d = h.shape
    hn, onehot = h.numpy(), np.eye(c)[y.numpy()]

    def fun(wflat):
        w = wflat.reshape(c, d)
        z = hn @ w.T
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        loss = -np.log((p * onehot).sum(1)).mean() + lam * (w * w).sum()
        grad = (p - onehot).T @ hn / n + 2 * lam * w
        return loss, grad.ravel()

    res = scipy_optimize.minimize(fun, np.zeros(c * d), jac=True, method="BFGS",
                                  options={"gtol": 1e-12, "maxiter": 10_000})
    return torch.from_numpy(res.x.reshape(c, d))


@pytest.mark.parametrize(("lam", "normalize"), [(0.05, False), (1e-3, True), (3.0, False)])
def test_newton_fit_is_the_float64_optimum_and_alpha_satisfies_the_representer_theorem(
        lam, normalize):
    model, train, test, x, y = _case()
    task = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=model.state_dict())
    att = RPSAttributor(task, "fc2", normalize_preactivate=normalize, l2_strength=lam).cache(train)
    h = _features(model, x[:40], normalize)
    ref = _scipy_optimum(h, y[:40], lam)
    torch.testing.assert_close(att.weight, ref, rtol=1e-6, atol=1e-8)
    assert att.stationarity <= 1e-10 and att.newton_iterations < 30
    assert 1 <= att.hessian_factorizations <= att.newton_iterations
    # alpha_j = -(1/(2 lam n)) dCE_j/dPhi_j at the optimum, in closed form
    p = torch.softmax(h @ ref.T, 1)
    alpha = -(p - F.one_hot(y[:40], 3).double()) / (2 * lam * 40)
    torch.testing.assert_close(att.alpha, alpha, rtol=1e-6, atol=1e-9)
    # W = sum_j alpha_j h_j^T, so the decomposition reproduces every test pre-activation
    h_t = _features(model, x[40:], normalize)
    parts = att.decompose(test)
    torch.testing.assert_close(parts.sum(0), h_t @ att.weight.T, rtol=1e-9, atol=1e-11)
    scores = att.attribute(train, test)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, parts[:, torch.arange(7), y[40:]].float())


def test_a_summed_loss_is_the_mean_loss_fit_with_lambda_over_n():
    """``sum CE + lam ||W||^2`` has the optimum of ``mean CE + (lam / n) ||W||^2``; the
    representer values of the summed fit still add up to its outputs."""
    model, train, test, x, y = _case()
    summed = AttributionTask(loss_func=lambda pre, t: F.cross_entropy(pre, t, reduction="sum"),
                             model=model, checkpoints=model.state_dict())
    att = RPSAttributor(summed, "fc2", l2_strength=2.0).cache(train)
    h = _features(model, x[:40])
    ref = _scipy_optimum(h, y[:40], 2.0 / 40)
    torch.testing.assert_close(att.weight, ref, rtol=1e-6, atol=1e-8)
    p = torch.softmax(h @ ref.T, 1)
    torch.testing.assert_close(att.alpha, -(p - F.one_hot(y[:40], 3).double()) / (2 * 2.0),
                               rtol=1e-6, atol=1e-9)
    parts = att.decompose(test)
    torch.testing.assert_close(parts.sum(0), _features(model, x[40:]) @ att.weight.T,
                               rtol=1e-9, atol=1e-11)


def test_fewer_examples_than_features_solve_in_their_row_space():
    """n = 3 < d + 1 = 5: W lies in the span of the 3 feature rows and is the optimum."""
    model, train, test, x, y = _case(n=3, n_test=2, seed=5)
    task = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=model.state_dict())
    att = RPSAttributor(task, "fc2", l2_strength=0.02).cache(train)
    h = _features(model, x[:3])
    torch.testing.assert_close(att.weight, _scipy_optimum(h, y[:3], 0.02), rtol=1e-6, atol=1e-8)
    coef = torch.linalg.lstsq(h.T, att.weight.T).solution  # W^T = h^T coef exactly
    torch.testing.assert_close(h.T @ coef, att.weight.T, rtol=0, atol=1e-12)
    h_t = _features(model, x[3:])
    torch.testing.assert_close(att.decompose(test).sum(0), h_t @ att.weight.T, rtol=1e-9,
                               atol=1e-11)


def test_the_fit_leaves_the_model_untouched_and_starts_from_its_layer():
    model, train, _, _, _ = _case(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=model.state_dict())
    RPSAttributor(task, "fc2", l2_strength=0.01).cache(train)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_cg_newton_systems_give_the_dense_solution(monkeypatch):
    """Above DENSE_NEWTON_MAX_PARAMS each Newton system is solved by CG: same optimum."""
    model, train, _, _, _ = _case(seed=1)
    task = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=model.state_dict())
    dense = RPSAttributor(task, "fc2", l2_strength=0.02).cache(train)
    monkeypatch.setattr(rps_module, "DENSE_NEWTON_MAX_PARAMS", 1)
    cg = RPSAttributor(task, "fc2", l2_strength=0.02).cache(train)
    torch.testing.assert_close(cg.weight, dense.weight, rtol=1e-7, atol=1e-10)
    assert cg.stationarity <= 1e-10


def test_dense_hessian_and_hvp_match_autograd():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    prob = rps_module._L2Problem(F.cross_entropy, h, y, 0.3)
    ref = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(h @ v.reshape(3, 4).T, y) + 0.3 * (v * v).sum(), w.reshape(-1))
    lam_j = prob.output_hessians(w)
    dense = prob.dense_hessian(lam_j)  # block upper triangle: what Cholesky(upper) reads
    torch.testing.assert_close(dense.triu() + dense.triu(1).T, ref)
    assert torch.count_nonzero(dense[4:8, :4]) == 0 and torch.count_nonzero(dense[8:, :8]) == 0
    v = torch.randn(2, 12, generator=g, dtype=torch.float64)
    torch.testing.assert_close(prob.hvp(lam_j, v) + 0.6 * v, v @ ref)


@pytest.mark.parametrize("tol", [1e-1, 1e-4, 1e-10])
def test_a_newton_direction_meets_its_forcing_tolerance_and_no_more_is_claimed(tol):
    """Inexact Newton: the system ``H s = -g`` is solved to ``|H s + g| <= tol |g|``
    (checked with the autograd Hessian), by PCG preconditioned with the Cholesky
    factor of another point's Hessian."""
    g = torch.Generator().manual_seed(5)
    h = torch.randn(60, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (60,), generator=g)
    prob = rps_module._L2Problem(F.cross_entropy, h, y, 0.01)
    w0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    prob.newton_direction(w0, torch.randn(4, 6, generator=g, dtype=torch.float64))  # factor at w0
    w = w0 + 0.5 * torch.randn(4, 6, generator=g, dtype=torch.float64)
    grad = torch.randn(4, 6, generator=g, dtype=torch.float64)
    calls = []
    real_pcg = rps_module._pcg

    def counting_pcg(apply_a, b, apply_m, tol_):
        calls.append(tol_)
        return real_pcg(apply_a, b, apply_m, tol_)

    rps_module._pcg = counting_pcg
    try:
        step = prob.newton_direction(w, grad, tol)
    finally:
        rps_module._pcg = real_pcg
    ref = torch.autograd.functional.hessian(
        lambda v: F.cross_entropy(h @ v.reshape(4, 6).T, y) + 0.01 * (v * v).sum(), w.reshape(-1))
    residual = float((ref @ step.reshape(-1) + grad.reshape(-1)).norm() / grad.norm())
    assert calls == [tol] and prob.factorizations == 1  # by PCG, not a new factor
    assert residual <= tol * (1 + 1e-6)


def test_epoch_caps_the_newton_iterations_with_a_warning():
    model, train, _, _, _ = _case(seed=4)
    task = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=model.state_dict())
    with pytest.warns(RuntimeWarning, match=r"stopped after 1 Newton iteration.*Raise epoch=1"):
        att = RPSAttributor(task, "fc2", l2_strength=1e-3, epoch=1).cache(train)
    assert att.newton_iterations == 1 and att.stationarity > 1e-10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RPSAttributor(task, "fc2", l2_strength=1e-3).cache(train)
    for bad in (0, 2.5, True):
        with pytest.raises(DattriValueError, match="epoch="):
            RPSAttributor(task, "fc2", epoch=bad)
    with pytest.raises(DattriValueError, match="l2_strength=0"):
        RPSAttributor(task, "fc2", l2_strength=0)


def _vmap_output_hessians(loss_fn, pre, y):
    def one(p, yi):
        return loss_fn(p.unsqueeze(0), yi.unsqueeze(0))
    return torch.func.vmap(torch.func.hessian(one))(pre, y) / pre.shape[0]


@pytest.mark.parametrize("loss", ["mean", "sum", "coupled"])
def test_output_hessians_equal_the_per_example_definition(loss):
    """The batched C-backward output Hessians are the blocks of the batch loss's own
    Hessian: vmap(hessian) over batches of one (float64) times 1/n for a mean, times 1
    for a sum over examples (session 15: it was 1/n for a sum too, so the Newton
    fit of a summed loss used a Hessian n times too small and did not converge); a
    loss coupling the examples (a batch statistic) takes the per-example definition
    itself, times 1/n."""
    from dattri.algorithm.rps import _L2Problem

    torch.manual_seed(0)
    h, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,))
    w = torch.randn(4, 6, dtype=torch.float64)
    fns = {
        "mean": lambda p, t: torch.nn.functional.cross_entropy(p, t),
        "sum": lambda p, t: torch.nn.functional.cross_entropy(p, t, reduction="sum"),
        # scaled by a statistic of the whole batch: the batched rows are not the
        # per-example Hessians, fail the check, and the definition is used
        "coupled": lambda p, t: torch.nn.functional.cross_entropy(p, t) * (1 + p.pow(2).mean()),
    }
    prob = _L2Problem(fns[loss], h, y, 0.1)
    want = _vmap_output_hessians(fns[loss], (h @ w.T).detach(), y) * (40 if loss == "sum" else 1)
    torch.testing.assert_close(prob.output_hessians(w), want, rtol=1e-10, atol=1e-14)
    batched = rps_module._batch_output_hessians(fns[loss], (h @ w.T).detach(), y)
    assert torch.allclose(batched, want, rtol=1e-8) == (loss != "coupled")
