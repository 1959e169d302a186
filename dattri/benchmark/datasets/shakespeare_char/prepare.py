"""Write a character-level text as nanoGPT's ``train.bin`` / ``val.bin`` (``uint16``
ids, first 90% / rest) and ``meta.pkl`` (``{"vocab_size", "itos", "stoi"}``), the
files of the published ``prepare.py``.

``python -m dattri.benchmark.datasets.shakespeare_char.prepare [--data_file
input.txt] --out_dir DIR``: without ``--data_file`` the text is the offline
Shakespeare stand-in (the published script downloaded Tiny Shakespeare, which
cannot be reached here). Importing this module runs nothing.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dattri.benchmark.datasets.shakespeare_char.data import CharVocab, load_shakespeare_text

__all__ = ["main", "prepare", "prepare_cli", "write_char_bins"]


def write_char_bins(text: str, out_dir: str | os.PathLike,
                    train_fraction: float = 0.9) -> dict[str, int]:
    """Encode ``text`` by its sorted characters and write the three files into ``out_dir``.

    Returns:
        ``{"vocab_size", "train_tokens", "val_tokens"}``.
    """
    vocab = CharVocab.from_text(text)
    ids = vocab.encode(text).astype(np.uint16)
    cut = int(len(ids) * train_fraction)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids[:cut].tofile(out / "train.bin")
    ids[cut:].tofile(out / "val.bin")
    meta = {"vocab_size": len(vocab), "itos": dict(enumerate(vocab.chars)), "stoi": vocab.stoi}
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    return {"vocab_size": len(vocab), "train_tokens": cut, "val_tokens": len(ids) - cut}


def prepare(data_file: str | os.PathLike | None = None,
            out_dir: str | os.PathLike = ".") -> dict[str, int]:
    """The Shakespeare text (``data_file``, else the offline stand-in) as nanoGPT files."""
    text, _, _ = load_shakespeare_text(data_file)
    return write_char_bins(text, out_dir)


def prepare_cli(argv: Sequence[str] | None, prepare_fn: Callable[..., dict[str, int]],
                data_default: str | None, description: str) -> int:
    """The command line of a ``prepare`` module: ``--data_file``, ``--out_dir``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_file", default=data_default, help="the text file")
    parser.add_argument("--out_dir", default=".", help="where train.bin, val.bin, meta.pkl go")
    args = parser.parse_args(argv)
    info = prepare_fn(args.data_file, args.out_dir)
    print(f"vocab size {info['vocab_size']:,}; train has {info['train_tokens']:,} tokens, "
          f"val has {info['val_tokens']:,} tokens")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--data_file`` (default: the offline text), ``--out_dir``."""
    return prepare_cli(argv, prepare, None, __doc__.splitlines()[0])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
