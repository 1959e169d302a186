"""A loss that sums over the batch instead of averaging: found on two examples, its
per-example gradients and the methods built on them (TracIn, EK-FAC, DataInf) equal
those of the mean, and the methods that take the Hessian of the mean training loss
refuse it with a typed error instead of a curvature scaled by each batch's size."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri._convention import batch_scale
from dattri.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorDataInf,
    IFAttributorEKFAC,
    IFAttributorExplicit,
    IFAttributorLiSSA,
    TracInAttributor,
)
from dattri.errors import InvalidLossError
from dattri.task import AttributionTask


pytestmark = pytest.mark.usefixtures("float64")


def _setup(model_kind: str = "mlp"):
    torch.manual_seed(0)
    if model_kind == "conv":
        model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3)).eval()
        x = torch.randn(24, 2, 8)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).eval()
        x = torch.randn(24, 5)
    y = torch.randint(0, 3, (24,))
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    return model, loader


def _task(model, reduction: str) -> AttributionTask:
    def loss(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, x)
        return nn.functional.cross_entropy(out, y, reduction=reduction)
    return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())


def test_the_reduction_is_found_on_two_examples():
    model, loader = _setup()
    batch = next(iter(loader))
    for reduction in ("mean", "sum"):
        task = _task(model, reduction)
        task.validate_batch(batch, "loss", 0)
        assert task.reduction("loss") == reduction
        assert batch_scale(task.original_loss_func, 8) == (8 if reduction == "mean" else 1)

    def coupled(params, data):  # neither: the batch's largest logit scales every example
        x, y = data
        out = torch.func.functional_call(model, params, x)
        return nn.functional.cross_entropy(out / out.abs().amax(), y)

    task = AttributionTask(loss_func=coupled, model=model, checkpoints=model.state_dict())
    task.validate_batch(batch, "loss", 0)
    assert task.reduction("loss") is None


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_tracin_of_a_summed_loss_equals_the_mean_batched_and_exact(kind):
    model, loader = _setup(kind)
    scores = {}
    for reduction in ("mean", "sum"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fall-back to vmap(grad) on batches of one
            scores[reduction] = TracInAttributor(_task(model, reduction), [1.0],
                                                 normalized_grad=False).attribute(loader, loader)
    # the definition: autograd on each example alone
    task = _task(model, "mean")
    params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
    x, y = loader.dataset.tensors
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        task.original_loss_func(params, (x[i:i + 1], y[i:i + 1])), list(params.values()))])
        for i in range(x.shape[0])]
    g = torch.stack(rows)
    for s in scores.values():
        torch.testing.assert_close(s, g @ g.T, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [lambda t: IFAttributorEKFAC(t, damping=0.1),
                                  lambda t: IFAttributorDataInf(t, regularization=0.1)],
                         ids=["ekfac", "datainf"])
def test_per_example_curvature_of_a_summed_loss_equals_the_mean(make):
    model, loader = _setup()
    got = {}
    for reduction in ("mean", "sum"):
        att = make(_task(model, reduction))
        att.cache(loader)
        got[reduction] = att.attribute(loader, loader)
    assert got["mean"].abs().max() > 0
    torch.testing.assert_close(got["sum"], got["mean"], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda t: IFAttributorExplicit(t, regularization=1.0),
    lambda t: IFAttributorCG(t, regularization=0.1),
    lambda t: IFAttributorLiSSA(t, recursion_depth=3, batch_size=4),
    lambda t: IFAttributorArnoldi(t, proj_dim=4, max_iter=8, regularization=0.1),
], ids=["explicit", "cg", "lissa", "arnoldi"])
def test_hessian_methods_refuse_a_summed_loss(make):
    model, loader = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    with pytest.raises(InvalidLossError, match=r"loss_func sums over the batch.*reduction='mean'"):
        make(_task(model, "sum")).cache(loader)
    assert list(model.parameters()) == params
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    make(_task(model, "mean")).cache(loader)  # the mean is accepted


def _hinge_case():
    """A squared hinge over the classes, summed or averaged: the first 4 training
    examples of every batch of 8 sit beyond the margin (zero loss, zero gradient)."""
    torch.manual_seed(3)
    model = nn.Linear(4, 3).eval()
    x, y = torch.randn(24, 4), torch.arange(24) % 3
    with torch.no_grad():
        for i in range(24):
            if i % 8 < 4:
                x[i] = 40 * model.weight[y[i]] / model.weight[y[i]].norm()

    def make(reduction):
        def loss(params, data):
            x, y = data
            out = torch.func.functional_call(model, params, (x,))
            per = torch.relu(1 - (out.gather(1, y[:, None]) - out)).pow(2).sum(1) - 1.0
            return per.sum() if reduction == "sum" else per.mean()
        return AttributionTask(loss_func=loss, model=model, checkpoints=model.state_dict())
    return model, x, y, make


def test_a_reduction_hidden_by_zero_losses_is_found_on_the_batch_or_a_later_one():
    model, x, y, make = _hinge_case()
    for reduction in ("mean", "sum"):
        task = make(reduction)
        # the first two examples have zero loss: the halves of the batch decide
        task.validate_batch((x[:8], y[:8]), "loss", 0)
        assert task.reduction_known("loss") and task.reduction("loss") == reduction
        # a batch of zero losses only decides nothing; the next batch does
        task = make(reduction)
        task.validate_batch((x[:4], y[:4]), "loss", 0)
        assert not task.reduction_known("loss") and task.reduction("loss") is None
        task.validate_batch((x[4:8], y[4:8]), "loss", 0)
        assert task.reduction("loss") == reduction
        # found once, kept: a later batch of zero losses changes nothing
        task.validate_batch((x[:4], y[:4]), "loss", 0)
        assert task.reduction("loss") == reduction


def test_grad_dot_of_a_summed_loss_with_zero_losses_first_equals_the_mean():
    model, x, y, make = _hinge_case()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    test = DataLoader(TensorDataset(x[4:10], y[4:10]), batch_size=3)
    got = {r: TracInAttributor(make(r), [1.0], normalized_grad=False).attribute(loader, test)
           for r in ("mean", "sum")}
    assert got["mean"].abs().max() > 0
    torch.testing.assert_close(got["sum"], got["mean"], rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidLossError, match="loss_func sums over the batch"):
        IFAttributorExplicit(make("sum"), regularization=0.1).cache(loader)
