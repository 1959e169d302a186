"""Write TinyStories as the published nanoGPT files: ``train.bin`` / ``val.bin``
(``uint16`` character ids, first 90% / rest of the text) and ``meta.pkl``
(``{"vocab_size", "itos", "stoi"}``).

``python -m dattri.benchmark.datasets.tinystories.prepare --data_file FILE
--out_dir DIR`` (the published script wrote next to itself, inside the installed
package; here ``--out_dir``, default the current folder). Importing this module
runs nothing.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dattri.benchmark.datasets.shakespeare_char.data import CharVocab
from dattri.benchmark.datasets.tinystories.data import TINYSTORIES_FILE, find_tinystories_file

__all__ = ["main", "prepare"]


def prepare(data_file: str | os.PathLike | None, out_dir: str | os.PathLike = ".",
            train_fraction: float = 0.9) -> dict[str, int]:
    """Encode the text and write the three files into ``out_dir``.

    Returns:
        ``{"vocab_size", "train_tokens", "val_tokens"}``.

    Raises:
        TinyStoriesNotFoundError: ``data_file`` is not there.
    """
    text = find_tinystories_file(data_file).read_text(encoding="utf-8")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--data_file`` (default ``TinyStoriesV2-GPT4-train.txt``), ``--out_dir``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_file", default=TINYSTORIES_FILE, help="the TinyStories text")
    parser.add_argument("--out_dir", default=".", help="where train.bin, val.bin, meta.pkl go")
    args = parser.parse_args(argv)
    info = prepare(args.data_file, args.out_dir)
    print(f"vocab size {info['vocab_size']:,}; train has {info['train_tokens']:,} tokens, "
          f"val has {info['val_tokens']:,} tokens")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
