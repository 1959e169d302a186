"""A batch whose size equals one of the model's own sizes (B sequences of length
T = B): the batched per-example gradients tell a tensor's batch axis by its size, so
a shared tensor of the model (position ids ``arange(T)``, a ``(T, T)`` mask) looked
like one row per example. The batch is now split into parts of other sizes; every
result equals autograd on single examples, whatever the batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import TracInAttributor
from dattri.model_util.dropout import activate_dropout
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")

V, T, D = 7, 5, 4


class PositionModel(nn.Module):
    """Token and position embeddings (the positions' call has no batch axis)."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(D, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        return self.head(self.drop(torch.tanh(self.wte(idx) + self.wpe(pos))))


class TempAttention(nn.Module):
    """A parameter used non-linearly (the generic ``vmap(vjp)`` rule) beside a
    ``(T, T)`` additive mask shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.log_temp = nn.Parameter(torch.tensor(0.3))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = h @ h.transpose(1, 2) / torch.exp(self.log_temp) + mask
        return torch.softmax(scores, -1) @ h


class MaskModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.att, self.head = nn.Embedding(V, D), TempAttention(), nn.Linear(D, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), -1e4), 1)
        return self.head(torch.tanh(self.att(self.emb(x), mask)))


def _loss(model):
    def f(params, batch):
        out = torch.func.functional_call(model, params, (batch[0],))
        return F.cross_entropy(out.reshape(-1, V), batch[1].reshape(-1))
    return f


def _per_example(model, loss, x, y) -> torch.Tensor:
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    rows = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss(params, (x[i:i + 1], y[i:i + 1])), list(params.values()))
        rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


def _data(n: int, m: int):
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, V, (n, T), generator=g), torch.randint(0, V, (n, T), generator=g),
            torch.randint(0, V, (m, T), generator=g), torch.randint(0, V, (m, T), generator=g))


@pytest.mark.parametrize("make", [PositionModel, MaskModel], ids=["positions", "mask"])
@pytest.mark.parametrize("batch", [4, T, 2 * T])
def test_grad_dot_equals_single_examples_at_every_batch_size(make, batch):
    torch.manual_seed(0)
    model = make().eval()
    loss = _loss(model)
    x, y, xt, yt = _data(2 * T, T)
    g, gt = _per_example(model, loss, x, y), _per_example(model, loss, xt, yt)
    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    train = DataLoader(TensorDataset(x, y), batch_size=batch)
    test = DataLoader(TensorDataset(xt, yt), batch_size=T)  # the test side at B = T too
    att = TracInAttributor(task, weight_list=[1.0], normalized_grad=False)
    torch.testing.assert_close(att.attribute(train, test), g @ gt.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(att.self_attribute(train), (g * g).sum(1), rtol=1e-10, atol=1e-12)
    if make is PositionModel:  # a selected layer: exactly its block of the gradient
        sel = TracInAttributor(task, weight_list=[1.0], normalized_grad=False,
                               layer_name="wpe.weight")
        cols = slice(V * D, V * D + T * D)
        torch.testing.assert_close(sel.attribute(train, test), g[:, cols] @ gt[:, cols].T,
                                   rtol=1e-10, atol=1e-12)


def test_split_batch_keeps_one_dropout_mask_per_member():
    """A dropout-ensemble member draws one mask for all its examples: the parts of a
    batch of size T get the same masks, so T + 1 rows in batches of T (split) score as
    in batches of 2 or of T + 1 (no split)."""
    torch.manual_seed(0)
    model = PositionModel(dropout=0.3).eval()
    activate_dropout(model)
    loss = _loss(model)
    x, y, xt, yt = _data(T + 1, 3)
    ck = {k: v.clone() for k, v in model.state_dict().items()}
    task = AttributionTask(loss, model, [ck, ck])
    test = DataLoader(TensorDataset(xt, yt), batch_size=3)

    def scores(batch):
        att = TracInAttributor(task, weight_list=[1.0, 1.0], normalized_grad=False)
        return att.attribute(DataLoader(TensorDataset(x, y), batch_size=batch), test)

    split = scores(T)
    for batch in (2, T + 1):
        torch.testing.assert_close(scores(batch), split, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        assert (scores(T) - split).abs().max() == 0  # deterministic per member


class SharedFeatures(nn.Module):
    """A ``nn.Linear`` called on features of the positions, ``(T, 2)``, shared by the
    batch (``expand=True``: the same features given to every example explicitly)."""

    def __init__(self, expand: bool = False) -> None:
        super().__init__()
        self.expand = expand
        self.wte, self.pos, self.head = nn.Embedding(V, D), nn.Linear(2, D), nn.Linear(D, V)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        feats = torch.stack([torch.arange(t) / t, torch.ones(t)], 1)
        if self.expand:
            feats = feats.expand(idx.shape[0], t, 2)
        return self.head(torch.tanh(self.wte(idx) + self.pos(feats)))


@pytest.mark.parametrize("batch", [4, T, 2 * T])
def test_layer_captures_of_a_call_without_the_batch_axis(batch):
    """EK-FAC and LoGra capture each layer's inputs and output gradients: a Linear
    called on features shared by the batch gets each example's own copy, so the
    scores equal those of the same model given the features per example, at every
    batch size (EK-FAC's scores changed with the batch size; LoGra refused the
    batch)."""
    from dattri.algorithm import IFAttributorEKFAC, LoGraAttributor

    torch.manual_seed(0)
    shared, expanded = SharedFeatures(), SharedFeatures(expand=True)
    expanded.load_state_dict(shared.state_dict())
    x, y, xt, yt = _data(2 * T, 3)
    train = DataLoader(TensorDataset(x, y), batch_size=batch)
    test = DataLoader(TensorDataset(xt, yt), batch_size=3)
    whole = DataLoader(TensorDataset(x, y), batch_size=2 * T + 1)  # no split, no sharing

    def scores(model, make, loader):
        task = AttributionTask(_loss(model), model.eval(),
                               {k: v.clone() for k, v in model.state_dict().items()})
        return make(task).cache(loader).attribute(loader, test)

    makers = [lambda t: IFAttributorEKFAC(t, damping=0.1),
              lambda t: LoGraAttributor(t, damping=0.1, proj_params={
                  "proj_dim_per_layer": 100, "proj_type": "identity"})]
    for make in makers:
        want = scores(expanded, make, whole)
        torch.testing.assert_close(scores(shared, make, train), want, rtol=1e-10, atol=1e-12)
