"""attribute(..., top_k=k) of RPS-L2, KNN-Shapley and DVEmb: ranked from blocks
(training rows, or test columns for KNN-Shapley) that never hold the whole score
matrix, equal to a stable sort of the full matrix (float64)."""

from __future__ import annotations

import pytest
import torch
from cases import spy_ranked
from torch import nn

import dattri.algorithm.base as base_mod
import dattri.algorithm.knn_shapley as knn_mod
from dattri.algorithm import KNNShapleyAttributor, RPSAttributor
from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.task import AttributionTask


def _sorted_equal(top, scores, k):
    desc = torch.sort(scores, dim=0, descending=True, stable=True)
    asc = torch.sort(scores, dim=0, stable=True)
    assert torch.equal(top.proponents, desc.indices[:k].T)
    assert torch.equal(top.opponents, asc.indices[:k].T)
    torch.testing.assert_close(top.proponent_scores, desc.values[:k].T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(top.opponent_scores, asc.values[:k].T, rtol=1e-12, atol=1e-14)
    assert torch.equal(top.test_indices, torch.arange(scores.shape[1]))


def _data(n=23, m=7, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, xt = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(m, d, generator=g, dtype=torch.float64)
    y, yt = torch.randint(0, classes, (n,), generator=g), torch.randint(0, classes, (m,), generator=g)
    tr = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    te = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=4)
    return tr, te


@pytest.mark.parametrize("offload", ["none", "disk"])
def test_rps_top_k_from_row_blocks(monkeypatch, tmp_path, offload):
    import dattri.algorithm.rps as rps_mod

    tr, te = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()

    def pre(pre_activation, label):
        return nn.functional.cross_entropy(pre_activation, label)

    kw = {"cache_dir": str(tmp_path)} if offload == "disk" else {}
    att = RPSAttributor(AttributionTask(loss_func=pre, model=model, checkpoints=model.state_dict()),
                        "2", l2_strength=0.05, offload=offload, **kw).cache(tr)
    scores = att.attribute(tr, te)
    monkeypatch.setattr(rps_mod, "block_rows", lambda *a, **k: 4)
    shapes = spy_ranked(monkeypatch, base_mod)
    top = att.attribute(tr, te, top_k=3)
    _sorted_equal(top, scores, 3)
    assert shapes and max(s[0] for s in shapes) == 4 and sum(s[0] for s in shapes) == 23


def test_knn_shapley_top_k_from_test_column_blocks(monkeypatch):
    tr, te = _data(n=31, m=9)
    att = KNNShapleyAttributor(k_neighbors=4).cache(tr)
    scores = att.attribute(tr, te)
    calls = []
    real = knn_mod.knn_shapley
    monkeypatch.setattr(knn_mod, "knn_shapley",
                        lambda dist, *a, **k: calls.append(tuple(dist.shape)) or real(dist, *a, **k))
    monkeypatch.setattr(knn_mod, "TOPK_BYTES", 8 * 4 * 31 * 2)  # two test columns a block
    top = att.attribute(tr, te, top_k=5)
    _sorted_equal(top, scores, 5)
    assert calls == [(31, 2)] * 4 + [(31, 1)]


def _dvemb_case():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    xt, yt = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()

    def loss(params, batch):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (batch[0],)),
                                           batch[1])

    steps = [[0, 4, 9, 13], [1, 3, 19], [2, 5, 6, 7, 8], [10, 11, 12, 14, 15, 16, 17, 18]]
    ckpts, params = [], dict(model.named_parameters())
    state = {k: v.detach().clone() for k, v in params.items()}
    for idx in steps:  # plain SGD: checkpoint t is the parameters before step t
        ckpts.append({k: v.clone() for k, v in state.items()})
        live = {k: v.requires_grad_() for k, v in state.items()}
        grads = torch.autograd.grad(loss(live, (x[idx], y[idx])), list(live.values()))
        state = {k: (v - 0.1 * gr).detach() for (k, v), gr in zip(state.items(), grads)}
    ckpts.append(state)
    task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts)
    tr = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    te = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt), batch_size=3)
    return DVEmbAttributor(task, [(s, 0.1) for s in steps]), tr, te


def test_dvemb_top_k_from_embedding_row_blocks(monkeypatch):
    import dattri.algorithm.dvemb as dvemb_mod

    att, tr, te = _dvemb_case()
    att.cache(tr)
    scores = att.attribute(tr, te)
    monkeypatch.setattr(dvemb_mod, "block_rows", lambda *a, **k: 6)
    shapes = spy_ranked(monkeypatch, dvemb_mod)
    top = att.attribute(tr, te, top_k=4)
    _sorted_equal(top, scores, 4)
    assert [s[0] for s in shapes] == [6, 6, 6, 2]
