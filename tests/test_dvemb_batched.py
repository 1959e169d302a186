"""DVEmb's step gradients from one batched forward/backward (float64): the
embeddings and scores equal those of vmap(grad) on batches of one, the check
against autograd runs once per trajectory, and the gradients are those of each
step's own parameters."""

import copy

import pytest
import torch
from torch import nn

import dattri.algorithm.dvemb as dvemb_mod
from dattri.algorithm._batched import reference_grads
from dattri.algorithm.dvemb import DVEmbAttributor
from dattri.task import AttributionTask

N, STEPS = 24, [[0, 5, 9, 13, 2, 7], [1, 3, 22], [4, 6, 8, 10, 12], [11, 14, 15, 20],
                [16, 17, 18, 19, 21, 23], [0, 1, 2]]


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    xt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (6,), generator=g)
    return (x, y), (xt, yt)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _loss(model, couple=False):
    def loss(params, batch):
        x, y = batch
        out = torch.func.functional_call(model, params, (x,))
        if couple:  # the examples of a batch interact: not a per-example mean
            out = out - out.mean(0, keepdim=True)
        return nn.functional.cross_entropy(out, y)
    return loss


def _loaders(train, test):
    tr = [(train[0][i:i + 8], train[1][i:i + 8]) for i in range(0, N, 8)]
    te = [(test[0][i:i + 3], test[1][i:i + 3]) for i in range(0, 6, 3)]
    return tr, te


def _count_reference(monkeypatch):
    calls = [0]

    def counted(*a, **k):
        calls[0] += 1
        return reference_grads(*a, **k)

    monkeypatch.setattr(dvemb_mod, "reference_grads", counted)
    return calls


def _record(use_batched, proj, couple=False, replace_at=None):
    """Train the MLP by SGD over STEPS, recording every step; returns the
    attributor and each step's per-example gradients by autograd at the time."""
    train, _ = _data()
    model = _mlp()
    task = AttributionTask(loss_func=_loss(model, couple), model=model,
                           checkpoints=copy.deepcopy(model.state_dict()))
    att = DVEmbAttributor(task, proj_params=proj)
    att.use_batched = use_batched
    refs = []
    for t, idx in enumerate(STEPS):
        lr = 0.5 / (1 + t)
        batch = (train[0][idx], train[1][idx])
        att.cache_gradients(0 if t < 3 else 1, batch, idx, lr)
        params = {k: p.detach() for k, p in model.named_parameters()}
        refs.append(reference_grads(task.original_loss_func, batch, params,
                                              list(params), lambda: torch.random.fork_rng()))
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(task.original_loss_func(p, batch), list(p.values()))
        with torch.no_grad():  # the optimizer step, in place
            for prm, gr in zip(model.parameters(), gs):
                prm -= lr * gr
        if t == replace_at:  # a new parameter object (not an in-place update)
            model[2].weight = nn.Parameter(model[2].weight.detach() * 1.5)
    return att, refs


