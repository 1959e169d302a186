"""IF-CG's Hessian products from the Kronecker form of one selected nn.Linear,
against the autograd Hessian-vector products (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dattri.algorithm import IFAttributorCG
from dattri.algorithm._engine import DataCache
from dattri.algorithm._linear_hessian import _KroneckerMatmat, linear_layer_matmat
from dattri.algorithm.influence_function import dataset_matmat, dense_hessian
from dattri.task import AttributionTask
from cases import weight_decay_task


def _task(hidden: bool, bias: bool = True, seed: int = 0, n: int = 29, batch: int = 8,
          l2: float = 0.0):
    """Logistic regression (6 -> 4 classes), or an MLP with ``hidden``; ``l2``: weight decay."""
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=bias)] if hidden else [
        nn.Linear(6, 4, bias=bias)]
    return weight_decay_task(nn.Sequential(*layers), n=n, batch=batch, l2=l2, seed=seed)


def _operators(task, loader, sel, first_batches=None):
    data = DataCache(loader, torch.device("cpu"))
    task.load_checkpoint(0)
    theta, _ = task.get_param(0, sel)
    lf = task.get_loss_func(sel, 0)
    slow = dataset_matmat(lf, theta, data, first_batches=first_batches)
    fast = dataset_matmat(lf, theta, data, first_batches=first_batches, structure=(task, sel, 0))
    return fast, slow, lf, theta, data


@pytest.mark.parametrize(("sel", "bias"), [(None, True), (["0.weight"], True), (["0.bias"], True),
                                           (None, False)])
def test_kronecker_matmat_equals_autograd_hvps_on_lr(sel, bias):
    task, loader = _task(hidden=False, bias=bias)
    fast, slow, lf, theta, data = _operators(task, loader, sel)
    assert isinstance(fast, _KroneckerMatmat)
    v = torch.randn(7, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(fast(v), slow(v), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(fast(v[0]), slow(v[0]), rtol=1e-10, atol=1e-13)  # one vector
    # and the operator is V -> V H for the dense Hessian (basis-vector HVPs)
    torch.testing.assert_close(fast(v), v @ dense_hessian(lf, theta, data), rtol=1e-10, atol=1e-13)


def test_weight_decay_is_the_identity_shift():
    task, loader = _task(hidden=False, l2=0.03)
    fast, slow, _, theta, _ = _operators(task, loader, None)
    assert isinstance(fast, _KroneckerMatmat)
    assert fast.shift == pytest.approx(0.03, rel=1e-8)
    v = torch.randn(4, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(fast(v), slow(v), rtol=1e-10, atol=1e-13)
    plain = _operators(*_task(hidden=False), None)[0]
    assert plain.shift == 0.0


def test_first_batches_weights_the_prefix_only():
    task, loader = _task(hidden=False)
    fast, slow, _, theta, _ = _operators(task, loader, None, first_batches=2)
    assert isinstance(fast, _KroneckerMatmat)
    v = torch.randn(3, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(fast(v), slow(v), rtol=1e-10, atol=1e-13)
    _, full, _, _, _ = _operators(task, loader, None)
    assert not torch.allclose(fast(v), full(v), rtol=1e-6)  # a different operator


def test_last_layer_of_mlp_is_kronecker_all_layers_are_not():
    task, loader = _task(hidden=True)
    fast, slow, _, theta, _ = _operators(task, loader, ["2.weight", "2.bias"])
    assert isinstance(fast, _KroneckerMatmat)
    v = torch.randn(5, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(fast(v), slow(v), rtol=1e-10, atol=1e-13)
    # every layer of the MLP: declined, the autograd products are used
    fast, slow, _, theta, _ = _operators(task, loader, None)
    assert not isinstance(fast, _KroneckerMatmat)
    w = torch.randn(2, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(fast(w), slow(w), rtol=1e-12, atol=0)


def test_a_failed_check_falls_back():
    """A loss that couples the examples of a batch: its Hessian is not the Kronecker sum."""
    torch.manual_seed(1)
    model = nn.Linear(6, 4).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return nn.functional.cross_entropy(out - out.mean(0, keepdim=True), data[1])

    task = AttributionTask(loss, model, model.state_dict())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    data = DataCache(loader, torch.device("cpu"))
    theta, _ = task.get_param(0, None)
    slow = dataset_matmat(task.get_loss_func(None, 0), theta, data)
    assert linear_layer_matmat(task, task._resolve_layer_name(None), data, 0, slow, theta) is None
    fast = dataset_matmat(task.get_loss_func(None, 0), theta, data, structure=(task, None, 0))
    assert not isinstance(fast, _KroneckerMatmat)


@pytest.mark.parametrize(("hidden", "sel", "l2"), [(False, None, 0.0), (False, None, 0.05),
                                                   (True, ["2.weight", "2.bias"], 0.0),
                                                   (True, None, 0.0)])
def test_cg_scores_unchanged(hidden, sel, l2, monkeypatch):
    task, loader = _task(hidden=hidden, n=24, batch=5, l2=l2)
    kw = {"layer_name": sel, "regularization": 1e-2, "max_iter": 40, "tol": 1e-12}
    fast = IFAttributorCG(task, **kw).cache(loader)
    expect_fast = sel is not None or not hidden
    assert isinstance(fast._state[0], _KroneckerMatmat) == expect_fast
    got = fast.attribute(loader, loader)
    monkeypatch.setattr("dattri.algorithm._linear_hessian.linear_layer_matmat",
                        lambda *a, **k: None)
    slow = IFAttributorCG(task, **kw).cache(loader)
    assert not isinstance(slow._state[0], _KroneckerMatmat)
    torch.testing.assert_close(got, slow.attribute(loader, loader), rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------ LiSSA's minibatch products
def _lissa(task, loader, force_autograd, monkeypatch=None, **kw):
    from dattri.algorithm import IFAttributorLiSSA

    att = IFAttributorLiSSA(task, recursion_depth=40, batch_size=5, scaling=20.0, damping=0.01,
                            seed=3, **kw)
    if force_autograd:
        monkeypatch.setattr(IFAttributorLiSSA, "_kronecker_steps", lambda *a, **k: None)
    att.cache(loader)
    return att


@pytest.mark.parametrize("l2", [0.0, 0.03])
def test_lissa_kronecker_steps_equal_the_autograd_recursion(monkeypatch, l2):
    """The same minibatches, the same recursion: scores and self-influence equal the
    autograd path's (float64), and the Kronecker path is the one taken."""
    task, loader = _task(hidden=False, l2=l2)
    fast = _lissa(task, loader, False)
    assert getattr(fast._state[0], "chunk", None) is not None  # the Kronecker operator
    test = torch.utils.data.DataLoader(loader.dataset, batch_size=6)
    got, got_self = fast.attribute(loader, test), fast.self_attribute(loader)
    with monkeypatch.context() as m:
        slow = _lissa(task, loader, True, m)
        assert getattr(slow._state[0], "chunk", None) is None
        want, want_self = slow.attribute(loader, test), slow.self_attribute(loader)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_self, want_self, rtol=1e-9, atol=1e-12)


