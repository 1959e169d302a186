"""Tests of the CIFAR-2 / CIFAR-10 setting: pickle reader, stand-in, ResNet-9."""

from __future__ import annotations

import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dattri.benchmark.datasets import _io
from dattri.benchmark.datasets.cifar import (
    StandInDataWarning,
    create_cifar2_dataset,
    create_cifar10_dataset,
    create_cifar_dataset,
    create_resnet9_model,
    loss_cifar_resnet9,
    train_cifar2_resnet9,
    train_cifar_resnet9,
)
from dattri.benchmark.datasets.cifar import data as cifar_data
from dattri.benchmark.utils import SubsetSampler, cross_entropy_loss_func
from dattri.errors import DattriRuntimeError, DattriValueError

_HAS_FASHION = cifar_data.FASHION_MNIST_DIR.is_dir()
needs_fashion = pytest.mark.skipif(
    not _HAS_FASHION, reason="stand-in needs `apt-get install -y dataset-fashion-mnist`",
)
_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
          b"dog", b"frog", b"horse", b"ship", b"truck"]


def _write_batches(root, per_batch=4, n_test=6):
    """The original python layout: pickled dicts with bytes keys (protocol 2)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    labels_cycle = [3, 5, 0, 3, 9, 5, 1]
    out = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [labels_cycle[(b + j) % len(labels_cycle)] for j in range(n)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img{j}.png".encode() for j in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        out[name] = (data, labels)
    meta = {b"label_names": _NAMES, b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, out


def _expected_images(data):
    """Independent decoding: value (c, h, w) is byte c*1024 + h*32 + w of a row."""
    n = len(data)
    x = np.zeros((n, 3, 32, 32))
    for c in range(3):
        for h in range(32):
            x[:, c, h, :] = data[:, c * 1024 + h * 32 : c * 1024 + h * 32 + 32]
    return (torch.from_numpy(x) / 255.0 - 0.5) / 0.5


def _train_arrays(out):
    data = np.concatenate([out[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((out[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    return data, labels


@pytest.mark.parametrize("where", ["batches_folder", "parent_folder", "tar_gz"])
def test_cifar10_reader_exact(tmp_path, where):
    folder, out = _write_batches(tmp_path / "src")
    path = {"batches_folder": folder, "parent_folder": tmp_path / "src"}.get(where)
    if where == "tar_gz":
        path = tmp_path / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname="cifar-10-batches-py")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real data: no stand-in warning
        train, test = create_cifar10_dataset(path=path)
    assert create_cifar_dataset is create_cifar10_dataset
    data, labels = _train_arrays(out)
    for ds, (d, lab) in ((train, (data, labels)), (test, out["test_batch"])):
        assert len(ds) == len(lab)
        assert ds.targets.tolist() == list(lab)
        assert tuple(ds.data.shape) == (len(lab), 32, 32, 3) and ds.data.dtype == torch.uint8
        x, y = next(iter(DataLoader(ds, batch_size=len(ds))))
        assert x.shape == (len(lab), 3, 32, 32) and y.dtype == torch.int64
        torch.testing.assert_close(x.double(), _expected_images(d), rtol=0, atol=1e-6)
        assert ds.classes[3] == "cat" and "CC BY 4.0" in ds.licence
        assert "CIFAR-10 python batches" in ds.source


def test_cifar2_keeps_cat_and_dog_relabelled_in_order(tmp_path):
    folder, out = _write_batches(tmp_path)
    train, test = create_cifar2_dataset(path=folder)
    data, labels = _train_arrays(out)
    for ds, (d, lab) in ((train, (data, labels)), (test, out["test_batch"])):
        keep = [i for i, v in enumerate(lab) if v in (3, 5)]
        assert ds.targets.tolist() == [int(lab[i] == 5) for i in keep]
        x, _ = ds.materialize()
        torch.testing.assert_close(x.double(), _expected_images(d[keep]), rtol=0, atol=1e-6)
        assert ds.classes == ["cat", "dog"]


def test_cifar_reader_errors(tmp_path):
    folder, _ = _write_batches(tmp_path / "a")
    with pytest.raises(DattriValueError, match="does not exist"):
        create_cifar10_dataset(path=tmp_path / "missing")
    with pytest.raises(DattriValueError, match="no CIFAR-10 data"):
        create_cifar10_dataset(path=tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DattriValueError, match="lacks 'data_batch_3'"):
        create_cifar10_dataset(path=folder)
    # a pickle that would run code is refused, not executed
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": os.system}))
    with pytest.raises(DattriValueError, match="refusing to unpickle"):
        create_cifar10_dataset(path=folder)
    (folder / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
    )
    with pytest.raises(DattriValueError, match=r"expected \(N, 3072\)"):
        create_cifar10_dataset(path=folder)


@needs_fashion
def test_standin_is_announced_and_padded_fashion_mnist():
    with pytest.warns(StandInDataWarning, match="STAND-IN for CIFAR-2"):
        train, test = create_cifar2_dataset()
    assert "STAND-IN" in train.source and "MIT" in train.licence
    assert (len(train), len(test)) == (12000, 2000)
    assert train.targets.bincount().tolist() == [6000, 6000]
    assert train.classes == ["T-shirt/top", "Shirt"]
    fashion, flabels = _io.read_idx_split([cifar_data.FASHION_MNIST_DIR], "train")
    keep = np.flatnonzero((flabels == 0) | (flabels == 6))[:50]
    x, y = train.materialize(range(50))
    assert y.tolist() == (flabels[keep] == 6).astype(int).tolist()
    centre = (torch.from_numpy(fashion[keep]).double() / 255 - 0.5) / 0.5
    for c in range(3):
        torch.testing.assert_close(x[:, c, 2:30, 2:30].double(), centre, rtol=0, atol=1e-6)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, :, border] == -1.0)


@needs_fashion
def test_cifar10_standin_sizes():
    with pytest.warns(StandInDataWarning, match="STAND-IN for CIFAR-10"):
        train, test = create_cifar10_dataset()
    assert (len(train), len(test)) == (60000, 10000)
    assert train.targets.bincount().tolist() == [6000] * 10
    assert train[59999][0].shape == (3, 32, 32)


def test_missing_standin_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(cifar_data, "FASHION_MNIST_DIR", tmp_path / "none")
    with pytest.raises(DattriRuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        create_cifar2_dataset()


# ---------------------------------------------------------------- ResNet-9


def _conv_bn(c_in, c_out, k=3):
    return c_in * c_out * k * k + 2 * c_out  # bias-free conv + BN affine


@pytest.mark.parametrize("num_classes", [2, 10])
def test_resnet9_parameter_counts(num_classes):
    def block(c_in, c_out):  # two 3x3 conv-BN + 1x1 projection shortcut
        return _conv_bn(c_in, c_out) + _conv_bn(c_out, c_out) + _conv_bn(c_in, c_out, k=1)

    head = 512 * num_classes + num_classes
    dattri = _conv_bn(3, 64) + block(64, 128) + block(128, 256) + block(256, 512) + head
    page = (_conv_bn(3, 64) + _conv_bn(64, 128) + 2 * _conv_bn(128, 128)
            + _conv_bn(128, 256) + _conv_bn(256, 512) + 2 * _conv_bn(512, 512) + head)
    m = create_resnet9_model(num_classes)
    assert sum(p.numel() for p in m.parameters()) == dattri
    assert round(dattri / 1e6, 2) == 4.83  # the paper: "roughly 4.83M"
    p = create_resnet9_model(num_classes, variant="page")
    assert sum(q.numel() for q in p.parameters()) == page
    x = torch.randn(2, 3, 8, 8)  # small images keep the test fast; 32x32 in use
    assert m(x).shape == p(x).shape == (2, num_classes)
    keys = m.state_dict().keys()
    assert {"conv1.weight", "layer1.0.shortcut.0.weight", "layer3.0.bn2.running_var",
            "linear.weight"} <= set(keys)


def test_resnet9_dropout_after_every_conv_block_and_eval_mode():
    m = create_resnet9_model(2, dropout_rate=0.1)
    convs = sum(isinstance(x, nn.Conv2d) for x in m.modules())
    drops = [x for x in m.modules() if isinstance(x, nn.Dropout)]
    assert len(drops) == convs == 10 and all(d.p == 0.1 for d in drops)
    m0 = create_resnet9_model(2, dropout_rate=0.0)
    m0.load_state_dict(m.state_dict())
    x = torch.randn(3, 3, 4, 4)
    m.eval(), m0.eval()
    torch.testing.assert_close(m(x), m0(x))  # dropout is off in eval mode


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"num_classes": 0}, "num_classes"), ({"dropout_rate": 1.0}, "dropout_rate"),
     ({"variant": "resnet18"}, "variant")],
)
def test_resnet9_errors(kwargs, match):
    with pytest.raises(DattriValueError, match=match):
        create_resnet9_model(**kwargs)


def test_resnet9_eval_mode_per_example_grads_under_vmap_float64():
    torch.manual_seed(0)
    model = create_resnet9_model(2).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = cross_entropy_loss_func(model)
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])  # 4x4: fast, same graph
    grads = torch.func.vmap(
        torch.func.grad(lambda p, xi, yi: loss(p, (xi[None], yi[None]))),
        in_dims=(None, 0, 0),
    )(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1].double()), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-9, atol=1e-12)


def test_train_and_loss_smoke(tmp_path):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(8, 3, 4, 4, generator=g), torch.tensor([0, 1] * 4))
    loader = DataLoader(ds, batch_size=4)
    init = train_cifar2_resnet9(loader, epoch_num=0)
    alias = train_cifar_resnet9(loader, num_epochs=0)
    model = train_cifar2_resnet9(loader, epoch_num=1)
    assert not model.training
    assert torch.equal(init.conv1.weight, alias.conv1.weight)
    assert not torch.equal(init.conv1.weight, model.conv1.weight)
    with pytest.raises(DattriValueError, match="pass only one of them"):
        train_cifar_resnet9(loader, epoch_num=3, num_epochs=1)
    torch.save(model.state_dict(), tmp_path / "r.pt")
    losses = loss_cifar_resnet9(tmp_path / "r.pt", loader)  # num_classes read from it
    ref = F.cross_entropy(model(ds.tensors[0]), ds.tensors[1], reduction="none").detach()
    torch.testing.assert_close(losses, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_fashion
def test_one_epoch_on_200_standin_examples_lowers_loss():
    with pytest.warns(StandInDataWarning):
        train, _ = create_cifar2_dataset()
    order = np.random.default_rng(0).permutation(len(train))[:200]
    loader = DataLoader(train, batch_size=16, sampler=SubsetSampler(order))
    before = loss_cifar_resnet9(train_cifar2_resnet9(loader, epoch_num=0), loader)
    after = loss_cifar_resnet9(train_cifar2_resnet9(loader, epoch_num=1), loader)
    assert after.mean() < before.mean()
