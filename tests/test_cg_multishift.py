"""Multi-shift CG against dense solves and per-shift cg_solve (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import digits, l2_loss_factory, loaders, make_lr, train_full_batch

from dattri.algorithm import IFAttributorCG
from dattri.errors import DattriValueError
from dattri.linalg import cg_multishift_solve, cg_solve
from dattri.task import AttributionTask

SHIFTS = (1e-1, 1e-3, 0.0, 1.0, 5e-3)  # unsorted on purpose


@pytest.fixture(scope="module")
def spd():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))
    a = (q * torch.logspace(-3, 1, 60, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2, torch.randn(5, 60, generator=gen, dtype=torch.float64)


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def _counting(a):
    rows = []

    def matmat(v):
        rows.append(v.shape[0])
        return v @ a

    return matmat, rows


def test_full_krylov_space_is_the_dense_solve(spd):
    a, b = spd
    out = cg_multishift_solve(lambda v: v @ a, b, SHIFTS, max_iter=300, tol=1e-14)
    assert list(out) == [float(s) for s in SHIFTS]
    eye = torch.eye(60, dtype=torch.float64)
    for s in SHIFTS:
        assert _rel(out[s], torch.linalg.solve(a + s * eye, b.T).T) < 1e-9
    single = cg_multishift_solve(lambda v: v @ a, b[1], SHIFTS, max_iter=300, tol=1e-14)
    assert single[1e-1].shape == (60,)
    torch.testing.assert_close(single[1e-1], out[1e-1][1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("max_iter", [1, 2, 5])
def test_partial_convergence_equals_cg_solve(spd, max_iter):
    a, b = spd
    out = cg_multishift_solve(lambda v: v @ a, b, SHIFTS, max_iter=max_iter, tol=1e-7)
    for s in SHIFTS:
        ref = cg_solve(lambda v: v @ a, b, max_iter=max_iter, tol=1e-7, regularization=s)
        assert _rel(out[s], ref) < 1e-10, s


def test_each_shift_keeps_its_stopping_rule(spd):
    a, b = spd
    eig = torch.linalg.eigh(a)[1][:, -1]
    b = torch.cat([b, eig[None], torch.zeros(1, 60, dtype=torch.float64)])
    tol, big = 1e-3, 10.0
    calls_big = _counting(a)
    ref = cg_solve(calls_big[0], b, max_iter=8, tol=tol, regularization=big)
    assert len(calls_big[1]) < 8  # the large shift converges early ...
    longer = cg_solve(lambda v: v @ a, b, max_iter=8, tol=0.0, regularization=big)
    assert _rel(ref, longer) > 1e-8  # ... and stopping there is visible
    out = cg_multishift_solve(lambda v: v @ a, b, (1e-3, big), max_iter=8, tol=tol)
    assert _rel(out[big], ref) < 1e-10
    assert _rel(out[1e-3], cg_solve(lambda v: v @ a, b, max_iter=8, tol=tol,
                                    regularization=1e-3)) < 1e-10
    assert torch.equal(out[big][-1], torch.zeros(60, dtype=torch.float64))


def test_matmat_calls(spd):
    a, b = spd
    mm, rows = _counting(a)
    cg_multishift_solve(mm, b, SHIFTS, max_iter=7, tol=0.0)
    assert len(rows) == 7
    assert all(r == 5 for r in rows)
    for tol in (1e-2, 1e-4):
        mm, rows = _counting(a)
        cg_multishift_solve(mm, b, SHIFTS, max_iter=60, tol=tol)
        mm0, rows0 = _counting(a)
        cg_solve(mm0, b, max_iter=60, tol=tol, regularization=min(SHIFTS))
        assert len(rows) <= len(rows0)
        assert sum(rows) <= sum(rows0)


@pytest.mark.parametrize(("shifts", "match"), [
    ((), "empty"), ([], "empty"), ((1e-3, -1e-2), r"shifts\[1\].*-0.01"),
    ((1e-3, 1e-2, 0.001), "duplicates"), ((float("nan"),), r"shifts\[0\]"),
    (("a",), "sequence of numbers"), (3.0, "sequence of numbers"),
])
def test_bad_shifts(spd, shifts, match):
    a, b = spd
    with pytest.raises(DattriValueError, match=match):
        cg_multishift_solve(lambda v: v @ a, b, shifts)


@pytest.fixture(scope="module")
def lr_task():
    (xtr, ytr), (xte, yte) = digits(60, 6, classes=3, dim=16)
    model = make_lr(xtr.shape[1], 3)
    loss = l2_loss_factory(model)
    train_full_batch(model, loss, xtr, ytr)
    return model, loss, loaders((xtr, ytr), (xte, yte), bs_train=20, bs_test=6)


def test_attributor_shares_one_cg(lr_task, monkeypatch):
    import dattri.linalg.solvers as S

    model, loss, (tr, te) = lr_task

    def task():
        return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())

    calls = []
    real = S.cg_multishift_solve
    monkeypatch.setattr(S, "cg_multishift_solve",
                        lambda mm, *a, **k: calls.append(1) or real(_count(mm), *a, **k))
    hvps = []

    def _count(mm):
        return lambda v: hvps.append(v.shape[0]) or mm(v)

    store, shifts = {}, (1e-1, 1e-2, 1e-3)
    for reg in (1e-2, 1e-3):
        plain = IFAttributorCG(task(), max_iter=5, regularization=reg).cache(tr)
        shared = IFAttributorCG(task(), max_iter=5, regularization=reg, shift_store=store,
                                shifts=shifts).cache(tr)
        torch.testing.assert_close(shared.attribute(tr, te), plain.attribute(tr, te),
                                   rtol=1e-6, atol=1e-12)
    assert len(calls) == 1 and len(store) == 1
    assert len(hvps) == 5  # only the first attributor's CG made products
    # self-influence (one solve per training chunk) is shared across the search too
    calls.clear()
    for reg in (1e-2, 1e-3):
        plain = IFAttributorCG(task(), max_iter=5, regularization=reg).cache(tr)
        shared = IFAttributorCG(task(), max_iter=5, regularization=reg, shift_store=store,
                                shifts=shifts).cache(tr)
        torch.testing.assert_close(shared.self_attribute(tr), plain.self_attribute(tr),
                                   rtol=1e-6, atol=1e-12)
    # one solve per group of consecutive training batches (SELF_INFLUENCE_ROWS rows),
    # made by the first shared attributor only
    from dattri.algorithm import influence_function as F

    width = sum(p.numel() for p in model.parameters())
    per = max(1, min(F.SELF_INFLUENCE_ROWS, F.SELF_INFLUENCE_BYTES // (8 * width)) // tr.batch_size)
    assert len(calls) == -(-len(tr) // per)


def test_attributor_shift_errors(lr_task):
    model, loss, _ = lr_task
    task = AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    with pytest.raises(DattriValueError, match="not one of shifts"):
        IFAttributorCG(task, regularization=1e-2, shift_store={}, shifts=(1e-1, 1e-3))
    with pytest.raises(DattriValueError, match="shift_store must be a dict"):
        IFAttributorCG(task, regularization=1e-2, shift_store=[], shifts=(1e-2,))
    with pytest.raises(DattriValueError, match="pass both or neither"):
        IFAttributorCG(task, regularization=1e-2, shifts=(1e-2,))
    with pytest.raises(DattriValueError, match="duplicates"):
        IFAttributorCG(task, regularization=1e-2, shift_store={}, shifts=(1e-2, 1e-2))
