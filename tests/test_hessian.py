"""Tests of dattri.func.hessian against dense float64 Hessians.

The model is L2-regularised logistic regression on sklearn's breast-cancer data
(569 examples, 30 standardised features + bias, P = 31).
"""

import pytest
import torch

from dattri.errors import DattriValueError
from dattri.func.hessian import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)

sklearn_datasets = pytest.importorskip("sklearn.datasets")

L2 = 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny problems: one thread avoids oversubscription on shared CPUs."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def lr_problem():
    data = sklearn_datasets.load_breast_cancer()
    X = torch.tensor(data.data, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0)
    y = torch.tensor(data.target, dtype=torch.float64)
    w = 0.1 * torch.randn(31, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss(w, X, y):
        logits = X @ w[:-1] + w[-1]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return bce + 0.5 * L2 * (w * w).sum()

    H = torch.autograd.functional.hessian(lambda p: loss(p, X, y), w)
    V = torch.randn(5, 31, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return loss, w, X, y, H, V


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------- HVP
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_matches_dense_hessian(lr_problem, mode):
    loss, w, X, y, H, V = lr_problem
    f = hvp(loss, argnums=0, mode=mode, regularization=0.3)
    Hr = H + 0.3 * torch.eye(31, dtype=torch.float64)
    torch.testing.assert_close(f((w, X, y), V), V @ Hr)
    torch.testing.assert_close(f(w, X, y, V[0]), Hr @ V[0])  # unpacked form
    g = hvp_at_x(loss, (w, X, y), argnums=0, mode=mode)
    torch.testing.assert_close(g(V), V @ H)
    torch.testing.assert_close(g(V[1]), H @ V[1])


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_other_argnums_and_matrix_argument(mode):
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(4, generator=gen, dtype=torch.float64)

    def f(z, W):
        return torch.tanh(W @ z).pow(2).sum() + (W**3).sum()

    Hfull = torch.autograd.functional.hessian(lambda m: f(z, m.reshape(3, 4)), W.reshape(-1))
    V = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    out = hvp(f, argnums=1, mode=mode)((z, W), V)
    assert out.shape == (2, 3, 4)
    torch.testing.assert_close(out.reshape(2, 12), V.reshape(2, 12) @ Hfull)
    out1 = hvp_at_x(f, (z, W), argnums=-1, mode=mode)(V[0])
    torch.testing.assert_close(out1.reshape(12), Hfull @ V[0].reshape(12))


# ------------------------------------------------------------- IHVP solvers
def _reference(H, V, reg):
    return torch.linalg.solve(H + reg * torch.eye(H.shape[0], dtype=H.dtype), V.T).T


SOLVERS = {
    # name: (factory of the x-version, of the at_x-version, kwargs, reg, rel tol)
    "explicit": (ihvp_explicit, ihvp_at_x_explicit, {"regularization": 0.01}, 0.01, 1e-10),
    "cg": (ihvp_cg, ihvp_at_x_cg,
           {"max_iter": 200, "tol": 1e-12, "regularization": 0.01}, 0.01, 1e-8),
    "arnoldi": (ihvp_arnoldi, ihvp_at_x_arnoldi,
                {"max_iter": 31, "top_k": 31, "regularization": 0.01}, 0.01, 1e-6),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_ihvp_solvers_converge(lr_problem, name):
    loss, w, X, y, H, V = lr_problem
    make_x, make_at_x, kwargs, reg, tol = SOLVERS[name]
    ref = _reference(H, V, reg)
    at_x = make_at_x(loss, w, X, y, argnums=0, **kwargs)
    out = at_x(V)
    assert out.shape == V.shape and _rel(out, ref) < tol
    assert _rel(at_x(V[3]), ref[3]) < tol
    torch.testing.assert_close(make_x(loss, argnums=0, **kwargs)((w, X, y), V), out)


@pytest.mark.parametrize("name", ["cg", "arnoldi"])
def test_rev_rev_equals_rev_fwd(lr_problem, name):
    loss, w, X, y, _, V = lr_problem
    _, make_at_x, kwargs, _, _ = SOLVERS[name]
    a = make_at_x(loss, w, X, y, mode="rev-rev", **kwargs)(V)
    b = make_at_x(loss, w, X, y, mode="rev-fwd", **kwargs)(V)
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_cg_max_iter_caps_iterations(lr_problem):
    """3 iterations are far from the solution, 200 are not."""
    loss, w, X, y, H, V = lr_problem
    ref = _reference(H, V, 0.0)
    short = ihvp_at_x_cg(loss, w, X, y, max_iter=3)(V)
    long = ihvp_at_x_cg(loss, w, X, y, max_iter=200, tol=1e-12)(V)
    assert _rel(long, ref) < 1e-8 < _rel(short, ref)


def test_cg_stops_at_tol(monkeypatch):
    """A quadratic whose Hessian has 3 distinct eigenvalues: CG needs 3 HVP blocks."""
    import dattri.func.hessian as hess

    gen = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen, dtype=torch.float64))
    A = (Q * torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64).repeat(4)) @ Q.T
    calls = []
    real = hess.cg_solve

    def counting(matmat, B, **kw):
        return real(lambda V: calls.append(V.shape[0]) or matmat(V), B, **kw)

    monkeypatch.setattr(hess, "cg_solve", counting)
    V = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    out = ihvp_at_x_cg(lambda w: 0.5 * w @ A @ w, torch.zeros(12, dtype=torch.float64),
                       max_iter=50, tol=1e-10)(V)
    assert calls == [4, 4, 4]
    torch.testing.assert_close(out, torch.linalg.solve(A, V.T).T)


