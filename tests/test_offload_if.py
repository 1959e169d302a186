"""offload="none"|"cpu"|"disk" on IF-Arnoldi (its n x r projected training gradients)
and IF-DataInf (its per-example training gradients): equal scores, a rerun on the
same cache_dir computes no training gradient, a store of other weights is refused."""

from __future__ import annotations

import pytest
import torch
from cases import MLP, digits, l2_loss_factory, loaders

from dattri.algorithm import IFAttributorArnoldi, IFAttributorDataInf
from dattri.errors import DattriValueError, StoreError
from dattri.task import AttributionTask

METHODS = {
    "arnoldi": lambda t, **kw: IFAttributorArnoldi(t, proj_dim=8, max_iter=30,
                                                   regularization=0.1, **kw),
    "datainf": lambda t, **kw: IFAttributorDataInf(t, fim_estimate_data_ratio=0.6, **kw),
}


def _case(seed: int = 0, checkpoints: int = 2):
    train, test = digits(33, 6, classes=3, dim=9)
    torch.manual_seed(seed)
    model = MLP(9, 4, 3).double()
    ckpts = []
    for _ in range(checkpoints):
        ckpts.append({k: v.clone() for k, v in model.state_dict().items()})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
    task = AttributionTask(loss_func=l2_loss_factory(model), model=model, checkpoints=ckpts)
    return task, *loaders(train, test, bs_train=5, bs_test=3)


def _count_grads(att, monkeypatch) -> list[int]:
    calls: list[int] = []
    orig = att.train_features.batch
    monkeypatch.setattr(att.train_features, "batch", lambda b, c: calls.append(c) or orig(b, c))
    return calls


@pytest.mark.parametrize("name", sorted(METHODS))
def test_disk_and_cpu_equal_memory_and_a_rerun_recomputes_nothing(name, tmp_path, monkeypatch):
    task, tr, te = _case()
    make = METHODS[name]
    want = make(task).cache(tr)
    scores = want.attribute(tr, te)
    top = want.attribute(tr, te, top_k=3)
    cpu = make(task, offload="cpu").cache(tr)
    torch.testing.assert_close(cpu.attribute(tr, te), scores, rtol=1e-12, atol=0)
    first = make(task, offload="disk", cache_dir=tmp_path)
    calls = _count_grads(first, monkeypatch)
    first.cache(tr)
    assert len(calls) == 2 * len(tr)  # every batch at both checkpoints, once
    torch.testing.assert_close(first.attribute(tr, te), scores, rtol=1e-12, atol=0)
    got = first.attribute(tr, te, top_k=3)
    assert torch.equal(got.proponents, top.proponents) and torch.equal(got.opponents, top.opponents)
    torch.testing.assert_close(first.attribute(tr, te, relatif_method="theta"),
                               want.attribute(tr, te, relatif_method="theta"), rtol=1e-12, atol=0)
    # a rerun on the same folder (a new attributor, as after a crash): nothing recomputed
    # but the check of each store (the first 2 examples at each checkpoint)
    again = make(task, offload="disk", cache_dir=tmp_path)
    calls = _count_grads(again, monkeypatch)
    torch.testing.assert_close(again.cache(tr).attribute(tr, te), scores, rtol=1e-12, atol=0)
    assert calls == [0, 1]
    # other weights, same folder: refused, not reused
    other, _, _ = _case(seed=1)
    with pytest.raises(StoreError, match="was written for"):
        make(other, offload="disk", cache_dir=tmp_path).cache(tr)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_offload_arguments_are_checked(name, tmp_path):
    task, _, _ = _case(checkpoints=1)
    with pytest.raises(DattriValueError, match="offload='ssd'"):
        METHODS[name](task, offload="ssd")
    with pytest.raises(DattriValueError, match="cache_dir"):
        METHODS[name](task, offload="disk")
