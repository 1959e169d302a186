"""A feature store or cached rows are reused only for the data, loss and model they
were computed from: the loader fingerprint hashes every example (not the first
ones), and a store written before must reproduce the caller's features of the
loader's first examples (another loss, target function or model code with the same
weights is refused)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri._loader import loader_fingerprint
from dattri.algorithm import IFAttributorArnoldi, LoGraAttributor, TRAKAttributor, TracInAttributor
from dattri.errors import StoreError
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")


class _MLP(nn.Module):
    def __init__(self, act=torch.tanh):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(4, 5), nn.Linear(5, 3), act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _case():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    flipped = y.clone()
    flipped[-3:] = (flipped[-3:] + 1) % 3  # a noisy-label study: the last labels differ
    torch.manual_seed(0)
    model = _MLP()

    def loss(params, data, l2=0.0):
        out = torch.func.functional_call(model, params, (data[0],))
        return nn.functional.cross_entropy(out, data[1]) + l2 * sum((p * p).sum() for p in params.values())

    loaders = {k: DataLoader(TensorDataset(x, t), batch_size=5) for k, t in (("clean", y), ("noisy", flipped))}
    test = DataLoader(TensorDataset(x[:6], y[:6]), batch_size=3)
    return model, loss, loaders, test


def test_the_fingerprint_sees_every_example_and_not_the_batch_size():
    _, _, loaders, _ = _case()
    clean, noisy = loaders["clean"], loaders["noisy"]
    same = DataLoader(clean.dataset, batch_size=7)
    assert loader_fingerprint(clean) == loader_fingerprint(same)
    assert loader_fingerprint(clean) != loader_fingerprint(noisy)
    assert loader_fingerprint(clean).n == 20


def test_a_store_is_not_reused_for_other_labels_or_another_loss(tmp_path):
    model, loss, loaders, test = _case()
    task = AttributionTask(loss, model, model.state_dict())
    TracInAttributor(task, [1.0], False, offload="disk", cache_dir=tmp_path / "a").cache(loaders["clean"])
    with pytest.raises(StoreError, match="another training loader"):
        TracInAttributor(task, [1.0], False, offload="disk",
                         cache_dir=tmp_path / "a").cache(loaders["noisy"])
    # the same weights and settings, another loss: the store's first rows differ
    other = AttributionTask(lambda p, d: loss(p, d, l2=0.5), model, model.state_dict())
    with pytest.raises(StoreError, match="another loss, target function or model code"):
        TracInAttributor(other, [1.0], False, offload="disk",
                         cache_dir=tmp_path / "a").cache(loaders["clean"])
    # and the same task again resumes from the store
    again = TracInAttributor(task, [1.0], False, offload="disk", cache_dir=tmp_path / "a")
    fresh = TracInAttributor(task, [1.0], False)
    torch.testing.assert_close(again.cache(loaders["clean"]).attribute(loaders["clean"], test),
                               fresh.attribute(loaders["clean"], test))


def test_a_trak_store_is_not_reused_with_another_output_function(tmp_path):
    model, loss, loaders, _ = _case()
    task = AttributionTask(loss, model, model.state_dict())

    def prob(params, data, t=1.0):
        out = torch.func.functional_call(model, params, (data[0],)) / t
        return torch.softmax(out, -1).gather(1, data[1][:, None]).squeeze(1)

    kw = {"proj_params": {"proj_type": "identity"}, "offload": "disk", "cache_dir": tmp_path}
    TRAKAttributor(task, prob, **kw).cache(loaders["clean"])
    with pytest.raises(StoreError, match="another loss, target function or model code"):
        TRAKAttributor(task, lambda p, d: prob(p, d, t=3.0), **kw).cache(loaders["clean"])
    torch.manual_seed(0)
    relu = _MLP(act=torch.relu)
    relu.load_state_dict(model.state_dict())  # the same weights, other model code
    task2 = AttributionTask(lambda p, d: nn.functional.cross_entropy(
        torch.func.functional_call(relu, p, (d[0],)), d[1]), relu, relu.state_dict())
    with pytest.raises(StoreError, match="another loss, target function or model code"):
        TRAKAttributor(task2, lambda p, d: torch.softmax(torch.func.functional_call(relu, p, (d[0],)), -1)
                       .gather(1, d[1][:, None]).squeeze(1), **kw).cache(loaders["clean"])


@pytest.mark.parametrize("method", ["tracin-cpu", "arnoldi", "logra"])
def test_kept_rows_are_not_used_for_a_loader_that_differs_in_later_examples(method):
    """TracIn (rows kept in host memory), Arnoldi and LoGra score the train loader
    they are given: a loader equal to the cached one but for its last labels is
    featurized, not answered with the cached rows."""
    model, loss, loaders, test = _case()
    task = AttributionTask(loss, model, model.state_dict())
    make = {"tracin-cpu": lambda: TracInAttributor(task, [1.0], False, offload="cpu"),
            "arnoldi": lambda: IFAttributorArnoldi(task, proj_dim=6, max_iter=20, regularization=0.1),
            "logra": lambda: LoGraAttributor(task, damping=0.1)}[method]
    got = make().cache(loaders["clean"]).attribute(loaders["noisy"], test)
    want = make().cache(loaders["clean"])
    want._train_fingerprint = None  # no cached rows to reuse: the loader is featurized
    want = want.attribute(loaders["noisy"], test)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert (got - make().cache(loaders["clean"]).attribute(loaders["clean"], test)).abs().max() > 1e-3
