"""A call that raises leaves the user's model as it was before the call: weights and
buffers, even when an earlier checkpoint of the same call had been loaded; a model
with BatchNorm in training mode is refused before any forward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.algorithm import IFAttributorExplicit, TRAKAttributor, TracInAttributor
from dattri.errors import CheckpointError, DattriValueError, NonFiniteError
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def _case():
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():  # running statistics that differ from a fresh layer's
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    model.eval()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))

    def loss(params, data):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (data[0],)),
                                           data[1])

    def target(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return out.gather(1, data[1][:, None]).sum()

    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    return model, loss, target, loader


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


METHODS = {
    "tracin": lambda task, _: TracInAttributor(task, [1.0, 1.0], normalized_grad=False),
    "explicit": lambda task, _: IFAttributorExplicit(task, regularization=0.1),
    "trak": lambda task, target: TRAKAttributor(task, target, proj_params={"proj_type": "identity"}),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_refused_later_checkpoint_leaves_the_model_as_before_the_call(method):
    model, loss, target, loader = _case()
    before = _state(model)
    ck0 = {k: v + 0.5 if v.is_floating_point() else v for k, v in before.items()}
    bad = dict(before, **{"fc2.weight": torch.zeros(3, 6)})
    task = AttributionTask(loss, model, [ck0, bad], target_func=target)
    with pytest.raises(CheckpointError, match=r"checkpoints\[1\]\['fc2.weight'\]"):
        METHODS[method](task, target).attribute(loader, loader)
    assert _same(model, before)
    # the task is usable afterwards: the same call on good checkpoints succeeds
    good = AttributionTask(loss, model, [ck0, before], target_func=target)
    assert torch.isfinite(METHODS[method](good, target).attribute(loader, loader)).all()


def test_a_failure_in_a_later_checkpoint_restores_weights_and_buffers():
    model, loss, _, loader = _case()
    before = _state(model)
    ck0 = {k: v * 1.1 if v.is_floating_point() else v for k, v in before.items()}
    ck1 = dict(before, **{"fc2.weight": torch.full((3, 5), float("nan"))})
    att = TracInAttributor(AttributionTask(loss, model, [ck0, ck1]), [1.0, 1.0], False)
    with pytest.raises(NonFiniteError):
        att.attribute(loader, loader)
    assert _same(model, before)


def test_batchnorm_in_training_mode_is_refused_before_any_forward_pass():
    model, loss, _, loader = _case()
    model.train()
    before = _state(model)
    task = AttributionTask(loss, model, model.state_dict())
    for make in (lambda: TracInAttributor(task, [1.0], False),
                 lambda: IFAttributorExplicit(task, regularization=0.1)):
        with pytest.raises(DattriValueError, match=r"BatchNorm layers in training mode \(\['bn'\]\)"):
            make().cache(loader)
    assert _same(model, before)  # running statistics and num_batches_tracked untouched
    model.eval()
    TracInAttributor(task, [1.0], False).attribute(loader, loader)
    assert _same(model, before)


@pytest.mark.parametrize("where", ["train", "test"])
@pytest.mark.parametrize("method", ["knn", "rps"])
def test_a_nan_input_is_refused_by_the_methods_without_gradients(method, where):
    """KNN-Shapley and RPS-L2 read inputs or final-layer features, not gradients: a NaN
    example there gave a plausible column (KNN) or NaN scores (RPS) without an error."""
    from dattri.algorithm import KNNShapleyAttributor, RPSAttributor

    model, _, _, _ = _case()
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    bad = x.clone()
    bad[5, 1] = float("nan")
    train = DataLoader(TensorDataset(bad if where == "train" else x, y), batch_size=4)
    test = DataLoader(TensorDataset(bad[4:8] if where == "test" else x[4:8], y[4:8]), batch_size=4)
    if method == "knn":
        att = KNNShapleyAttributor(3)
    else:
        task = AttributionTask(lambda pre, t: nn.functional.cross_entropy(pre, t), model,
                               model.state_dict())
        att = RPSAttributor(task, "fc2")
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        att.cache(train)
        att.attribute(train, test)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_failed_call_on_another_device_moves_the_model_back():
    model, loss, _, loader = _case()
    before = _state(model)
    bad = dict(before, **{"fc2.weight": torch.zeros(3, 6)})
    task = AttributionTask(loss, model, [before, bad])
    with pytest.raises(CheckpointError):
        TracInAttributor(task, [1.0, 1.0], False, device="cuda").attribute(loader, loader)
    assert all(t.device.type == "cpu" for t in model.state_dict().values())
    assert _same(model, before)


def test_arnoldi_says_when_it_finds_fewer_eigenpairs_than_asked():
    """A Hessian with one eigenvalue of multiplicity 3 (c * I): the Krylov space of one
    start vector closes after one step; the attributor warns instead of using 1 of
    the 3 pairs silently."""
    from dattri.algorithm import IFAttributorArnoldi

    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    x = torch.eye(3).repeat(4, 1)  # X^T X = 4 I: the Hessian of the mean loss is I / 3
    y = torch.randn(12, 1)

    def loss(params, data):
        out = torch.func.functional_call(model, params, (data[0],))
        return 0.5 * ((out - data[1]) ** 2).mean()

    train = DataLoader(TensorDataset(x, y), batch_size=4)
    att = IFAttributorArnoldi(AttributionTask(loss, model, model.state_dict()), proj_dim=3,
                              max_iter=3, regularization=0.1)
    with pytest.warns(UserWarning, match=r"closed after 1 steps, so 1 of the 3 eigenpairs"):
        att.cache(train)


def test_rps_names_the_loader_and_batch_a_model_cannot_take():
    from dattri.algorithm import RPSAttributor
    from dattri.errors import InvalidBatchError

    model, _, _, loader = _case()
    task = AttributionTask(lambda pre, t: nn.functional.cross_entropy(pre, t), model,
                           model.state_dict())
    att = RPSAttributor(task, "fc2").cache(loader)
    wrong = DataLoader(TensorDataset(torch.randn(4, 5), torch.randint(0, 3, (4,))), batch_size=2)
    with pytest.raises(InvalidBatchError, match="test_loader batch 0 does not fit the model"):
        att.attribute(loader, wrong)
