"""Iterative solvers report failure instead of returning a wrong answer silently.

- CG (``cg_solve``, ``cg_multishift_solve``, ``ihvp_at_x_cg``) that stops at
  ``max_iter`` above ``tol`` warns exactly once per solve (and once per
  ``summarize_unconverged`` block), with the count and the worst residual; a
  converged CG does not warn.
- A diverging LiSSA raises ``NonFiniteError`` naming ``scaling``; a converging one
  (exact or minibatch products) does not, and still equals the dense damped inverse.

References are dense ``torch.linalg.solve`` in float64.
"""

import re
import warnings

import pytest
import torch

from dattri.errors import NonFiniteError
from dattri.func.hessian import ihvp_at_x_cg, ihvp_at_x_lissa, ihvp_cg
from dattri.linalg import cg_multishift_solve, cg_solve, lissa_solve
from dattri.linalg.solvers import summarize_unconverged

pytestmark = pytest.mark.usefixtures("float64")

UNCONVERGED = "did not converge"


def _spd(p, lo, hi, seed=0):
    """``Q diag(logspace(lo, hi)) Q^T`` and its eigenvalues."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen))
    ev = torch.logspace(lo, hi, p)
    return Q @ torch.diag(ev) @ Q.T, ev, Q


def _solve(M, B):
    return torch.linalg.solve(M, B.T).T


def _relres(M, X, B):
    return ((X @ M - B).norm(dim=1) / B.norm(dim=1))


def _ours(record):
    return [w for w in record if UNCONVERGED in str(w.message)]


def _worst(message):
    return float(re.search(r"worst ([0-9.e+-]+)\)", message).group(1))


# ----------------------------------------------------------------------- CG
def test_cg_unconverged_warns_once_with_count_and_worst_residual():
    """The audit's case: eigenvalues 1e-3..1e2, max_iter=10, relative residual above
    1 (worse than x = 0) returned without a word by the old code."""
    S, _, _ = _spd(30, -3, 2)
    B = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        X = cg_solve(lambda V: V @ S, B, max_iter=10)
    res = _relres(S, X, B)
    assert res.min() > 1e-7  # indeed unconverged against the dense operator
    ours = _ours(rec)
    assert len(ours) == 1 and len(rec) == 1  # once per solve, not per row / iteration
    msg = str(ours[0].message)
    assert ours[0].category is RuntimeWarning
    assert "4 of 4 right-hand side(s)" in msg and "max_iter=10" in msg and "tol=1e-07" in msg
    assert "`max_iter`" in msg and "`regularization`" in msg
    # the worst residual CG tracks is the true one (to rounding)
    assert _worst(msg) == pytest.approx(float(res.max()), rel=1e-2)


def test_cg_counts_only_the_unconverged_rows():
    S, ev, Q = _spd(30, -3, 2)
    B = torch.stack([Q[:, 7], torch.randn(30, generator=torch.Generator().manual_seed(2))])
    with pytest.warns(RuntimeWarning, match=UNCONVERGED) as rec:
        X = cg_solve(lambda V: V @ S, B, max_iter=5)
    assert len(_ours(rec)) == 1
    assert "1 of 2 right-hand side(s)" in str(_ours(rec)[0].message)
    # the eigenvector row converged in one step to the dense solution
    torch.testing.assert_close(X[0], Q[:, 7] / ev[7])


def test_cg_converged_does_not_warn_and_matches_dense():
    S, _, _ = _spd(30, -1, 1)  # condition 100
    B = torch.randn(3, 30, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = cg_solve(lambda V: V @ S, B, max_iter=200, tol=1e-12, regularization=0.1)
        x1 = cg_solve(lambda V: V @ S, B[0], max_iter=200, tol=1e-12, regularization=0.1)
    ref = _solve(S + 0.1 * torch.eye(30), B)
    torch.testing.assert_close(X, ref)
    torch.testing.assert_close(x1, ref[0])


def test_cg_warns_once_per_solve_not_per_call_site():
    """Three solves, three warnings (the numbers differ, so Python's once-per-location
    filter would not fold them either); a summarize_unconverged block folds them."""
    S, _, _ = _spd(30, -3, 2)
    gen = torch.Generator().manual_seed(4)
    Bs = [torch.randn(2, 30, generator=gen) for _ in range(3)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for B in Bs:
            cg_solve(lambda V: V @ S, B, max_iter=10)
    assert len(_ours(rec)) == 3
    worst = max(_worst(str(w.message)) for w in rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with summarize_unconverged() as summary:
            for B in Bs:
                cg_solve(lambda V: V @ S, B, max_iter=10)
            cg_solve(lambda V: V @ S, Bs[0], max_iter=200, tol=1e-6)  # converges
            assert not rec  # nothing before the block ends
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "in 3 of 4 solves" in msg and "6 of 8 right-hand side(s)" in msg
    assert (summary.solves, summary.unconverged_solves, summary.unconverged) == (4, 3, 6)
    assert summary.worst == pytest.approx(worst, rel=1e-2)


def test_summaries_nest_and_can_stay_silent():
    S, _, _ = _spd(30, -3, 2)
    B = torch.randn(2, 30, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with summarize_unconverged() as outer:
            with summarize_unconverged() as inner:
                cg_solve(lambda V: V @ S, B, max_iter=10)
            cg_solve(lambda V: V @ S, B, max_iter=10)
            assert inner.unconverged_solves == 1 and not rec
        assert outer.unconverged_solves == 2
        assert len(rec) == 1
        with summarize_unconverged(warn=False) as quiet:
            cg_solve(lambda V: V @ S, B, max_iter=10)
        assert quiet.unconverged == 2 and len(rec) == 1


def test_multishift_unconverged_warns_once_and_converged_matches_dense():
    S, _, _ = _spd(30, -3, 2)
    B = torch.randn(3, 30, generator=torch.Generator().manual_seed(6))
    shifts = (1e-3, 1e-1, 100.0)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = cg_multishift_solve(lambda V: V @ S, B, shifts, max_iter=15)
    assert len(_ours(rec)) == 1 and len(rec) == 1
    msg = str(rec[0].message)
    res = {s: _relres(S + s * torch.eye(30), out[s], B) for s in shifts}
    bad = [s for s in shifts if (res[s] > 1e-7).any()]
    count = sum(int((res[s] > 1e-7).sum()) for s in shifts)
    assert 1e-3 in bad and 100.0 not in bad  # the smallest shift converges slowest
    assert f"{count} of 9 (shift, right-hand side) pair(s) (at shifts {bad})" in msg
    assert "`shifts`" in msg
    assert _worst(msg) == pytest.approx(max(float(res[s].max()) for s in bad), rel=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cg_multishift_solve(lambda V: V @ S, B, (1e-1, 100.0), max_iter=100, tol=1e-12)
    for s in (1e-1, 100.0):
        torch.testing.assert_close(out[s], _solve(S + s * torch.eye(30), B))


def test_ihvp_at_x_cg_warns_once_per_call():
    S, _, _ = _spd(30, -3, 2)
    f = lambda w: 0.5 * w @ S @ w  # noqa: E731
    w0 = torch.zeros(30)
    V = torch.randn(3, 30, generator=torch.Generator().manual_seed(7))
    solve = ihvp_at_x_cg(f, w0)  # the default max_iter=10
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        X = solve(V)
        solve(V[0])
        ihvp_cg(f)((w0,), V)
    assert len(_ours(rec)) == 3 and len(rec) == 3
    assert "3 of 3" in str(rec[0].message) and "1 of 1" in str(rec[1].message)
    assert _worst(str(rec[0].message)) == pytest.approx(float(_relres(S, X, V).max()), rel=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = ihvp_at_x_cg(f, w0, max_iter=200, tol=1e-12, regularization=1e-2)(V)
    torch.testing.assert_close(X, _solve(S + 1e-2 * torch.eye(30), V))


# -------------------------------------------------------------------- LiSSA
def _small_problem():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen)
    S = A @ A.T + 0.5 * torch.eye(6)
    B = torch.randn(2, 6, generator=gen)
    return S, B, float(torch.linalg.eigvalsh(S).max())


@pytest.mark.parametrize(("factor", "depth"), [(0.9, 100), (0.9, 1000), (0.99, 1000)])
@pytest.mark.parametrize("chunk", [None, 1])
def test_lissa_divergence_raises_naming_scaling(factor, depth, chunk):
    """scaling below lambda_max / 2: the old code returned finite garbage (largest
    entry 3.9e7 at T=100, 1e86 at T=1000; the solution's is 2.7)."""
    S, B, lmax = _small_problem()
    scaling = factor * lmax / 2
    with pytest.raises(NonFiniteError, match=r"`scaling`=.*too small") as err:
        lissa_solve(lambda V, t: V @ S, B, depth, scaling=scaling, chunk=chunk,
                    rows_first=chunk is not None)
    msg = str(err.value)
    assert repr(scaling) in msg and "step t=" in msg and "lambda_max" in msg


def test_lissa_diverging_minibatch_ihvp_raises():
    X, y, w, loss, H = _logistic()
    with pytest.raises(NonFiniteError, match="scaling"):
        ihvp_at_x_lissa(loss, w, X, y, batch_size=8, recursion_depth=200,
                        scaling=0.25 * float(torch.linalg.eigvalsh(H).max()), seed=0)(
            torch.randn(2, w.numel(), generator=torch.Generator().manual_seed(1)))


def test_lissa_converging_exact_does_not_raise_and_matches_dense():
    S, B, lmax = _small_problem()
    scaling, damping = 0.6 * lmax, 0.01  # above lambda_max / 2: every step contracts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        X = lissa_solve(lambda V, t: V @ S, B, 3000, damping=damping, scaling=scaling)
    torch.testing.assert_close(X, _solve(S + damping * scaling * torch.eye(6), B),
                               rtol=1e-8, atol=1e-8)


def test_lissa_bound_is_tight_without_false_alarm():
    """b in the null space of a singular A with damping 0: h_t = (t+1) b exactly,
    the bound's equality case, must not raise."""
    S, ev, Q = _spd(8, -1, 1)
    ev[:2] = 0.0
    S = Q @ torch.diag(ev) @ Q.T
    b = Q[:, 0] + Q[:, 5]
    X = lissa_solve(lambda V, t: V @ S, b, 1024, scaling=float(ev.max()))
    assert X @ Q[:, 0] == pytest.approx(1025 / float(ev.max()), rel=1e-9)


def test_lissa_tiny_and_zero_rows_do_not_trip_the_check():
    S, B, lmax = _small_problem()
    B = torch.cat([B * 1e-200, torch.zeros(1, 6)])
    X = lissa_solve(lambda V, t: V @ S, B, 3000, damping=0.01, scaling=0.6 * lmax)
    ref = _solve(S + 0.01 * 0.6 * lmax * torch.eye(6), B[:2] * 1e200)
    torch.testing.assert_close(X[:2] * 1e200, ref, rtol=1e-8, atol=1e-8)
    assert not X[2].any()


def _pieces():
    """A = the mean of 8 PSD pieces (the minibatch Hessians), step t sees piece t % 8."""
    gen = torch.Generator().manual_seed(3)
    pieces = []
    for _ in range(8):
        M = torch.randn(10, 10, generator=gen)
        pieces.append(M @ M.T / 10 + 0.5 * torch.eye(10))
    return pieces, torch.stack(pieces).mean(0), torch.randn(3, 10, generator=gen)


def test_lissa_minibatch_steps_converge_and_match_dense():
    pieces, A, b = _pieces()
    scaling = 10.0  # above every piece's lambda_max / 2: every step contracts
    assert max(float(torch.linalg.eigvalsh(p).max()) for p in pieces) < 2 * scaling
    X = lissa_solve(lambda V, t: V @ pieces[t % 8], b, 400, scaling=scaling, num_repeat=3)
    ref = _solve(A, b)
    assert ((X - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.1


def test_lissa_some_expanding_minibatch_steps_do_not_raise():
    """scaling above lambda_max(A) / 2 but below the largest piece's: that piece's
    steps expand (no proof of the bound then), yet the recursion converges (to an
    estimate biased by the large steps) and the check's slack keeps it quiet."""
    pieces, A, b = _pieces()
    tops = [float(torch.linalg.eigvalsh(p).max()) for p in pieces]
    scaling = 0.45 * max(tops)
    assert float(torch.linalg.eigvalsh(A).max()) / 2 < scaling < max(tops) / 2
    X = lissa_solve(lambda V, t: V @ pieces[t % 8], b, 2000, scaling=scaling, num_repeat=2)
    ref = _solve(A, b)
    assert ((X - ref).norm(dim=1) / ref.norm(dim=1)).max() < 1.0


def _logistic():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 6, generator=gen)
    y = (X[:, 0] + 0.5 * torch.randn(200, generator=gen) > 0).double()
    w = 0.1 * torch.randn(7, generator=gen)

    def loss(w, X, y):
        logits = X @ w[:-1] + w[-1]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        return bce + 0.5 * 1e-2 * (w * w).sum()

    H = torch.autograd.functional.hessian(lambda p: loss(p, X, y), w)
    return X, y, w, loss, H


def test_lissa_minibatch_ihvp_converges_and_matches_dense():
    X, y, w, loss, H = _logistic()  # eigenvalues of H in [0.19, 0.32]
    V = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    scaling, damping = 4.0, 0.0125  # solves (H + 0.05 I)^-1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = ihvp_at_x_lissa(loss, w, X, y, batch_size=200, recursion_depth=600,
                               damping=damping, scaling=scaling)(V)
        mini = ihvp_at_x_lissa(loss, w, X, y, batch_size=50, recursion_depth=600,
                               damping=damping, scaling=scaling, num_repeat=2, seed=0)(V)
    ref = _solve(H + damping * scaling * torch.eye(7), V)
    torch.testing.assert_close(full, ref, rtol=1e-8, atol=1e-8)
    # a stochastic estimate (about 0.03 here), not exact
    assert ((mini - ref).norm(dim=1) / ref.norm(dim=1)).max() < 0.1
