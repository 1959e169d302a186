"""Exact minibatch Hessian products of a chain of nn.Linear layers (an MLP) from the
R-operator (dattri.algorithm._chain_hessian), against dense float64 Hessians and the
autograd LiSSA recursion; models that are not such a chain fall back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dattri.algorithm import IFAttributorLiSSA
from dattri.algorithm import _chain_hessian
from dattri.algorithm._chain_hessian import chain_rows
from dattri.algorithm._engine import DataCache
from dattri.algorithm._linear_hessian import calibrated
from dattri.algorithm.influence_function import dense_hessian
from cases import weight_decay_task

ACTS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


class _Residual(nn.Module):
    """``fc3(tanh(fc2(h)) + h)`` with ``h = tanh(fc1(x))``: not a chain (the last
    layer also sees ``h``, which depends on ``fc1``). A skip from the raw input
    would be one: ``x`` is a constant shift of the activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 4)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc3(torch.tanh(self.fc2(h)) + h)


def _mlp(act: str = "tanh", bias: bool = True, norm: bool = False, dropout: float = 0.0):
    mid = [nn.LayerNorm(5)] if norm else []
    return nn.Sequential(nn.Linear(6, 7, bias=bias), ACTS[act](), nn.Dropout(dropout),
                         nn.Linear(7, 5), *mid, ACTS[act](), nn.Linear(5, 4, bias=bias))


def _task(model: nn.Module, n: int = 31, batch: int = 8, l2: float = 0.0, seed: int = 0):
    return weight_decay_task(model, n=n, batch=batch, l2=l2, seed=seed)


def _minibatch_hessian(task, loader, sel, pick):
    x, y = loader.dataset.tensors
    mini = DataCache(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[pick], y[pick]), batch_size=len(pick)), torch.device("cpu"))
    theta, _ = task.get_param(0, sel)
    return dense_hessian(task.get_loss_func(sel, 0), theta, mini)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize(("sel", "bias"), [
    (None, True), (None, False), (["3.weight"], True), (["0.weight", "5.bias"], True),
    (["5.weight", "5.bias"], True)])
