"""The two reverse-over-reverse HVP paths (plain autograd per vector for a few
vectors, vmap(vjp) for many) agree with the dense float64 Hessian."""

from __future__ import annotations

import torch

from dattri.algorithm import influence_function as IF


def test_few_and_many_vector_paths_equal_the_dense_hessian(monkeypatch):
    monkeypatch.setattr(IF, "FEW_VECTORS", 4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    theta = torch.randn(18, generator=g, dtype=torch.float64)

    def loss(t, batch):
        xb, yb = batch
        w, b = t[:15].reshape(3, 5), t[15:]
        return torch.nn.functional.cross_entropy(torch.tanh(xb @ w.T + b), yb)

    dense = torch.autograd.functional.hessian(lambda t: loss(t, (x, y)), theta)
    v = torch.randn(12, 18, generator=g, dtype=torch.float64)
    op = IF.hvp_matmat(loss, theta, (x, y))
    few = op(v[:3])  # <= FEW_VECTORS: plain autograd
    assert op._batched is None  # no torch.func transform was built
    many = op(v)  # vmap(vjp)
    torch.testing.assert_close(few, v[:3] @ dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(many, v @ dense, rtol=1e-10, atol=1e-12)