@pytest.mark.parametrize("proj", [None, {"proj_dim": 8, "proj_type": "normal", "proj_seed": 3}])
def test_recorded_trajectory_equals_vmap_path(proj, monkeypatch):
    calls = _count_reference(monkeypatch)
    new, refs = _record(True, proj, replace_at=2)
    assert calls[0] == 1  # verified once for the 6 steps, not per step
    (stepper,) = new._steppers.values()
    assert stepper.counts == {"batched": len(STEPS), "declined": 0}
    if proj is None:  # each step's gradients are those of its own parameters
        for (_, _, g), ref in zip(new._recorded[0] + new._recorded[1], refs):
            torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    old, _ = _record(False, proj, replace_at=2)
    assert not old._steppers
    _, te = _loaders(*_data())
    new.cache()
    old.cache()
    for e in (0, 1):
        torch.testing.assert_close(new._epoch_emb[e], old._epoch_emb[e], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(new.attribute(te), old.attribute(te), rtol=1e-8, atol=1e-12)


def test_stale_parameters_are_caught():
    """Gradients at step 0's parameters for every step differ from the trajectory's:
    the comparison above can fail."""
    att, refs = _record(True, None)
    train, _ = _data()
    model = _mlp()  # theta_0
    params = {k: p.detach() for k, p in model.named_parameters()}
    idx = STEPS[4]
    stale = reference_grads(_loss(model), (train[0][idx], train[1][idx]), params,
                                      list(params), lambda: torch.random.fork_rng())
    g4 = att._recorded[1][1][2]
    torch.testing.assert_close(g4, refs[4], rtol=1e-10, atol=1e-12)
    assert (g4 - stale).norm() > 1e-3 * stale.norm()


def _trajectory(model, loss, train):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    ckpts, steps = [], []
    for t, idx in enumerate(STEPS):
        lr = 0.4 / (1 + t)
        ckpts.append({k: v.clone() for k, v in params.items()})
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        gs = torch.autograd.grad(loss(p, (train[0][idx], train[1][idx])), list(p.values()))
        params = {k: (v - lr * g).detach() for (k, v), g in zip(params.items(), gs)}
        steps.append((idx, lr))
    ckpts.append(params)
    return ckpts, steps


@pytest.mark.parametrize("proj", [None, {"proj_dim": 8, "proj_type": "normal"}])
def test_steps_trajectory_equals_featurizer_path(proj, monkeypatch):
    train, test = _data()
    tr, te = _loaders(train, test)
    model = _mlp()
    loss = _loss(model)
    ckpts, steps = _trajectory(model, loss, train)
    out = {}
    for use in (True, False):
        task = AttributionTask(loss_func=loss, model=model, checkpoints=ckpts)
        att = DVEmbAttributor(task, steps, proj_params=proj)
        att.use_batched = use
        calls = _count_reference(monkeypatch)
        att.cache(tr)
        if use:
            assert calls[0] == 1
            (stepper,) = att._steppers.values()
            assert stepper.counts == {"batched": len(STEPS), "declined": 0}
        out[use] = (att.embeddings(), att.attribute(tr, te), att.self_attribute(tr))
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    # stale parameters (theta_0 for every step) would change the embeddings
    task0 = AttributionTask(loss_func=loss, model=model, checkpoints=[ckpts[0]] * len(ckpts))
    frozen = DVEmbAttributor(task0, steps, proj_params=proj).cache(tr).embeddings()
    assert (frozen - out[True][0]).norm() > 1e-3 * out[True][0].norm()


def test_declined_batched_path_still_works():
    """A loss coupling a batch's examples fails the check once: every step falls
    back to vmap(grad), with the old path's values."""
    with pytest.warns(UserWarning, match="differ from autograd"):
        new, _ = _record(True, None, couple=True)
    (stepper,) = new._steppers.values()
    assert stepper.counts == {"batched": 0, "declined": len(STEPS)}
    old, _ = _record(False, None, couple=True)
    for (_, _, a), (_, _, b) in zip(new._recorded[0] + new._recorded[1],
                                    old._recorded[0] + old._recorded[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_active_dropout_keeps_per_example_masks():
    train, _ = _data()
    model = nn.Sequential(nn.Linear(5, 7), nn.Dropout(0.5), nn.Linear(7, 3)).double()
    task = AttributionTask(loss_func=_loss(model), model=model, checkpoints=model.state_dict())
    batch = (train[0][:6], train[1][:6])
    got = {}
    for use in (True, False):
        att = DVEmbAttributor(task)
        att.use_batched = use
        att._live_grads(batch)  # the loss's convention is detected on a first call
        torch.manual_seed(5)
        got[use] = att._live_grads(batch)
        assert not att._steppers  # declined before any batched run
    torch.testing.assert_close(got[True], got[False], rtol=0, atol=0)
    rows = got[True][:, :35].reshape(6, 7, 5).abs().sum(2)  # first layer: masks differ per example
    assert not all(torch.equal(rows[0] > 0, r > 0) for r in rows[1:])


def test_steps_with_a_refuted_check_use_vmap_without_rechecking(monkeypatch):
    """With steps: a failed check is not repeated at every checkpoint (one reference
    run in all) and the embeddings are those of vmap(grad)."""
    train, test = _data()
    tr, _ = _loaders(train, test)
    model = _mlp()
    loss = _loss(model, couple=True)
    ckpts, steps = _trajectory(model, loss, train)
    out = {}
    for use in (True, False):
        att = DVEmbAttributor(AttributionTask(loss_func=loss, model=model, checkpoints=ckpts),
                              steps)
        att.use_batched = use
        calls = _count_reference(monkeypatch)
        with pytest.warns(UserWarning, match="differ from autograd"):
            att.cache(tr)
        if use:
            # no reference run at all: the batched run's own probe of one example
            # (BatchedGrads._probe) refutes the check first
            assert calls[0] == 0
            (stepper,) = att._steppers.values()
            assert stepper.counts == {"batched": 0, "declined": len(STEPS)}
        out[use] = att.embeddings()
    torch.testing.assert_close(out[True], out[False], rtol=1e-8, atol=1e-12)