def test_lissa_full_batch_converges(lr_problem):
    loss, w, X, y, H, V = lr_problem
    scaling, damping = 4.0, 0.02  # eigenvalues of H lie in [0.05, 2.9]
    evals = torch.linalg.eigvalsh(H)
    rate = (1 - damping - evals / scaling).abs().max()
    assert rate < 0.97 and rate**600 < 1e-8  # contraction of the recursion
    ref = _reference(H, V, damping * scaling)
    f = ihvp_at_x_lissa(loss, w, X, y, batch_size=569, recursion_depth=600,
                        damping=damping, scaling=scaling)
    out = f(V)
    assert out.shape == V.shape and _rel(out, ref) < 1e-6
    assert _rel(f(V[2]), ref[2]) < 1e-6


def test_lissa_minibatch_and_x_version_agree(lr_problem):
    loss, w, X, y, H, V = lr_problem
    ref = _reference(H, V, 0.02 * 4.0)
    kw = {"batch_size": 64, "recursion_depth": 300, "scaling": 4.0, "damping": 0.02,
          "seed": 0}
    a = ihvp_at_x_lissa(loss, w, X, y, in_dims=(None, 0, 0), **kw)(V)
    b = ihvp_lissa(loss, **kw)((w, X, y), V, in_dims=(None, 0, 0))
    torch.testing.assert_close(a, b)  # same seed, same minibatches
    assert _rel(a, ref) < 0.08  # stochastic estimate (about 0.025 here), not exact


def test_lissa_collate_fn(lr_problem):
    loss, w, X, y, H, V = lr_problem
    data = torch.cat([X, y[:, None]], dim=1)

    def loss2(w, data):
        return loss(w, data[:, :-1], data[:, -1])

    kw = {"batch_size": 100, "recursion_depth": 50, "damping": 0.02, "scaling": 4.0,
          "seed": 3}
    out = ihvp_at_x_lissa(loss2, w, data, **kw)(V[0])
    out_c = ihvp_at_x_lissa(loss, w, X, y, **kw)(V[0])
    torch.testing.assert_close(out, out_c)
    seen = []

    def collate(batch):
        seen.append(batch[1].shape[0])
        return batch

    ihvp_at_x_lissa(loss, w, X, y, batch_size=7, recursion_depth=3, collate_fn=collate)(V)
    assert seen == [7, 7, 7]


def test_demo2_runs_as_printed():
    from dattri.func.hessian import ihvp_cg, ihvp_at_x_cg

    def f(x, param):  # target function
        return torch.sin(x / param).sum()

    x = torch.randn(2)
    param = torch.randn(1)
    v = torch.randn(5, 2)
    # ihvp_cg method
    ihvp_func = ihvp_cg(f, argnums=0, max_iter=2)  # argnums=0 indicates that the param
    #   of (x, param) to be passed to ihvp_func is the model parameter
    ihvp_result_1 = ihvp_func((x, param), v)  # both (x, param) and v as the inputs
    # ihvp_at_x_cg method: (x, param) is cached
    ihvp_at_x_func = ihvp_at_x_cg(f, x, param, argnums=0, max_iter=2)
    ihvp_result_2 = ihvp_at_x_func(v)  # only v as the input
    # the above two will give the same result
    assert torch.allclose(ihvp_result_1, ihvp_result_2)
    # and, in float64, 2 CG steps solve this 2 x 2 (diagonal) system exactly
    xd, pd, vd = x.double(), param.double(), v.double()
    Hd = torch.diag(-torch.sin(xd / pd) / pd**2)
    out = ihvp_cg(f, argnums=0, max_iter=2)((xd, pd), vd)
    torch.testing.assert_close(out, torch.linalg.solve(Hd, vd.T).T)


# --------------------------------------------------------------------- errors
def test_errors(lr_problem):
    loss, w, X, y, _, V = lr_problem
    with pytest.raises(DattriValueError, match="`mode`.*'fwd-fwd'"):
        hvp(loss, mode="fwd-fwd")
    with pytest.raises(DattriValueError, match="`mode`"):
        ihvp_at_x_cg(loss, w, X, y, mode="rev")
    with pytest.raises(DattriValueError, match="`argnums` must be one int"):
        ihvp_cg(loss, argnums=(0, 1))
    with pytest.raises(DattriValueError, match="`argnums`=5 is out of range"):
        hvp_at_x(loss, (w, X, y), argnums=5)
    with pytest.raises(DattriValueError, match=r"`v` must have the shape.*\(31,\)"):
        ihvp_at_x_explicit(loss, w, X, y)(torch.zeros(30, dtype=torch.float64))
    with pytest.raises(DattriValueError, match="`batch_size` must be an int in"):
        ihvp_at_x_lissa(loss, w, X, y, batch_size=1000)
    with pytest.raises(DattriValueError, match="`in_dims` has 2 entries"):
        ihvp_at_x_lissa(loss, w, X, y, in_dims=(None, 0))
    with pytest.raises(DattriValueError, match=r"`in_dims\[0\]`"):
        ihvp_at_x_lissa(loss, w, X, y, in_dims=(0, 0, 0))
    with pytest.raises(DattriValueError, match="disagree on the number of examples"):
        ihvp_at_x_lissa(loss, w, X, y[:10])
