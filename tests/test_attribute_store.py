"""offload="disk" and top_k on the attributors that cache features (TRAK, TracIn)."""

from __future__ import annotations

import pytest
import torch
from cases import MLP, digits, loaders
from dist_cases import _margin

from dattri.algorithm import TracInAttributor, TRAKAttributor
from dattri.errors import DattriValueError, StoreError
from dattri.task import AttributionTask


def _case(seed: int = 0):
    train, test = digits(40, 6, classes=3, dim=8)
    torch.manual_seed(seed)
    model = MLP(8, 5, 3).double()
    margin, prob = _margin(model)
    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    return task, prob, *loaders(train, test, bs_train=7, bs_test=4)


PROJ = {"proj_dim": 12, "proj_type": "normal", "proj_seed": 4}
#: features projected in blocks of several batches (in memory) against batch by batch
#: (a store): float64 products of other shapes, the same numbers up to their rounding
ROUNDING = {"rtol": 1e-9, "atol": 1e-15}


def _count_batches(att, monkeypatch):
    calls = []
    orig = att.train_features.batch
    monkeypatch.setattr(att.train_features, "batch", lambda b, c: calls.append(1) or orig(b, c))
    return calls


def test_trak_disk_equals_memory_and_reruns_featurize_nothing(tmp_path, monkeypatch):
    task, prob, tr, te = _case()
    want = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ).cache(tr).attribute(te)
    att = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ, offload="disk",
                         cache_dir=tmp_path)
    calls = _count_batches(att, monkeypatch)
    disk = att.cache(tr).attribute(te)
    # the same up to rounding: in memory the features of consecutive small batches are
    # projected in one product (Featurizer.iterate), into a store batch by batch
    torch.testing.assert_close(disk, want, **ROUNDING)
    assert len(calls) == len(tr)  # 6 batches featurized once
    again = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ, offload="disk",
                           cache_dir=tmp_path)
    calls = _count_batches(again, monkeypatch)
    probs = []
    orig = again._probabilities
    monkeypatch.setattr(again, "_probabilities", lambda b, c: probs.append(1) or orig(b, c))
    torch.testing.assert_close(again.cache(tr).attribute(te), disk, rtol=0, atol=0)  # read back
    # features and residuals read back from the stores; the one call each: the
    # features and residuals of the loader's first 2 examples, computed again to
    # check the stores (store._check_first_rows)
    assert calls == [1] and probs == [1]
    # other weights, same folder: refused, not reused
    other, prob2, _, _ = _case(seed=1)
    with pytest.raises(StoreError):
        TRAKAttributor(other, prob2, regularization=1e-3, proj_params=PROJ, offload="disk",
                       cache_dir=tmp_path).cache(tr)


@pytest.mark.parametrize("normalized", [False, True])
def test_top_k_equals_sorting_the_full_matrix(tmp_path, normalized):
    task, prob, tr, te = _case()
    trak = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ).cache(tr)
    tracin = TracInAttributor(task, weight_list=[1.0], normalized_grad=normalized,
                              offload="disk", cache_dir=tmp_path).cache(tr)
    for scores, top in ((trak.attribute(te), trak.attribute(te, top_k=4)),
                        (tracin.attribute(tr, te), tracin.attribute(tr, te, top_k=4))):
        desc = torch.sort(scores, dim=0, descending=True, stable=True)
        asc = torch.sort(scores, dim=0, stable=True)
        assert torch.equal(top.proponents, desc.indices[:4].T)
        assert torch.equal(top.opponents, asc.indices[:4].T)
        torch.testing.assert_close(top.proponent_scores, desc.values[:4].T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_kept_features_equal_recomputed_ones(tmp_path, offload):
    task, prob, tr, te = _case()
    want = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ).cache(tr)
    got = TRAKAttributor(task, prob, regularization=1e-3, proj_params=PROJ, offload=offload,
                         cache_dir=tmp_path / "trak").cache(tr)
    torch.testing.assert_close(got.attribute(te), want.attribute(te), **ROUNDING)
    torch.testing.assert_close(got.self_attribute(tr), want.self_attribute(tr), **ROUNDING)
    plain = TracInAttributor(task, weight_list=[0.5], normalized_grad=True).attribute(tr, te)
    kept = TracInAttributor(task, weight_list=[0.5], normalized_grad=True, offload=offload,
                            cache_dir=tmp_path / "tracin").cache(tr)
    torch.testing.assert_close(kept.attribute(tr, te), plain, rtol=1e-12, atol=1e-15)


def test_logra_disk_store_resumes_and_equals_memory(tmp_path, monkeypatch):
    from dattri.algorithm import LoGraAttributor

    task, _, tr, te = _case()
    proj = {"proj_dim": 4, "proj_type": "normal", "proj_seed": 2}
    want = LoGraAttributor(task, damping=0.1, proj_params=proj).cache(tr).attribute(tr, te)
    first = LoGraAttributor(task, damping=0.1, proj_params=proj, offload="disk", cache_dir=tmp_path)
    torch.testing.assert_close(first.cache(tr).attribute(tr, te), want, rtol=1e-6, atol=1e-12)
    again = LoGraAttributor(task, damping=0.1, proj_params=proj, offload="disk", cache_dir=tmp_path)
    calls = _count_batches(again, monkeypatch)
    torch.testing.assert_close(again.cache(tr).attribute(tr, te), want, rtol=1e-6, atol=1e-12)
    assert calls == [1]  # the features of the first run, read back (and checked)


def test_store_arguments_are_checked(tmp_path):
    task, prob, tr, te = _case()
    with pytest.raises(DattriValueError, match="cache_dir"):
        TRAKAttributor(task, prob, offload="disk")
    with pytest.raises(DattriValueError, match="offload='ssd'"):
        TracInAttributor(task, weight_list=[1.0], normalized_grad=False, offload="ssd")
    with pytest.raises(DattriValueError, match="top_k=0"):
        TRAKAttributor(task, prob, proj_params=PROJ).cache(tr).attribute(te, top_k=0)
