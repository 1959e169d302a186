"""A dropout ensemble's influence functions: each member's curvature is the Hessian of
its fixed network (one mask, drawn from the member's seed, for every example and
every Hessian-vector product), as its gradients are. Before: the Hessian-vector
products drew fresh masks per example from the caller's random state, so
IF-Explicit / CG / LiSSA / Arnoldi changed with the global seed and the batch size."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import IFAttributorCG, IFAttributorExplicit
from dattri.algorithm._batched import _same_mask_dropout
from dattri.algorithm._loop import ensemble_rng
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _case():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    torch.manual_seed(4)
    model = _Net().eval()
    model.drop.train()  # the ensemble's random layer

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return nn.functional.cross_entropy(out, data[1])
    return model, loss, x, y


def test_a_members_curvature_is_its_fixed_networks_hessian():
    model, loss, x, y = _case()
    task = AttributionTask(loss, model, model.state_dict())
    test = DataLoader(TensorDataset(x[:4], y[:4]), batch_size=4)
    got = {}
    for seed, bs in ((0, 4), (1, 4), (0, 6)):
        torch.manual_seed(seed)  # the caller's random state: no effect
        train = DataLoader(TensorDataset(x, y), batch_size=bs)
        got[(seed, bs)] = IFAttributorExplicit(task, regularization=0.1).cache(train).attribute(train, test)
    torch.testing.assert_close(got[(1, 4)], got[(0, 4)], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[(0, 6)], got[(0, 4)], rtol=1e-10, atol=1e-12)
    train = DataLoader(TensorDataset(x, y), batch_size=4)
    cg = IFAttributorCG(task, regularization=0.1, max_iter=200, tol=1e-13).cache(train)
    torch.testing.assert_close(cg.attribute(train, test), got[(0, 4)], rtol=1e-7, atol=1e-10)
    # the definition: member 0's mask (its seed, one mask for all examples), the
    # dense Hessian of the mean loss and the gradients under that same mask
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    shapes = [params[k].shape for k in names]
    flat = torch.cat([params[k].reshape(-1) for k in names])

    def f(theta, xb, yb):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(theta.split([s.numel() for s in shapes]), shapes))))
        with ensemble_rng(0, torch.device("cpu")), _same_mask_dropout(model):
            return loss(parts, (xb, yb))

    h = torch.autograd.functional.hessian(lambda t: f(t, x, y), flat)
    g_tr = torch.stack([torch.autograd.functional.jacobian(lambda t: f(t, x[i:i + 1], y[i:i + 1]), flat)
                        for i in range(12)])
    g_te = g_tr[:4]
    want = g_tr @ torch.linalg.solve(h + 0.1 * torch.eye(flat.numel()), g_te.T)
    torch.testing.assert_close(got[(0, 4)], want, rtol=1e-8, atol=1e-10)