def test_chain_minibatch_operator_is_the_dense_minibatch_hessian(act, sel, bias):
    """Every activation's s' and s'' enter (tanh, GELU and sigmoid have s'' != 0), a
    selection of layers keeps the others' weights in the chain, and the unweighted
    rows of one step give V -> V H_B for their mean loss."""
    task, loader = _task(_mlp(act, bias))
    task.load_checkpoint(0)
    names = task._resolve_layer_name(sel)
    theta, _ = task.get_param(0, sel)
    data = DataCache(loader, torch.device("cpu"))
    rows = chain_rows(task, names, data, 0, theta)
    assert rows is not None
    pick = torch.tensor([3, 17, 28, 9, 30])
    want = _minibatch_hessian(task, loader, sel, pick)
    v = torch.randn(6, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(rows.matmat(pick, 1 / 5)(v), v @ want, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(rows.matmat(pick, 1 / 5)(v[0]), v[0] @ want, rtol=1e-10,
                               atol=1e-13)


def test_weight_decay_is_found_as_the_identity_shift():
    task, loader = _task(_mlp(), l2=0.05)
    task.load_checkpoint(0)
    names = task._resolve_layer_name(None)
    theta, _ = task.get_param(0, None)
    rows = chain_rows(task, names, DataCache(loader, torch.device("cpu")), 0, theta)
    pick = torch.tensor([0, 5, 6, 20])
    want = _minibatch_hessian(task, loader, None, pick)
    op = rows.matmat(pick, 1 / 4)
    assert calibrated(op, lambda v: v @ want, 0, theta)
    assert op.shift == pytest.approx(0.05, rel=1e-9)
    v = torch.randn(3, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(op(v), v @ want, rtol=1e-10, atol=1e-13)


def _lissa(task, loader, monkeypatch=None, chain=True):
    att = IFAttributorLiSSA(task, recursion_depth=12, batch_size=5, scaling=20.0, damping=0.01,
                            seed=1)
    if not chain:
        monkeypatch.setattr(_chain_hessian, "chain_rows", lambda *a, **k: None)
    return att.cache(loader)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_lissa_on_the_chain_equals_the_autograd_recursion(monkeypatch, act):
    """The same minibatches and recursion: scores and self-influence equal the
    autograd path's, and the chain operator is the one used."""
    task, loader = _task(_mlp(act))
    test = torch.utils.data.DataLoader(loader.dataset, batch_size=6)
    fast = _lissa(task, loader)
    assert getattr(fast._state[0], "chunk", None) is not None
    got, got_self = fast.attribute(loader, test), fast.self_attribute(loader)
    with monkeypatch.context() as m:
        slow = _lissa(task, loader, m, chain=False)
        assert getattr(slow._state[0], "chunk", None) is None
        want, want_self = slow.attribute(loader, test), slow.self_attribute(loader)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_self, want_self, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("model", ["residual", "layernorm"])
def test_a_model_that_is_not_a_chain_falls_back_to_autograd(monkeypatch, model):
    """A skip connection or a LayerNorm between the layers: the first product
    disagrees with autograd, so LiSSA keeps the autograd products (same scores)."""
    net = _Residual() if model == "residual" else _mlp(norm=True)
    task, loader = _task(net)
    test = torch.utils.data.DataLoader(torch.utils.data.Subset(loader.dataset, range(6)),
                                       batch_size=6)
    att = _lissa(task, loader)
    assert getattr(att._state[0], "chunk", None) is None
    with monkeypatch.context() as m:
        want = _lissa(task, loader, m, chain=False).attribute(loader, test)
    torch.testing.assert_close(att.attribute(loader, test), want, rtol=1e-12, atol=1e-14)


def test_active_dropout_declines():
    """Masks drawn in a training-mode dropout would differ between the recorded
    terms and the autograd minibatches: the chain is not used."""
    task, loader = _task(_mlp(dropout=0.3).train())
    task.load_checkpoint(0)
    theta, _ = task.get_param(0, None)
    data = DataCache(loader, torch.device("cpu"))
    assert chain_rows(task, task._resolve_layer_name(None), data, 0, theta) is None
    task.model.eval()
    assert chain_rows(task, task._resolve_layer_name(None), data, 0, theta) is not None


def test_no_rows_give_a_zero_product():
    """A rank that holds none of a step's drawn rows adds zero to the sum (the
    sharded LiSSA; tests/test_distributed.py runs it on two gloo ranks)."""
    task, loader = _task(_mlp())
    task.load_checkpoint(0)
    theta, _ = task.get_param(0, None)
    rows = chain_rows(task, task._resolve_layer_name(None), DataCache(loader, torch.device("cpu")),
                      0, theta)
    v = torch.randn(3, theta.numel(), dtype=torch.float64)
    assert torch.equal(rows.matmat(torch.tensor([], dtype=torch.long), 0.2)(v), torch.zeros_like(v))


def test_a_checkpoints_products_keep_its_weights_when_another_is_loaded():
    """The chain holds copies of the layer weights: loading another checkpoint (in
    place, as the attributors alternate them per batch in blocked scoring) must not
    change checkpoint 0's products (it did: LiSSA's blocked RelatIF scores over two
    checkpoints used checkpoint 1's weights for checkpoint 0)."""
    from dattri.task import AttributionTask

    task, loader = _task(_mlp("tanh"))
    other = {k: v + 0.3 * torch.randn_like(v) for k, v in task.model.state_dict().items()}
    two = AttributionTask(task.original_loss_func, task.model,
                          [task.model.state_dict(), other])
    two.load_checkpoint(0)
    theta, _ = two.get_param(0, None)
    data = DataCache(loader, torch.device("cpu"))
    rows = chain_rows(two, two._resolve_layer_name(None), data, 0, theta)
    want = _minibatch_hessian(two, loader, None, torch.tensor([1, 2, 3]))
    two.load_checkpoint(1)
    v = torch.randn(2, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(rows.matmat(torch.tensor([1, 2, 3]), 1 / 3)(v), v @ want,
                               rtol=1e-10, atol=1e-13)
