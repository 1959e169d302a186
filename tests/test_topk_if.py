"""Blocked top-k of the influence-function family: ``attribute(..., top_k=k)`` ranks
training batches as they are scored (the test side solved once) and equals a stable
sort of the full score matrix, without forming it."""

from __future__ import annotations

import pytest
import torch
from cases import MLP, digits, l2_loss_factory, loaders, spy_ranked

from dattri.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    LoGraAttributor,
)
from dattri.algorithm import base as base_module
from dattri.algorithm import influence_function as if_module
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

N, BATCH, K = 40, 6, 4

METHODS = {
    "explicit": lambda t: IFAttributorExplicit(t, regularization=0.1),
    "cg": lambda t: IFAttributorCG(t, max_iter=8, regularization=0.1),
    "lissa": lambda t: IFAttributorLiSSA(t, recursion_depth=10, batch_size=4, damping=0.1,
                                         scaling=10.0),
    "arnoldi": lambda t: IFAttributorArnoldi(t, proj_dim=8, max_iter=30, regularization=0.1),
    "datainf": lambda t: IFAttributorDataInf(t, fim_estimate_data_ratio=0.7),
    "ekfac": lambda t: IFAttributorEKFAC(t, damping=0.1),
    # LoGra: the stored projected features of the cached loader, read block by block
    "logra": lambda t: LoGraAttributor(t, damping=0.1, chunk_size=1,
                                       proj_params={"proj_dim": 4, "proj_type": "normal"}),
}


def _case(checkpoints: int = 1):
    train, test = digits(N, 7, classes=3, dim=10)
    torch.manual_seed(0)
    model = MLP(10, 5, 3).double()
    loss = l2_loss_factory(model)
    ckpts = [{k: v.clone() for k, v in model.state_dict().items()}]
    for _ in range(checkpoints - 1):  # later checkpoints: a few SGD steps on
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
    task = AttributionTask(loss_func=loss, model=model,
                           checkpoints=ckpts if checkpoints > 1 else ckpts[0])
    return task, *loaders(train, test, bs_train=BATCH, bs_test=4)


def _spy_blocks(monkeypatch) -> list[tuple[int, ...]]:
    """The shapes of the score blocks the IF attributors hand to the ranking."""
    shapes = spy_ranked(monkeypatch, base_module)  # every attributor's _finish
    # kept features (IF-Arnoldi) are read in blocks of BATCH rows, not the byte budget
    monkeypatch.setattr(if_module, "block_rows", lambda *args: BATCH)
    return shapes


def _assert_sorted(top, full: torch.Tensor, k: int) -> None:
    desc = torch.sort(full, dim=0, descending=True, stable=True)
    asc = torch.sort(full, dim=0, stable=True)
    assert torch.equal(top.proponents, desc.indices[:k].T)
    assert torch.equal(top.opponents, asc.indices[:k].T)
    torch.testing.assert_close(top.proponent_scores, desc.values[:k].T, rtol=1e-12, atol=0)
    torch.testing.assert_close(top.opponent_scores, asc.values[:k].T, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_top_k_equals_sorting_the_full_matrix_without_forming_it(name, monkeypatch):
    task, tr, te = _case()
    att = METHODS[name](task).cache(tr)
    full = att.attribute(tr, te)
    assert full.shape == (N, 7) and full.dtype == torch.float64
    shapes = _spy_blocks(monkeypatch)
    top = att.attribute(tr, te, top_k=K)
    _assert_sorted(top, full, K)
    # scored one training batch (or kept block) at a time: no block holds every row
    assert shapes and sum(s[0] for s in shapes) == N
    assert max(s[0] for s in shapes) < N and all(s[1] == 7 for s in shapes)


@pytest.mark.parametrize(("name", "relatif"), [("cg", None), ("cg", "l"), ("arnoldi", "theta"),
                                               ("ekfac", None), ("ekfac", "l")])
def test_top_k_over_checkpoints_and_relatif(name, relatif, monkeypatch):
    task, tr, te = _case(checkpoints=2)
    make = METHODS[name]
    if name == "cg":  # RelatIF solves per training batch: fewer iterations here
        make = lambda t: IFAttributorCG(t, max_iter=2, regularization=0.1)  # noqa: E731
    att = make(task).cache(tr)
    full = att.attribute(tr, te, relatif_method=relatif)
    shapes = _spy_blocks(monkeypatch)
    _assert_sorted(att.attribute(tr, te, relatif_method=relatif, top_k=K), full, K)
    assert max(s[0] for s in shapes) <= BATCH


def test_top_k_is_checked():
    task, tr, te = _case()
    att = IFAttributorCG(task, max_iter=5, regularization=0.1).cache(tr)
    with pytest.raises(DattriValueError, match="top_k=0"):
        att.attribute(tr, te, top_k=0)
