"""offload="none"|"cpu"|"disk" on KNN-Shapley and RPS-L2 (their final-layer / input
features): equal values, a rerun on the same cache_dir computes no feature, a store
of another loader or other weights is refused."""

from __future__ import annotations

import pytest
import torch
from cases import MLP, digits, loaders
from torch import nn

from dattri.algorithm import KNNShapleyAttributor, RPSAttributor
from dattri.algorithm import rps as rps_module
from dattri.errors import DattriValueError, StoreError
from dattri.task import AttributionTask


def _data(n: int = 31, offset: int = 0):
    train, test = digits(n + offset, 6, classes=3, dim=9)
    train = (train[0][offset:], train[1][offset:])
    return loaders(train, test, bs_train=4, bs_test=3)


def test_knn_shapley_offload_equals_memory_and_resumes(tmp_path):
    tr, te = _data()
    calls: list[int] = []

    def features(batch):
        calls.append(len(batch[0]))
        return torch.tanh(batch[0][:, :5])

    want = KNNShapleyAttributor(k_neighbors=3, feature_func=features).cache(tr).attribute(tr, te)
    assert want.shape == (31, 6)
    for offload in ("cpu", "disk"):
        att = KNNShapleyAttributor(k_neighbors=3, feature_func=features, offload=offload,
                                   cache_dir=tmp_path if offload == "disk" else None)
        calls.clear()
        att.cache(tr)
        assert sum(calls) == 31  # the training features, once
        torch.testing.assert_close(att.attribute(tr, te), want, rtol=1e-12, atol=0)
    again = KNNShapleyAttributor(k_neighbors=3, feature_func=features, offload="disk",
                                 cache_dir=tmp_path)
    calls.clear()
    torch.testing.assert_close(again.cache(tr).attribute(tr, te), want, rtol=1e-12, atol=0)
    # the test features, and the first 2 training examples again to check the store:
    # the other training features are read back
    assert sum(calls) == 6 + 2
    other, _ = _data(offset=5)  # another training set, same folder: refused
    with pytest.raises(StoreError, match="another training loader"):
        KNNShapleyAttributor(k_neighbors=3, feature_func=features, offload="disk",
                             cache_dir=tmp_path).cache(other)
    with pytest.raises(DattriValueError, match="offload='ram'"):
        KNNShapleyAttributor(k_neighbors=3, offload="ram")


def _rps_task(seed: int = 0):
    torch.manual_seed(seed)
    model = MLP(9, 6, 3).double()
    return AttributionTask(loss_func=nn.functional.cross_entropy, model=model,
                           checkpoints=model.state_dict())


def test_rps_offload_equals_memory_and_resumes(tmp_path, monkeypatch):
    tr, te = _data()
    task = _rps_task()
    ref = RPSAttributor(task, "fc2", l2_strength=0.01).cache(tr)
    want, want_self = ref.attribute(tr, te), ref.self_attribute(tr)
    calls: list[int] = []
    orig = rps_module._FinalInputs.batch
    monkeypatch.setattr(rps_module._FinalInputs, "batch",
                        lambda self, b, c: calls.append(1) or orig(self, b, c))
    for offload in ("cpu", "disk"):
        att = RPSAttributor(task, "fc2", l2_strength=0.01, offload=offload,
                            cache_dir=tmp_path if offload == "disk" else None).cache(tr)
        assert att.h_train is None  # the rows stay where offload put them
        torch.testing.assert_close(att.alpha, ref.alpha, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(att.attribute(tr, te), want, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(att.self_attribute(tr), want_self, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(att.decompose(te), ref.decompose(te), rtol=1e-12, atol=1e-15)
    assert len(calls) == 2 * len(tr)
    calls.clear()
    again = RPSAttributor(task, "fc2", l2_strength=0.01, offload="disk", cache_dir=tmp_path)
    torch.testing.assert_close(again.cache(tr).attribute(tr, te), want, rtol=1e-12, atol=1e-15)
    assert calls == [1]  # no forward pass over the training set: the store's check only
    with pytest.raises(StoreError, match="was written for"):  # other weights
        RPSAttributor(_rps_task(seed=1), "fc2", l2_strength=0.01, offload="disk",
                      cache_dir=tmp_path).cache(tr)
    with pytest.raises(DattriValueError, match="cache_dir"):
        RPSAttributor(task, "fc2", offload="disk")
