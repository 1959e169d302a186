"""CIFAR-10 / CIFAR-2 data for the ResNet-9 settings (paper, Table 3 and App. C).

CIFAR-10 (Krizhevsky 2009) is licensed CC BY 4.0 (as the paper states).
CIFAR-2 is its cat (label 3) vs dog (label 5) subset, relabelled 0 / 1. Images
are normalised per channel as in the published dattri settings:
``x = (pixel / 255 - 0.5) / 0.5``, shape ``(3, 32, 32)``.

Sources, in order:

1. ``path=``: the original python version, ``cifar-10-batches-py`` (pickled
   ``data_batch_1..5`` and ``test_batch``), the folder containing it, or the
   ``cifar-10-python.tar.gz`` archive.
2. ``path=None``: no package registry ships CIFAR, so an offline **stand-in** of
   real images is used and announced with a :class:`StandInDataWarning` and the
   dataset's ``.source``: Fashion-MNIST (Xiao, Rasul and Vollgraf 2017; MIT
   licence) from Debian's ``dataset-fashion-mnist``
   (``apt-get install -y dataset-fashion-mnist``), zero-padded from 28x28 to
   32x32 and repeated to 3 channels. The CIFAR-2 stand-in is the hard pair
   T-shirt/top (0) vs shirt (6), relabelled 0 / 1. Numbers obtained on the
   stand-in are not CIFAR numbers.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from dattri.benchmark.datasets._io import (
    ImageDataset,
    read_cifar10,
    read_idx_split,
    require,
)
from dattri.errors import DattriValueError

__all__ = [
    "CIFAR_LICENCE",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_LICENCE",
    "StandInDataWarning",
    "create_cifar10_dataset",
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "get_cifar2_indices_and_adjust_labels",
]

CIFAR_MEAN = (0.5, 0.5, 0.5)
CIFAR_STD = (0.5, 0.5, 0.5)
CIFAR_LICENCE = "CIFAR-10 (Krizhevsky 2009): CC BY 4.0"
FASHION_MNIST_LICENCE = "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): MIT"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_CIFAR2_PAIR = (3, 5)  # cat, dog
_STANDIN_PAIR = (0, 6)  # T-shirt/top, shirt
_FASHION_FIX = (
    "pass path= the cifar-10-batches-py folder (or cifar-10-python.tar.gz), or "
    "install the offline Fashion-MNIST stand-in with "
    "`apt-get install -y dataset-fashion-mnist`."
)


class StandInDataWarning(UserWarning):
    """The real data set is not available and a stand-in data set is used."""


def _split(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    classes: list[str],
    source: str,
    licence: str,
) -> ImageDataset:
    return ImageDataset(
        images, labels, CIFAR_MEAN, CIFAR_STD,
        classes=classes, source=source, licence=licence,
    )


def _pad_to_rgb32(images: np.ndarray) -> torch.Tensor:
    """``(N, 28, 28)`` uint8 -> ``(N, 32, 32, 3)``: 2 zero pixels a side, 3 equal channels.

    The channel axis is a broadcast view (stride 0), so it costs no memory.
    """
    padded = torch.from_numpy(np.pad(images, ((0, 0), (2, 2), (2, 2))))
    return padded.unsqueeze(-1).expand(-1, -1, -1, 3)


def _fashion_standin(what: str) -> tuple[ImageDataset, ImageDataset]:
    root = require(
        FASHION_MNIST_DIR if FASHION_MNIST_DIR.is_dir() else None, what, _FASHION_FIX,
    )
    source = (
        f"STAND-IN for {what}: Fashion-MNIST from {root}, padded to 32x32, 3 channels"
    )
    warnings.warn(
        f"{what} was not given (path=None): using the offline {source}. "
        f"Results are not {what} results; for the real data pass path= the "
        "cifar-10-batches-py folder (or cifar-10-python.tar.gz).",
        StandInDataWarning,
        stacklevel=3,
    )
    out = []
    for split in ("train", "t10k"):
        images, labels = read_idx_split([root], split, arg="FASHION_MNIST_DIR")
        out.append(_split(
            _pad_to_rgb32(images), labels, _FASHION_CLASSES, source, FASHION_MNIST_LICENCE,
        ))
    return out[0], out[1]


def _real_cifar10(path: str | os.PathLike) -> tuple[ImageDataset, ImageDataset]:
    root = Path(path).expanduser()
    if not root.exists():
        msg = f"path: {str(path)!r} does not exist; {_FASHION_FIX}"
        raise DattriValueError(msg)
    (xtr, ytr), (xte, yte), classes = read_cifar10(root)
    source = f"CIFAR-10 python batches at {root}"
    return (
        _split(xtr, ytr, classes, source, CIFAR_LICENCE),
        _split(xte, yte, classes, source, CIFAR_LICENCE),
    )


def create_cifar10_dataset(
    path: str | os.PathLike | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Create the CIFAR-10 training and test sets (50,000 / 10,000 images).

    Args:
        path: ``cifar-10-batches-py`` folder, a folder containing it, or
            ``cifar-10-python.tar.gz``. ``None`` uses the Fashion-MNIST stand-in
            (60,000 / 10,000 images, 10 classes) with a warning.

    Returns:
        ``(train, test)`` :class:`ImageDataset` objects yielding
        ``(x (3, 32, 32) float32, y int64)``; ``.data`` is ``(N, 32, 32, 3)``
        uint8, ``.source`` says which data it is. Licence: CIFAR-10 CC BY 4.0;
        the stand-in Fashion-MNIST MIT.

    Raises:
        DattriValueError: ``path`` holds no readable CIFAR-10 batches.
        DattriRuntimeError: ``path`` is ``None`` and the stand-in is not installed.
    """
    if path is None:
        return _fashion_standin("CIFAR-10")
    return _real_cifar10(path)


