"""Checkpoints and weights that change between calls: a model shared by two tasks, a
model edited in place after ``cache``, and a checkpoint that is the model's own
``state_dict()`` (so training the model further changes it).

The reference is always the same attributor built afresh at the weights in question;
a cache that belongs to other weights must be refused (``CheckpointError``), never
mixed with gradients at the new weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import (
    FactGraSSAttributor,
    IFAttributorCG,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    LoGraAttributor,
    TracInAttributor,
    TRAKAttributor,
)
from dattri.errors import CheckpointError
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(self.emb(x).transpose(1, 2))).mean(2))


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 6, (12, 5), generator=g), torch.randint(0, 3, (12,), generator=g)
    xt, yt = torch.randint(0, 6, (4, 5), generator=g), torch.randint(0, 3, (4,), generator=g)
    return (DataLoader(TensorDataset(x, y), batch_size=4),
            DataLoader(TensorDataset(xt, yt), batch_size=4))


def _loss(model):
    def f(params, b):
        return F.cross_entropy(torch.func.functional_call(model, params, (b[0],)), b[1])
    return f


def _probability(model):
    def f(params, b):
        out = torch.func.functional_call(model, params, (b[0],))
        return torch.softmax(out, -1).gather(1, b[1][:, None]).squeeze(1)
    return f


def _copy(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _perturb(model, scale=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


METHODS = {
    "ekfac": lambda t: IFAttributorEKFAC(t, damping=0.1),
    "logra": lambda t: LoGraAttributor(
        t, damping=0.1, proj_params={"proj_dim_per_layer": 100, "proj_type": "identity"}),
    "factgrass": lambda t: FactGraSSAttributor(
        t, damping=0.1, proj_params={"proj_dim_per_layer": 100, "proj_type": "identity"}),
    "explicit": lambda t: IFAttributorExplicit(t, regularization=0.1),
    "cg": lambda t: IFAttributorCG(t, regularization=0.1, max_iter=200, tol=1e-12),
    "tracin_cpu": lambda t: TracInAttributor(t, weight_list=[1.0], normalized_grad=False,
                                             offload="cpu"),
    "trak": lambda t: TRAKAttributor(t, _probability(t.model), proj_params={"proj_type": "identity"},
                                     regularization=1e-3),
}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_shared_model_reloads_the_checkpoint(name):
    """Another task loading its checkpoint into the same model object between
    ``cache`` and ``attribute`` does not change the answer (the hook-based methods
    reloaded only when their own checkpoint index changed)."""
    torch.manual_seed(0)
    model = Net().eval()
    train, test = _data()
    ck_a = _copy(model)
    ck_b = {k: v + 0.5 * torch.randn_like(v) for k, v in ck_a.items()}
    task_a = AttributionTask(_loss(model), model, ck_a)
    task_b = AttributionTask(_loss(model), model, ck_b)
    alone = METHODS[name](task_a).cache(train).attribute(train, test)
    att = METHODS[name](task_a).cache(train)
    other = TracInAttributor(task_b, weight_list=[1.0], normalized_grad=False)
    other.attribute(train, test)  # loads ck_b into the shared model
    torch.testing.assert_close(att.attribute(train, test), alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_model_edited_in_place_reloads_its_copy(name):
    """The task holds its own copy of the weights: editing the model in place after
    ``cache`` gives the checkpoint's answer (the model is reloaded from it)."""
    torch.manual_seed(0)
    model = Net().eval()
    train, test = _data()
    task = AttributionTask(_loss(model), model, _copy(model))
    alone = METHODS[name](task).cache(train).attribute(train, test)
    att = METHODS[name](task).cache(train)
    _perturb(model)
    torch.testing.assert_close(att.attribute(train, test), alone, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_changed_state_dict_checkpoint_is_refused(name):
    """``checkpoints=model.state_dict()`` shares the model's tensors: training the
    model after ``cache`` changes the checkpoint, and the cache (curvature, features)
    is refused instead of being mixed with gradients at the new weights; a new
    ``cache`` gives the fresh answer at the new weights."""
    torch.manual_seed(0)
    model = Net().eval()
    train, test = _data()
    task = AttributionTask(_loss(model), model, model.state_dict())
    att = METHODS[name](task).cache(train)
    before = att.attribute(train, test)  # a no-op load of the model's own tensors
    torch.testing.assert_close(att.attribute(train, test), before, rtol=0, atol=0)
    _perturb(model)
    with pytest.raises(CheckpointError, match=r"checkpoints\[0\] changed since cache"):
        att.attribute(train, test)
    fresh_task = AttributionTask(_loss(model), model, _copy(model))
    fresh = METHODS[name](fresh_task).cache(train).attribute(train, test)
    att.cache(train)
    torch.testing.assert_close(att.attribute(train, test), fresh, rtol=1e-10, atol=1e-12)
    assert (fresh - before).abs().max() > 1e-3  # the weights did change the scores


def test_rewritten_checkpoint_file_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    train, test = _data()
    path = tmp_path / "ck.pt"
    torch.save(_copy(model), path)
    task = AttributionTask(_loss(model), model, [str(path), _copy(model)])
    att = IFAttributorExplicit(task, regularization=0.1).cache(train)
    att.attribute(train, test)
    _perturb(model)
    torch.save(_copy(model), path)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later write
    with pytest.raises(CheckpointError, match=r"checkpoints\[0\]"):
        att.self_attribute(train)
