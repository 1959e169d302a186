"""Character-level TinyStories blocks (see the package docstring)."""

from __future__ import annotations

import os
from pathlib import Path

from dattri.benchmark.datasets.shakespeare_char.data import CharBlockDataset, char_block_datasets
from dattri.errors import DattriRuntimeError

__all__ = ["TINYSTORIES_FILE", "TinyStoriesNotFoundError", "create_tinystories_dataset",
           "find_tinystories_file"]

#: the file name of the published configuration's data
TINYSTORIES_FILE = "TinyStoriesV2-GPT4-train.txt"
TINYSTORIES_LICENCE = "TinyStories (Eldan & Li 2023), CDLA-Sharing-1.0"


class TinyStoriesNotFoundError(DattriRuntimeError, FileNotFoundError):
    """The TinyStories text is not on disk (no package ships it; nothing downloads)."""


def _default_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("DATTRI_DATA"):
        dirs.append(Path(os.environ["DATTRI_DATA"]).expanduser() / "tinystories")
    dirs.append(Path("~/.cache/dattri/data/tinystories").expanduser())
    return dirs


def find_tinystories_file(path: str | os.PathLike | None = None) -> Path:
    """The TinyStories text file: ``path`` (a file, or a folder holding
    ``TinyStoriesV2-GPT4-train.txt``), else the default folders.

    Raises:
        TinyStoriesNotFoundError: no such file; the message lists where it was
            looked for and where to put it.
    """
    if path is not None:
        p = Path(path).expanduser()
        candidates = [p / TINYSTORIES_FILE] if p.is_dir() else [p]
    else:
        candidates = [d / TINYSTORIES_FILE for d in _default_dirs()]
    for c in candidates:
        if c.is_file():
            return c
    where = ", ".join(repr(str(c)) for c in candidates)
    msg = (f"path: TinyStories is not on disk (looked for {where}). No package ships it "
           f"and dattri downloads nothing: get {TINYSTORIES_FILE} from the TinyStories "
           f"release (huggingface.co/datasets/roneneldan/TinyStories) and put it in "
           f"{str(_default_dirs()[-1])!r} (or $DATTRI_DATA/tinystories/), or pass path= the file.")
    raise TinyStoriesNotFoundError(msg)


def create_tinystories_dataset(
    path: str | os.PathLike | None = None,
    block_size: int = 256,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
    train_fraction: float = 0.9,
    seed: int = 0,
) -> tuple[CharBlockDataset, CharBlockDataset]:
    """Character blocks of TinyStories, split as nanoGPT's ``prepare`` does.

    The vocabulary is every character of the text; the first ``int(0.9 n)``
    characters train, the rest test; example ``i`` of a split is ``x = c[i bs : (i+1)
    bs]``, ``y = c[i bs + 1 : (i+1) bs + 1]`` (the published configuration:
    ``block_size=256``).

    Args:
        path: the text file or its folder (``None``: the default folders).
        block_size: characters per example.
        n_train, n_test: examples sampled (seeded, in text order); ``None``: all.
        train_fraction: leading fraction of the text used for training.
        seed: seed of the sampling.

    Returns:
        ``(train, test)`` :class:`CharBlockDataset` (``train.vocab`` decodes).

    Raises:
        TinyStoriesNotFoundError: the file is not there (see
            :func:`find_tinystories_file`).
        DattriValueError: bad sizes, or a text shorter than one block.
    """
    file = find_tinystories_file(path)
    text = file.read_text(encoding="utf-8")
    return char_block_datasets(text, f"text file {file}", TINYSTORIES_LICENCE, block_size,
                               n_train, n_test, train_fraction, seed)