def _two_classes(ds: ImageDataset, pair: tuple[int, int]) -> ImageDataset:
    keep = torch.nonzero((ds.targets == pair[0]) | (ds.targets == pair[1])).squeeze(1)
    sub = ds.subset(keep)
    sub.targets = (sub.targets == pair[1]).to(torch.int64)
    sub.classes = [ds.classes[pair[0]], ds.classes[pair[1]]]
    return sub


def get_cifar2_indices_and_adjust_labels(dataset: object) -> list[int]:
    """Positions of the cat (3) and dog (5) images of a CIFAR-10 dataset, relabelled
    in place to 0 / 1 (the published helper; other labels are left as they are).

    Args:
        dataset: a CIFAR-10 dataset with a ``targets`` list or 1-d tensor (e.g.
            ``torchvision.datasets.CIFAR10`` or :func:`create_cifar10_dataset`'s).

    Returns:
        The positions, in order.

    Raises:
        DattriValueError: ``dataset`` has no 1-d ``targets`` (checked before any change).
    """
    targets = getattr(dataset, "targets", None)
    if targets is None or np.ndim(targets) != 1:
        msg = (f"dataset: expected a CIFAR-10 dataset with 1-d `targets`, got "
               f"{type(dataset).__name__} (targets {type(targets).__name__}).")
        raise DattriValueError(msg)
    cat, dog = _CIFAR2_PAIR
    indices = []
    for i in range(len(targets)):
        label = int(targets[i])
        if label in (cat, dog):
            indices.append(i)
            targets[i] = 0 if label == cat else 1
    return indices


def create_cifar2_dataset(
    path: str | os.PathLike | None = None,
) -> tuple[ImageDataset, ImageDataset]:
    """Create CIFAR-2: the cat (0) vs dog (1) images of CIFAR-10 (10,000 / 2,000).

    Args:
        path: as for :func:`create_cifar10_dataset`. ``None`` uses the stand-in
            pair T-shirt/top (0) vs shirt (1) of Fashion-MNIST (12,000 / 2,000
            images) with a warning.

    Returns:
        ``(train, test)`` :class:`ImageDataset` objects, original order kept.
        Licence: CIFAR-10 CC BY 4.0; the stand-in Fashion-MNIST MIT.

    Raises:
        DattriValueError: ``path`` holds no readable CIFAR-10 batches.
        DattriRuntimeError: ``path`` is ``None`` and the stand-in is not installed.
    """
    if path is None:
        train, test = _fashion_standin("CIFAR-2")
        pair = _STANDIN_PAIR
    else:
        train, test = _real_cifar10(path)
        pair = _CIFAR2_PAIR
    return _two_classes(train, pair), _two_classes(test, pair)


#: The published dattri name of :func:`create_cifar10_dataset`.
create_cifar_dataset = create_cifar10_dataset
