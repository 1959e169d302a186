"""The rest of the published dattri's public names, each used as the published
docstrings describe and checked against a closed form or a dense reference:
``dattri.func.fisher``'s EK-FAC estimation functions, ``dattri.benchmark.load``'s
maps, the published dataset modules, published LOO retraining folders, and the
GPT-2 + WikiText-2 benchmark setting."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import pytest

D64 = torch.float64


# ------------------------------------------------------- dattri.func.fisher estimates
def _hooked_mlp():
    """Two linear layers with the published EK-FAC hook: inputs get a column of ones
    for the bias, outputs are kept (the published attributor's ``layer_cache``)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    cache: dict = {}

    def hook(name):
        def fn(mod, inputs, outputs):
            a = inputs[0]
            if mod.bias is not None:
                a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
            cache[name] = (a, outputs)
        return fn

    for name in ("0", "2"):
        model.get_submodule(name).register_forward_hook(hook(name))
    return model, cache


def test_fisher_estimates_equal_per_example_gradient_reference():
    from dattri.func.fisher import (
        IFVPUsageError,
        estimate_covariance,
        estimate_eigenvector,
        estimate_lambda,
    )

    model, cache = _hooked_mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 4, generator=g, dtype=D64), torch.randint(0, 2, (10,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # batches 4, 4, 2

    def func(batch):  # the published convention: mean loss of a batch tuple
        return F.cross_entropy(model(batch[0]), batch[1])

    before = [p.grad for p in model.parameters()]
    cov = estimate_covariance(func, loader, cache)
    assert [p.grad for p in model.parameters()] == before  # the user's model untouched
    # dense reference: per-example gradients of each layer's [W | b] by autograd
    acts, grads = {"0": [], "2": []}, {"0": [], "2": []}
    for i in range(10):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        outs = [cache[k][1] for k in ("0", "2")]
        gs = torch.autograd.grad(loss, outs)
        for k, gk in zip(("0", "2"), gs):
            acts[k].append(cache[k][0][0])
            grads[k].append(gk[0])
    for k in ("0", "2"):
        a, s = torch.stack(acts[k]), torch.stack(grads[k])
        torch.testing.assert_close(cov[k][0], a.T @ a / 10)
        torch.testing.assert_close(cov[k][1], s.T @ s / 10)
    q = estimate_eigenvector(cov)
    for k in ("0", "2"):
        qa, qs = q[k]
        for Q, C in ((qa, cov[k][0]), (qs, cov[k][1])):
            d = Q.T @ C @ Q
            torch.testing.assert_close(d, torch.diag(torch.diagonal(d)), atol=1e-12, rtol=0)
    lam = estimate_lambda(func, loader, q, cache)
    for k in ("0", "2"):
        a, s = torch.stack(acts[k]), torch.stack(grads[k])
        G = s[:, :, None] * a[:, None, :]  # per-example [dW | db]
        qa, qs = q[k]
        torch.testing.assert_close(lam[k], (qs.T @ G @ qa).square().mean(0))
    # max_iter: the first batch only
    first = estimate_covariance(func, loader, cache, max_iter=1)
    a = torch.stack(acts["0"][:4])
    torch.testing.assert_close(first["0"][0], a.T @ a / 4)
    with pytest.raises(IFVPUsageError, match="max_iter=0"):
        estimate_covariance(func, loader, cache, max_iter=0)
    with pytest.raises(IFVPUsageError, match="layer_cache is empty"):
        estimate_covariance(func, loader, {})
