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


def _tanh_problem(n=30, batch=10):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    theta = torch.randn(18, generator=g, dtype=torch.float64)

    def loss(t, b):
        xb, yb = b
        w, c = t[:15].reshape(3, 5), t[15:]
        return torch.nn.functional.cross_entropy(torch.tanh(xb @ w.T + c), yb)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)
    dense = torch.autograd.functional.hessian(lambda t: loss(t, (x, y)), theta)
    return loss, theta, loader, dense


def test_graph_budget_keeps_the_first_graphs_and_frees_the_rest(monkeypatch):
    """Past GRAPH_BYTES a batch records its gradient graph for each product and frees
    it: the products are those of the dense float64 Hessian either way."""
    from dattri.algorithm._engine import DataCache

    loss, theta, loader, dense = _tanh_problem()
    data = DataCache(loader, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    v = torch.randn(6, 18, generator=g, dtype=torch.float64)
    one = IF.hvp_matmat(loss, theta, data.batches[0])
    per_batch = one.record()
    assert per_batch >= 10 * 5 * 8  # at least the batch's inputs were saved
    monkeypatch.setattr(IF, "FEW_VECTORS", 4)
    for budget, kept in ((10 * per_batch, [True] * 3), (1.5 * per_batch, [True, False, False]),
                         (0, [False] * 3)):
        monkeypatch.setattr(IF, "GRAPH_BYTES", budget)
        matmat = IF.dataset_matmat(loss, theta, data)
        for rows in (v, v[:3], v):  # vmap(vjp) first (the measured graph), per vector
            torch.testing.assert_close(matmat(rows), rows @ dense, rtol=1e-10, atol=1e-12)
            assert [op.keep for op in matmat.ops] == kept
            # nothing outlives a call past the budget; a kept graph stays
            assert all(op._graph is None and op._batched is None
                       for op in matmat.ops if not op.keep)
            assert all(op._graph is not None or op._batched is not None
                       for op in matmat.ops if op.keep)
            if rows.shape[0] <= 4:  # past the budget, one vector at a time: forward-over-reverse
                assert [callable(op._fwd) for op in matmat.ops[1:]] == [not k for k in kept[1:]]


class _OldStyleTanh(torch.autograd.Function):
    """tanh with a backward written in differentiable ops (so reverse-over-reverse
    works) but no forward-mode derivative (torch.func's jvp refuses it)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)


def test_graphs_past_the_budget_fall_back_to_recording_without_forward_mode(monkeypatch):
    from dattri.algorithm._engine import DataCache

    _, theta, loader, _ = _tanh_problem()

    def loss(t, b):
        xb, yb = b
        w, c = t[:15].reshape(3, 5), t[15:]
        return torch.nn.functional.cross_entropy(_OldStyleTanh.apply(xb @ w.T + c), yb)

    x, y = loader.dataset.tensors
    dense = torch.autograd.functional.hessian(lambda t: loss(t, (x, y)), theta)
    monkeypatch.setattr(IF, "GRAPH_BYTES", 0)
    matmat = IF.dataset_matmat(loss, theta, DataCache(loader, torch.device("cpu")))
    v = torch.randn(3, 18, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(matmat(v), v @ dense, rtol=1e-10, atol=1e-12)
    assert all(op._fwd is False and op._graph is None for op in matmat.ops[1:])


def test_arnoldi_scores_do_not_depend_on_the_graph_budget(monkeypatch):
    """IF-Arnoldi (one vector per product, 3 batches) with every graph kept and with
    none kept: the same eigenbasis, the same scores."""
    from dattri.algorithm import IFAttributorArnoldi
    from dattri.task import AttributionTask

    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    tl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    sl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:4], y[:4]), batch_size=4)

    def loss(params, batch):
        xb, yb = batch
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (xb,)), yb)

    def scores():
        task = AttributionTask(loss, model, model.state_dict())
        att = IFAttributorArnoldi(task, max_iter=20, proj_dim=10, regularization=1e-3)
        return att.cache(tl).attribute(tl, sl)

    kept = scores()
    monkeypatch.setattr(IF, "GRAPH_BYTES", 0)
    torch.testing.assert_close(scores(), kept, rtol=1e-9, atol=1e-12)


def test_a_loss_running_torch_func_itself_is_not_counted_and_still_exact():
    """A loss with a torch.func transform inside (which refuses saved-tensor hooks):
    its graph is recorded without counting it, and the products are exact."""
    from dattri.algorithm._engine import DataCache

    _, theta, loader, _ = _tanh_problem()

    def loss(t, b):
        xb, yb = b
        w, c = t[:15].reshape(3, 5), t[15:]
        # d/dz sum(softplus(z)) = sigmoid(z), by torch.func.grad inside the loss
        act = torch.func.grad(lambda z: torch.nn.functional.softplus(z).sum())(xb @ w.T + c)
        return torch.nn.functional.cross_entropy(act, yb)

    x, y = loader.dataset.tensors
    dense = torch.autograd.functional.hessian(lambda t: loss(t, (x, y)), theta)
    data = DataCache(loader, torch.device("cpu"))
    assert IF.hvp_matmat(loss, theta, data.batches[0]).record() == 0
    matmat = IF.dataset_matmat(loss, theta, data)
    v = torch.randn(2, 18, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.testing.assert_close(matmat(v), v @ dense, rtol=1e-10, atol=1e-12)
    assert all(op.keep for op in matmat.ops)
