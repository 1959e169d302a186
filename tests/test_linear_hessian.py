"""The Kronecker Hessian of one selected nn.Linear, against basis-vector HVPs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dattri.algorithm import IFAttributorExplicit
from dattri.algorithm._engine import DataCache
from dattri.algorithm._linear_hessian import linear_layer_hessian
from dattri.algorithm.influence_function import dataset_matmat, dense_hessian
from dattri.task import AttributionTask


def _case(loss_kind="ce", seq=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(6, 5))
    model.add_module("act", nn.Tanh())
    model.add_module("fc2", nn.Linear(5, 4))
    model = model.double()
    shape = (23, 3, 6) if seq else (23, 6)
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 4, (23,))

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        if seq:
            out = out.mean(1)
        if loss_kind == "coupled":  # normalising the logits over the batch couples examples
            out = out - out.mean(0, keepdim=True) if out.shape[0] > 1 else out
        if loss_kind == "mse":
            return ((out - nn.functional.one_hot(data[1], 4)) ** 2).sum(1).mean()
        return nn.functional.cross_entropy(out, data[1])

    task = AttributionTask(loss, model, model.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    return task, loader


def _both(task, loader, sel):
    data = DataCache(loader, torch.device("cpu"))
    task.load_checkpoint(0)
    theta, _ = task.get_param(0, sel)
    lf = task.get_loss_func(sel, 0)
    ref = dense_hessian(lf, theta, data)
    got = linear_layer_hessian(task, task._resolve_layer_name(sel), data, 0,
                               dataset_matmat(lf, theta, data), theta)
    return got, ref


@pytest.mark.parametrize("sel", [["fc2.weight", "fc2.bias"], ["fc2.weight"], ["fc2.bias"],
                                 ["fc1.weight", "fc1.bias"], ["fc1.bias"]])
@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
def test_equals_basis_vector_hessian_float64(sel, loss_kind):
    got, ref = _both(*_case(loss_kind), sel)
    assert got is not None
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("kind", "seq", "sel"), [
    ("ce", False, None),                    # two layers selected
    ("coupled", False, ["fc2.weight"]),     # the check against HVPs fails
    ("ce", True, ["fc2.weight"]),           # sequence inputs: not one 2-D call
])
def test_declines_when_the_structure_does_not_hold(kind, seq, sel):
    got, _ = _both(*_case(kind, seq), sel)
    assert got is None


@pytest.mark.parametrize("kind", ["ce", "coupled"])
def test_explicit_if_is_the_same_either_way(kind, monkeypatch):
    task, loader = _case(kind)
    sel = ["fc2.weight", "fc2.bias"]
    fast = IFAttributorExplicit(task, layer_name=sel, regularization=1e-3).cache(loader)
    monkeypatch.setattr("dattri.algorithm._linear_hessian.linear_layer_hessian",
                        lambda *a, **k: None)
    slow = IFAttributorExplicit(task, layer_name=sel, regularization=1e-3).cache(loader)
    torch.testing.assert_close(fast.attribute(loader, loader), slow.attribute(loader, loader),
                               rtol=1e-8, atol=1e-10)
