"""Tests of dattri.linalg solvers against dense float64 references."""

import pytest
import torch

from dattri.errors import DattriValueError, NonFiniteError
from dattri.linalg import (
    arnoldi,
    cg_solve,
    explicit_inverse,
    explicit_solve,
    factorize,
    lissa_solve,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _spd(p, cond=100.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    evals = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), p, dtype=torch.float64)
    return (Q * evals) @ Q.T, Q, evals


class Counter:
    """matmat that records the number of rows of every call."""

    def __init__(self, A):
        self.A, self.sizes = A, []

    def __call__(self, V):
        self.sizes.append(V.shape[0])
        return V @ self.A


# ------------------------------------------------------------------------ CG
def test_cg_solves_block_and_single():
    A, _, _ = _spd(40, cond=50.0)
    B = torch.randn(6, 40, dtype=torch.float64)
    X = cg_solve(lambda V: V @ A, B, max_iter=200, tol=1e-12)
    ref = torch.linalg.solve(A, B.T).T
    torch.testing.assert_close(X, ref, rtol=1e-9, atol=1e-9)
    x1 = cg_solve(lambda V: V @ A, B[2], max_iter=200, tol=1e-12)
    assert x1.shape == (40,)
    torch.testing.assert_close(x1, ref[2], rtol=1e-9, atol=1e-9)


def test_cg_regularization():
    A, _, _ = _spd(20)
    B = torch.randn(3, 20, dtype=torch.float64)
    X = cg_solve(lambda V: V @ A, B, max_iter=100, tol=1e-12, regularization=0.7)
    ref = torch.linalg.solve(A + 0.7 * torch.eye(20, dtype=torch.float64), B.T).T
    torch.testing.assert_close(X, ref, rtol=1e-9, atol=1e-9)


def test_cg_stops_early_and_freezes_rows():
    # A has 3 distinct eigenvalues: exact CG converges in 3 iterations.
    _, Q, _ = _spd(30)
    evals = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64).repeat_interleave(10)
    A = (Q * evals) @ Q.T
    generic = torch.randn(30, dtype=torch.float64)
    eigvec = Q[:, 0]  # converges after one iteration
    zero = torch.zeros(30, dtype=torch.float64)  # converged from the start
    counter = Counter(A)
    X = cg_solve(counter, torch.stack([generic, eigvec, zero]), max_iter=50, tol=1e-10)
    assert counter.sizes == [2, 1, 1]
    torch.testing.assert_close(X[1], eigvec / 1.0)
    assert torch.all(X[2] == 0)
    torch.testing.assert_close(X[0], torch.linalg.solve(A, generic), rtol=1e-9, atol=1e-9)


def test_cg_max_iter_and_x0():
    A, _, _ = _spd(30, cond=1e4)
    b = torch.randn(2, 30, dtype=torch.float64)
    counter = Counter(A)
    cg_solve(counter, b, max_iter=4, tol=0.0)
    assert len(counter.sizes) == 4
    sol = torch.linalg.solve(A, b.T).T
    counter = Counter(A)
    X = cg_solve(counter, b, max_iter=10, tol=1e-8, x0=sol)
    assert counter.sizes == [2]  # only the initial residual product
    torch.testing.assert_close(X, sol)


def test_cg_errors():
    with pytest.raises(DattriValueError, match="shape"):
        cg_solve(lambda V: V, torch.zeros(2, 2, 2))
    with pytest.raises(DattriValueError, match="max_iter"):
        cg_solve(lambda V: V, torch.zeros(3), max_iter=0)
    with pytest.raises(DattriValueError, match="regularization"):
        cg_solve(lambda V: V, torch.zeros(3), regularization=-1.0)


# --------------------------------------------------------------------- LiSSA
def test_lissa_fixed_point_with_damping():
    A, _, evals = _spd(25, cond=10.0)  # eigenvalues in [1, 10]
    B = torch.randn(4, 25, dtype=torch.float64)
    damping, scaling = 0.01, 12.0
    X = lissa_solve(lambda V, step: V @ A, B, recursion_depth=600,
                    damping=damping, scaling=scaling)
    ref = torch.linalg.solve(A + damping * scaling * torch.eye(25, dtype=torch.float64), B.T).T
    torch.testing.assert_close(X, ref, rtol=1e-8, atol=1e-8)
    x1 = lissa_solve(lambda V, step: V @ A, B[0], recursion_depth=600,
                     damping=damping, scaling=scaling)
    torch.testing.assert_close(x1, ref[0], rtol=1e-8, atol=1e-8)


def test_lissa_stochastic_steps_and_repeats():
    # A = mean of 8 PSD pieces; each step sees one piece chosen by `step`.
    gen = torch.Generator().manual_seed(3)
    pieces = []
    for _ in range(8):
        M = torch.randn(10, 10, generator=gen, dtype=torch.float64)
        pieces.append(M @ M.T / 10 + 0.5 * torch.eye(10, dtype=torch.float64))
    A = torch.stack(pieces).mean(0)
    seen = []

    def sample(V, step):
        seen.append(step)
        return V @ pieces[step % 8]

    b = torch.randn(10, generator=gen, dtype=torch.float64)
    X = lissa_solve(sample, b, recursion_depth=400, scaling=10.0, num_repeat=3)
    assert seen == list(range(1, 1201))  # distinct step ids across repeats
    ref = torch.linalg.solve(A, b)
    assert (X - ref).norm() / ref.norm() < 0.1


