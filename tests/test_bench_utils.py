"""Tests of dattri.benchmark.utils: SubsetSampler, flip_label, training helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri._loader import check_loader
from dattri.benchmark.utils import (
    SubsetSampler,
    cross_entropy_loss_func,
    flip_label,
    load_model,
    per_example_loss,
    train_classifier,
)
from dattri.errors import DattriValueError, NonFiniteError

# ---------------------------------------------------------------- SubsetSampler


@pytest.mark.parametrize(
    "indices",
    [[7, 2, 9, 2, 0], range(3, 8), np.array([4, 1, 3]), torch.tensor([5, 0, 6])],
)
def test_subset_sampler_yields_indices_in_order(indices):
    sampler = SubsetSampler(indices)
    expected = [int(i) for i in indices]
    assert list(sampler) == expected
    assert list(sampler) == expected  # every epoch, same order
    assert len(sampler) == len(expected)
    assert all(type(i) is int for i in sampler)


def test_subset_sampler_loader_order_and_fixed_order_check():
    x = torch.arange(20.0).unsqueeze(1)
    ds = TensorDataset(x, torch.arange(20))
    order = [13, 2, 19, 7, 7, 0]
    loader = DataLoader(ds, batch_size=4, sampler=SubsetSampler(order))
    got = torch.cat([b[1] for b in loader]).tolist()
    assert got == order
    check_loader(loader)  # does not raise: the sampler does not shuffle


@pytest.mark.parametrize(
    ("bad", "match"),
    [([1, -2], "negative"), ([0.5, 1.0], "integers"), (np.zeros((2, 2), int), "1-D")],
)
def test_subset_sampler_rejects_bad_indices(bad, match):
    with pytest.raises(DattriValueError, match=match):
        SubsetSampler(bad)


# ---------------------------------------------------------------- flip_label


@pytest.mark.parametrize(("n", "p"), [(1000, 0.1), (200, 0.295), (7, 0.5), (50, 0.0), (30, 1.0)])
def test_flip_label_flips_exactly_round_pn_to_other_labels(n, p):
    label = torch.from_numpy(np.random.default_rng(1).integers(0, 10, n))
    noisy, idx = flip_label(label, label_space=range(10), p=p, seed=3)
    k = round(p * n)
    assert len(idx) == k == len(set(idx))
    assert idx == sorted(idx)
    changed = torch.nonzero(noisy != label).squeeze(1).tolist()
    assert changed == idx  # flipped exactly there, never to the same label
    assert noisy.min() >= 0 and noisy.max() <= 9


def test_flip_label_seeded_reproducibility_and_input_untouched():
    label = np.random.default_rng(0).integers(0, 5, 500)
    before = label.copy()
    a, ia = flip_label(label, p=0.2, seed=11)
    b, ib = flip_label(label, p=0.2, seed=11)
    c, ic = flip_label(label, p=0.2, seed=12)
    np.testing.assert_array_equal(label, before)
    np.testing.assert_array_equal(a, b)
    assert ia == ib
    assert ia != ic


def test_flip_label_keeps_container_type():
    base = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1]
    t = torch.tensor(base, dtype=torch.int32)
    out_t, _ = flip_label(t, p=0.5)
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.int32
    out_a, _ = flip_label(np.array(base, dtype=np.int16), p=0.5)
    assert isinstance(out_a, np.ndarray) and out_a.dtype == np.int16
    out_l, idx = flip_label(base, p=0.5)
    assert isinstance(out_l, list) and all(type(v) is int for v in out_l)
    assert sorted(i for i in range(10) if out_l[i] != base[i]) == idx


def test_flip_label_default_space_is_observed_labels_and_draw_is_uniform():
    # all labels 0, space {0, 3, 5, 8}: new labels uniform over {3, 5, 8}
    label = torch.zeros(30000, dtype=torch.int64)
    noisy, idx = flip_label(label, label_space=[8, 0, 5, 3], p=1.0, seed=0)
    assert len(idx) == 30000
    counts = torch.bincount(noisy, minlength=9)
    assert counts[0] == 0 and counts[[1, 2, 4, 6, 7]].sum() == 0
    freq = counts[[3, 5, 8]].double() / 30000
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015)
    # label_space=None: the observed labels {2, 7}; a flip swaps them
    two = torch.tensor([2, 7] * 50)
    flipped, idx2 = flip_label(two, p=0.3, seed=1)
    assert torch.equal(flipped[idx2], 9 - two[idx2])


def test_flip_label_label_outside_space_goes_into_space():
    noisy, idx = flip_label(np.full(3000, 9), label_space=[0, 1, 2], p=1.0, seed=0)
    assert set(np.unique(noisy)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"label": [0, 1, 0], "p": 1.5}, "p: the flip fraction"),
        ({"label": [0, 1, 0], "p": -0.1}, "p: the flip fraction"),
        ({"label": [3, 3, 3], "p": 0.5}, "label_space: flipping needs at least two"),
        ({"label": [[0, 1]], "p": 0.5}, "label: expected a 1-D"),
        ({"label": [0.5, 1.0], "p": 0.5}, "label: expected a 1-D"),
        ({"label": [0, 1], "label_space": [0.5, 1.5]}, "label_space: expected a 1-D"),
    ],
)
def test_flip_label_errors(kwargs, match):
    with pytest.raises(DattriValueError, match=match):
        flip_label(**kwargs)


# ---------------------------------------------------------------- training helpers


def _toy(n=48, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, :k].argmax(1)).long()
    return TensorDataset(x, y)


def _make_linear():
    return nn.Linear(6, 3)


def test_cross_entropy_loss_func_float64_matches_reference_and_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    x, y = _toy(8).tensors
    loss = cross_entropy_loss_func(model)
    ref = F.cross_entropy(
        torch.tanh(x.double() @ params["0.weight"].T + params["0.bias"]) @ params["2.weight"].T
        + params["2.bias"], y,
    )
    got = loss(params, (x, y))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # per-example gradients through vmap on batches of one == a Python loop
    per = torch.func.vmap(
        torch.func.grad(lambda p, xi, yi: loss(p, (xi.unsqueeze(0), yi.unsqueeze(0)))),
        in_dims=(None, 0, 0),
    )(params, x, y)
    for i in range(len(y)):
        gi = torch.func.grad(loss)(params, (x[i : i + 1], y[i : i + 1]))
        for name in params:
            torch.testing.assert_close(per[name][i], gi[name], rtol=1e-10, atol=1e-12)


def test_per_example_loss_and_load_model(tmp_path):
    torch.manual_seed(0)
    model = _make_linear()
    ds = _toy(10)
    loader = DataLoader(ds, batch_size=4)
    x, y = ds.tensors
    ref = F.cross_entropy(model(x), y, reduction="none").detach()
    torch.testing.assert_close(per_example_loss(model, loader), ref)
    ckpt = tmp_path / "m.pt"
    torch.save(model.state_dict(), ckpt)
    for source in (ckpt, str(ckpt), model.state_dict(), model):
        net = load_model(source, _make_linear)
        torch.testing.assert_close(per_example_loss(net, loader), ref)


def test_train_classifier_lowers_loss_reproducible_and_rng_untouched():
    ds = _toy(96)
    loader = DataLoader(ds, batch_size=16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    init = train_classifier(_make_linear, loader, epoch_num=0, seed=5)
    a = train_classifier(_make_linear, loader, epoch_num=3, seed=5)
    b = train_classifier(_make_linear, loader, epoch_num=3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # epoch_num=0 is the seeded initialisation itself
    torch.manual_seed(5)
    fresh = _make_linear()
    assert torch.equal(fresh.weight, init.weight)
    assert per_example_loss(a, loader).mean() < per_example_loss(init, loader).mean() - 0.1


def test_train_classifier_errors():
    loader = DataLoader(_toy(8), batch_size=4)
    for bad in (-1, 1.5, True):
        with pytest.raises(DattriValueError, match="epoch_num: expected an integer"):
            train_classifier(_make_linear, loader, epoch_num=bad)
    x = torch.full((8, 6), float("nan"))
    nan_loader = DataLoader(TensorDataset(x, torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(NonFiniteError, match="not finite at epoch 0"):
        train_classifier(_make_linear, nan_loader, epoch_num=1)
