"""Losses that couple the examples of some batches only: every batch of the batched
paths is probed on one example (its output and output gradient at the layer nearest
the loss, against the example alone), so a coupling that the check of the first
examples cannot see (a mean over unpadded tokens once padding appears, class weights
normalised over a batch of mixed labels) still gives the per-example definition: the
gradient of the loss on a batch of one."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri._convention import capture_per_example
from dattri.algorithm import TracInAttributor
from dattri.algorithm._hooks import LinearCapture
from dattri.task import AttributionTask

pytestmark = pytest.mark.usefixtures("float64")

COUPLED = "couples the examples"


def _per_example(model, loss, batches):
    """``(n, P)``: autograd of ``loss`` on each example alone (a batch of one)."""
    rows = []
    for batch in batches:
        for i in range(batch[0].shape[0]):
            one = tuple(t[i:i + 1] for t in batch)
            p = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
            g = torch.autograd.grad(loss(p, one), list(p.values()))
            rows.append(torch.cat([t.reshape(-1) for t in g]))
    return torch.stack(rows)


class _TokenModel(nn.Module):
    def __init__(self, vocab=7, dim=4, classes=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Conv1d(dim, dim, 1)
        self.head = nn.Linear(dim, classes)

    def forward(self, tok):
        h = self.mix(self.emb(tok).transpose(1, 2)).transpose(1, 2)
        return self.head(torch.tanh(h))


def _token_case():
    """Sequences of 6 tokens, 0 = padding; the first batch (8) has none, the others
    pad every example differently."""
    g = torch.Generator().manual_seed(0)
    tok = torch.randint(1, 7, (20, 6), generator=g)
    for i in range(8, 20):
        tok[i, 6 - (i % 5):] = 0
    tok[8:, 0] = torch.randint(1, 7, (12,), generator=g)  # never all padding
    y = torch.randint(0, 5, (20, 6), generator=g)
    torch.manual_seed(0)
    model = _TokenModel().eval()

    def loss(params, data):  # the mean over the batch's unpadded tokens
        tok, y = data
        out = torch.func.functional_call(model, params, (tok,))
        ce = nn.functional.cross_entropy(out.reshape(-1, 5), y.reshape(-1), reduction="none")
        mask = (tok != 0).reshape(-1).to(ce.dtype)
        return (ce * mask).sum() / mask.sum()

    return model, loss, tok, y


def test_a_mean_over_unpadded_tokens_gives_each_example_its_own_gradient():
    model, loss, tok, y = _token_case()
    train = DataLoader(TensorDataset(tok[:16], y[:16]), batch_size=8)
    test = DataLoader(TensorDataset(tok[16:], y[16:]), batch_size=4)
    att = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False)
    with pytest.warns(UserWarning, match=COUPLED):
        got = att.attribute(train, test)
    want = _per_example(model, loss, train) @ _per_example(model, loss, test).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # the first batch alone is not coupled: its rows took the batched path
    assert att.train_features._batched_ok == {0: True}


class _MLP(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _weighted_case():
    """Training data sorted by class (the first batch has one label), cross-entropy
    with class weights: normalised by the batch's total weight."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g), torch.arange(24) % 3
    order = torch.argsort(y, stable=True)
    x, y = x[order], y[order]
    torch.manual_seed(1)
    model = _MLP().eval()
    w = torch.tensor([1.0, 3.0, 0.5])

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y,
                                           weight=w)
    return model, loss, x, y