def test_lissa_kronecker_minibatch_operator_is_the_minibatch_hessian():
    """One step's operator is V -> V H_B with H_B the dense Hessian of the drawn
    minibatch's mean loss."""
    from dattri.algorithm._linear_hessian import linear_layer_rows

    task, loader = _task(hidden=False)
    data = DataCache(loader, torch.device("cpu"))
    task.load_checkpoint(0)
    theta, _ = task.get_param(0, None)
    lf = task.get_loss_func(None, 0)
    rows = linear_layer_rows(task, task._resolve_layer_name(None), data, 0, theta)
    pick = torch.tensor([3, 17, 28, 9])
    x, y = loader.dataset.tensors
    mini = DataCache(torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x[pick], y[pick]), batch_size=4), torch.device("cpu"))
    want = dense_hessian(lf, theta, mini)
    v = torch.randn(5, theta.numel(), dtype=torch.float64)
    torch.testing.assert_close(rows.matmat(pick, 1 / 4)(v), v @ want, rtol=1e-10, atol=1e-13)


def test_lissa_takes_the_chain_path_for_an_mlp(monkeypatch):
    """An MLP is not one nn.Linear: its minibatch products come from the chain's
    R-operator (tests/test_chain_hessian.py), equal to the autograd recursion."""
    from dattri.algorithm import _chain_hessian

    task, loader = _task(hidden=True)
    att = _lissa(task, loader, False)
    assert getattr(att._state[0], "chunk", None) is not None
    test = torch.utils.data.DataLoader(loader.dataset, batch_size=6)
    got = att.attribute(loader, test)
    with monkeypatch.context() as m:
        m.setattr(_chain_hessian, "chain_rows", lambda *a, **k: None)
        slow = _lissa(task, loader, False)
        assert getattr(slow._state[0], "chunk", None) is None  # autograd products
        torch.testing.assert_close(got, slow.attribute(loader, test), rtol=1e-9, atol=1e-12)