@pytest.mark.parametrize("chunk", [1, 3, 7, 50])
def test_lissa_row_blocks_equal_the_whole_block(chunk):
    # rows recurse independently: blocks updated in place give the same iterates,
    # each block of a step seeing that step's minibatch
    gen = torch.Generator().manual_seed(4)
    pieces = [(lambda M: M @ M.T / 10 + 0.5 * torch.eye(10, dtype=torch.float64))(
        torch.randn(10, 10, generator=gen, dtype=torch.float64)) for _ in range(5)]
    B = torch.randn(7, 10, generator=gen, dtype=torch.float64)
    calls = []

    def sample(V, step):
        calls.append((step, V.shape[0]))
        return V @ pieces[step % 5]

    whole = lissa_solve(sample, B, recursion_depth=60, scaling=10.0, damping=0.01, num_repeat=2)
    calls.clear()
    got = lissa_solve(sample, B, recursion_depth=60, scaling=10.0, damping=0.01, num_repeat=2,
                      chunk=chunk)
    torch.testing.assert_close(got, whole, rtol=1e-13, atol=1e-13)
    per_step = -(-7 // chunk)
    assert [s for s, _ in calls] == [s for s in range(1, 121) for _ in range(per_step)]
    assert sum(r for _, r in calls) == 7 * 120
    # every step of one block before the next block: the same iterates
    calls.clear()
    first = lissa_solve(sample, B, recursion_depth=60, scaling=10.0, damping=0.01, num_repeat=2,
                        chunk=chunk, rows_first=True)
    torch.testing.assert_close(first, whole, rtol=1e-13, atol=1e-13)
    blocks = [min(chunk, 7 - s) for s in range(0, 7, chunk)]
    assert calls == [(s, r) for rep in range(2) for r in blocks
                     for s in range(rep * 60 + 1, rep * 60 + 61)]
    with pytest.raises(DattriValueError, match="chunk"):
        lissa_solve(sample, B, recursion_depth=3, chunk=0)


def test_lissa_diverges_with_small_scaling():
    A, _, _ = _spd(10, cond=10.0)
    with pytest.raises(NonFiniteError, match="scaling"):
        lissa_solve(lambda V, step: V @ A, torch.ones(10, dtype=torch.float64),
                    recursion_depth=5000, scaling=1.0)
    with pytest.raises(DattriValueError, match="scaling"):
        lissa_solve(lambda V, step: V, torch.ones(3), recursion_depth=3, scaling=0.0)


# ------------------------------------------------------------------- Arnoldi
def test_arnoldi_full_recovers_inverse():
    A, _, evals = _spd(30, cond=1e3)
    calls = []
    vals, vecs = arnoldi(lambda v: calls.append(1) or A @ v, 30, max_iter=30, top_k=30,
                         dtype=torch.float64)
    assert len(calls) == 30 and vals.shape == (30,) and vecs.shape == (30, 30)
    torch.testing.assert_close(vecs @ vecs.T, torch.eye(30, dtype=torch.float64),
                               atol=1e-10, rtol=0)
    inv = vecs.T @ torch.diag(1 / vals) @ vecs
    torch.testing.assert_close(inv, torch.linalg.inv(A), rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(vals, evals.flip(0), rtol=1e-9, atol=1e-9)


def test_arnoldi_top_k_breakdown_and_seed():
    _, Q, _ = _spd(40)
    evals = torch.tensor([-7.0, 5.0, 2.0, 0.5], dtype=torch.float64).repeat_interleave(10)
    A = (Q * evals) @ Q.T  # 4 distinct eigenvalues (one negative): breakdown at m = 4
    calls = []
    vals, vecs = arnoldi(lambda v: calls.append(1) or A @ v, 40, max_iter=20, top_k=3,
                         tol=1e-8, dtype=torch.float64)
    assert len(calls) == 4
    torch.testing.assert_close(vals, torch.tensor([-7.0, 5.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(vecs @ A, vals[:, None] * vecs, atol=1e-9, rtol=0)
    vals2, vecs2 = arnoldi(lambda v: A @ v, 40, max_iter=20, top_k=3, tol=1e-8,
                           dtype=torch.float64)
    assert torch.equal(vecs, vecs2)  # same seed, same basis


# ------------------------------------------------------------------ explicit
def test_explicit_spd_and_dtype():
    A, _, _ = _spd(15)
    inv = explicit_inverse(A, regularization=0.3)
    torch.testing.assert_close(inv, torch.linalg.inv(A + 0.3 * torch.eye(15, dtype=torch.float64)))
    A32 = A.float()
    assert explicit_inverse(A32).dtype == torch.float32
    B = torch.randn(3, 15, dtype=torch.float64)
    torch.testing.assert_close(explicit_solve(A, B), torch.linalg.solve(A, B.T).T)
    torch.testing.assert_close(factorize(A)(B), torch.linalg.solve(A, B.T).T)
    assert explicit_solve(A, B[0]).shape == (15,)


def test_explicit_fallbacks_warn():
    _, Q, _ = _spd(8)
    indefinite = (Q * torch.tensor([3.0, -2.0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)) @ Q.T
    with pytest.warns(RuntimeWarning, match="eigendecomposition"):
        inv = explicit_inverse(indefinite)
    torch.testing.assert_close(inv, torch.linalg.inv(indefinite))
    singular = (Q * torch.tensor([3.0, 0, 1, 1, 1, 1, 1, 1], dtype=torch.float64)) @ Q.T
    with pytest.warns(RuntimeWarning):
        pinv = explicit_inverse(singular)
    torch.testing.assert_close(pinv, torch.linalg.pinv(singular), atol=1e-10, rtol=1e-8)


def test_explicit_errors():
    with pytest.raises(DattriValueError, match="square"):
        explicit_inverse(torch.zeros(3, 4))
    with pytest.raises(NonFiniteError, match="inf/NaN"):
        explicit_inverse(torch.full((2, 2), float("nan")))