@pytest.mark.parametrize("fast_path", [True, False])
def test_class_weights_of_mixed_batches_give_each_example_its_own_gradient(fast_path):
    model, loss, x, y = _weighted_case()
    train = DataLoader(TensorDataset(x[:18], y[:18]), batch_size=6)  # the first: label 0 only
    test = DataLoader(TensorDataset(x[18:], y[18:]), batch_size=6)  # labels 2, 2, ... mixed below
    test = [(x[[0, 9, 18, 1, 10, 19]], y[[0, 9, 18, 1, 10, 19]])]
    att = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False,
                           fast_path=fast_path)
    with pytest.warns(UserWarning, match=COUPLED):
        got = att.attribute(train, test)
    want = _per_example(model, loss, train) @ _per_example(model, loss, test).T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_coupled_batch_is_captured_one_example_at_a_time():
    model, loss, x, y = _weighted_case()
    task = AttributionTask(loss, model, model.state_dict())
    cap = LinearCapture(task, ["fc1", "fc2"], torch.device("cpu"))
    mixed = (x[[0, 9, 18, 3]], y[[0, 9, 18, 3]])
    with pytest.warns(UserWarning, match=COUPLED):
        got = cap.run(mixed, 0)
    want = capture_per_example(lambda one: cap.run(one, 0), mixed)
    for name in ("fc1", "fc2"):
        for g, w in zip(got[name], want[name]):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    # the label weights cancel in a batch of one label: batched, and the same values
    same = (x[:4], y[:4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = cap.run(same, 0)
    want = capture_per_example(lambda one: cap.run(one, 0), same)
    torch.testing.assert_close(got["fc2"][1], want["fc2"][1], rtol=1e-12, atol=1e-14)


def test_the_probe_replays_the_dropout_masks_of_an_ensemble():
    """An active nn.Dropout (one mask per ensemble member, the same for every example)
    with a plain mean loss: every batch's probe agrees, nothing falls back, and the
    scores equal those of the per-example definition under the same masks."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 5, generator=g), torch.randint(0, 3, (20,), generator=g)
    torch.manual_seed(2)
    model = _MLP(dropout=0.5).train()
    model.fc1.eval(), model.fc2.eval()

    def loss(params, data):
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (data[0],)),
                                           data[1])

    train = DataLoader(TensorDataset(x[:15], y[:15]), batch_size=5)
    test = DataLoader(TensorDataset(x[15:], y[15:]), batch_size=5)
    task = AttributionTask(loss, model, model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = TracInAttributor(task, [1.0], False).attribute(train, test)
    slow = TracInAttributor(task, [1.0], False, fast_path=False)
    slow.train_features.use_batched = slow.test_features.use_batched = False
    torch.testing.assert_close(fast, slow.attribute(train, test), rtol=1e-10, atol=1e-12)


class _Pair(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x), torch.tanh(self.inner.fc1(x))


@pytest.mark.parametrize("case", ["tokens", "weighted-fast", "weighted-dense", "tuple-output"])
def test_the_probe_runs_the_loss_on_the_outputs_without_a_forward_pass(case, monkeypatch):
    """The probe of a model whose loss reads only the model's outputs replaces the
    model's forward by the example's rows of the batch's outputs (no forward pass of
    the model) and decides every batch there: the full probe (one example's forward
    pass, ``example_alone``) is for the other losses."""
    from dattri.algorithm import _batched, _hooks

    full, decided = [0], []
    alone, agrees = _batched.example_alone, _batched.head_agrees

    def counted(*a, **k):
        full[0] += 1
        return alone(*a, **k)

    def head(*a, **k):
        decided.append(agrees(*a, **k))
        return decided[-1]

    for mod in (_batched, _hooks):
        monkeypatch.setattr(mod, "example_alone", counted)
        monkeypatch.setattr(mod, "head_agrees", head)
    if case == "tokens":
        model, loss, x, y = _token_case()
        train, batches = DataLoader(TensorDataset(x[:16], y[:16]), batch_size=8), 2
    elif case == "tuple-output":  # (logits, hidden): the loss leaves the second unused
        model, _, x, y = _weighted_case()
        model = _Pair(model)
        w = torch.tensor([1.0, 3.0, 0.5])

        def loss(params, data):
            out = torch.func.functional_call(model, params, (data[0],))[0]
            return nn.functional.cross_entropy(out, data[1], weight=w)
        train, batches = DataLoader(TensorDataset(x[:18], y[:18]), batch_size=6), 3
    else:
        model, loss, x, y = _weighted_case()
        train, batches = DataLoader(TensorDataset(x[:18], y[:18]), batch_size=6), 3
    att = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False,
                           fast_path=case != "weighted-dense")
    with pytest.warns(UserWarning, match=COUPLED):
        got = att.self_attribute(train)
    assert full[0] == 0 and len(decided) >= batches and None not in decided
    assert False in decided  # the coupled batches were found there
    g = _per_example(model, loss, train)
    torch.testing.assert_close(got, (g * g).sum(1), rtol=1e-10, atol=1e-12)
