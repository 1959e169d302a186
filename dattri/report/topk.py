"""Top-k proponents and opponents of test examples, without a full score matrix.

A score ``tau(i, j)`` (row ``i``: training example, column ``j``: test example;
positive = proponent, see the package conventions) ranks the training set for
every test example. The report needs, per test example, the ``k`` largest
scores (proponents) and the ``k`` smallest (opponents). They come

* from a score matrix, read in blocks of training rows (:func:`topk_from_scores`);
* from any stream of row blocks, e.g. the shards of a sharded run, each block
  ``(row_offset, scores (b, m))`` (:func:`topk_from_blocks`), merged exactly;
* from an attributor, attributing only the chosen test examples
  (:func:`topk_from_attributor`): ``(n_train, m)`` for ``m`` shown examples;
* or precomputed (a :class:`TopK` saved with :meth:`TopK.save`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dattri.errors import DattriValueError

__all__ = ["TopK", "merge_topk", "topk_from_attributor", "topk_from_blocks", "topk_from_scores"]

_FIELDS = ("test_indices", "proponents", "proponent_scores", "opponents", "opponent_scores")


@dataclass
class TopK:
    """Per test example, the ``k`` training rows of highest and of lowest score.

    Attributes:
        test_indices: ``(m,)`` int64, the score columns (test positions) described.
        proponents: ``(m, k)`` int64 training rows, highest score first.
        proponent_scores: ``(m, k)`` their scores, descending.
        opponents: ``(m, k)`` int64 training rows, lowest score first.
        opponent_scores: ``(m, k)`` their scores, ascending.
    """

    test_indices: torch.Tensor
    proponents: torch.Tensor
    proponent_scores: torch.Tensor
    opponents: torch.Tensor
    opponent_scores: torch.Tensor

    def __post_init__(self) -> None:
        m, k = self.proponents.shape
        for name in _FIELDS[1:]:
            if tuple(getattr(self, name).shape) != (m, k):
                msg = (f"{name}: shape {tuple(getattr(self, name).shape)}, expected ({m}, {k}) "
                       "like proponents; pass the four (m, k) tensors of one ranking.")
                raise DattriValueError(msg)
        if tuple(self.test_indices.shape) != (m,):
            msg = (f"test_indices: shape {tuple(self.test_indices.shape)}, expected ({m},), one "
                   "test position per row of proponents.")
            raise DattriValueError(msg)

    @property
    def k(self) -> int:
        """Proponents (and opponents) kept per test example."""
        return int(self.proponents.shape[1])

    def save(self, path: str | os.PathLike) -> Path:
        """Write the ranking (``torch.save`` of plain tensors) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({name: getattr(self, name).cpu() for name in _FIELDS}, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> TopK:
        """Read a ranking written by :meth:`save`."""
        saved = torch.load(Path(path), weights_only=True)
        missing = [n for n in _FIELDS if n not in saved]
        if missing:
            msg = f"path: {path} lacks {missing}; write it with TopK.save."
            raise DattriValueError(msg)
        return cls(**{n: saved[n] for n in _FIELDS})


def _check_k(k: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        msg = f"k: expected a positive int (examples per side), got {k!r}."
        raise DattriValueError(msg)
    return k


def _merge_side(idx: torch.Tensor, val: torch.Tensor, k: int, largest: bool):
    """Keep the ``k`` best of the candidate columns ``(m, c)``; ties: lower row first."""
    order = torch.argsort(idx, dim=1, stable=True)
    idx, val = idx.gather(1, order), val.gather(1, order)
    keep = torch.argsort(val, dim=1, descending=largest, stable=True)[:, :k]
    return idx.gather(1, keep), val.gather(1, keep)


def topk_from_blocks(
    blocks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    test_indices: Sequence[int] | torch.Tensor | None = None,
) -> TopK:
    """Top-k from row blocks of a score matrix, any order, never more than a block held.

    Args:
        blocks: ``(row_offset, scores)`` pairs, ``scores`` of shape ``(b, m)``:
            training rows ``row_offset .. row_offset + b - 1`` for the same ``m``
            test columns. Blocks may come from different shards in any order.
        k: proponents and opponents kept per test example (at most the number of
            training rows seen).
        test_indices: the test positions of the ``m`` columns (default ``0..m-1``).

    Returns:
        The :class:`TopK`; scores keep the blocks' dtype.

    Raises:
        DattriValueError: no blocks, blocks of different widths, or a bad ``k``.
    """
    k = _check_k(k)
    state: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    seen, width = 0, None
    for offset, block in blocks:
        block = torch.as_tensor(block).detach().cpu()
        if block.ndim != 2 or (width is not None and block.shape[1] != width):
            msg = (f"blocks: a block of shape {tuple(block.shape)} at row {offset}; every block "
                   f"must be 2-D (rows, {width if width is not None else 'm'} test columns).")
            raise DattriValueError(msg)
        width, seen = block.shape[1], seen + block.shape[0]
        rows = torch.arange(offset, offset + block.shape[0]).unsqueeze(0).expand(width, -1)
        for largest in (True, False):
            idx, val = state.get(largest, (rows[:, :0], block.T[:, :0]))
            state[largest] = _merge_side(torch.cat([idx, rows], dim=1),
                                         torch.cat([val, block.T], dim=1), k, largest)
    if width is None:
        msg = "blocks: no score block was given; pass at least one (row_offset, scores) pair."
        raise DattriValueError(msg)
    if k > seen:
        msg = f"k: {k} exceeds the {seen} training rows scored; pass k <= {seen}."
        raise DattriValueError(msg)
    cols = torch.arange(width) if test_indices is None else torch.as_tensor(test_indices)
    return TopK(cols.to(torch.int64), *state[True], *state[False])


def topk_from_scores(
    score: torch.Tensor,
    k: int,
    test_indices: Sequence[int] | torch.Tensor | None = None,
    block_size: int = 4096,
) -> TopK:
    """Top-k of the columns ``test_indices`` of an ``(n_train, n_test)`` score matrix.

    The matrix is read in blocks of ``block_size`` training rows (it may be a
    memory-mapped tensor larger than memory).
    """
    if score.ndim != 2:
        msg = f"score: expected (n_train, n_test), got shape {tuple(score.shape)}."
        raise DattriValueError(msg)
    cols = torch.arange(score.shape[1]) if test_indices is None else torch.as_tensor(
        test_indices, dtype=torch.int64)
    if cols.numel() and (cols.min() < 0 or cols.max() >= score.shape[1]):
        msg = (f"test_indices: must lie in 0..{score.shape[1] - 1} (the score's columns), got "
               f"{cols.tolist()}.")
        raise DattriValueError(msg)
    step = max(int(block_size), 1)
    blocks = ((s, score[s:s + step][:, cols]) for s in range(0, score.shape[0], step))
    return topk_from_blocks(blocks, k, cols)


def merge_topk(parts: Sequence[tuple[int, TopK]]) -> TopK:
    """The exact top-k of a training set split in shards: ``(row_offset, shard TopK)``.

    Each shard's ranking covers the same test examples over its own training rows
    (numbered from 0 within the shard).
    """
    if not parts:
        msg = "parts: no shard rankings given; pass (row_offset, TopK) pairs."
        raise DattriValueError(msg)
    first = parts[0][1]
    if any(not torch.equal(p.test_indices, first.test_indices) for _, p in parts):
        msg = ("parts: shards rank different test examples; rank the same test_indices "
               "in every shard.")
        raise DattriValueError(msg)
    state = {}
    for largest, (idx_name, val_name) in ((True, ("proponents", "proponent_scores")),
                                          (False, ("opponents", "opponent_scores"))):
        idx = torch.cat([getattr(p, idx_name) + off for off, p in parts], dim=1)
        val = torch.cat([getattr(p, val_name) for _, p in parts], dim=1)
        state[largest] = _merge_side(idx, val, first.k, largest)
    return TopK(first.test_indices.clone(), *state[True], *state[False])


def topk_from_attributor(
    attributor: Any,
    train_loader: Any,
    test_dataset: Any,
    test_indices: Sequence[int],
    k: int,
    batch_size: int = 16,
) -> tuple[TopK, torch.Tensor]:
    """Attribute only the chosen test examples and rank the training set for them.

    Args:
        attributor: a dattri attributor (cached or not).
        train_loader: the training loader it was (or will be) cached on.
        test_dataset: the test data set; ``test_indices`` index it directly.
        test_indices: the test examples to show.
        k: proponents and opponents per test example.
        batch_size: batch size of the loader of the chosen test examples.

    Returns:
        ``(topk, score)`` with ``score`` the ``(n_train, m)`` scores of the chosen
        test examples (column ``c`` is ``test_indices[c]``).
    """
    from torch.utils.data import DataLoader, Subset

    chosen = [int(i) for i in test_indices]
    loader = DataLoader(Subset(test_dataset, chosen), batch_size=batch_size)
    if not getattr(attributor, "is_cached", True):
        attributor.cache(train_loader)
    score = attributor.attribute(train_loader, loader).detach().cpu()
    top = topk_from_blocks([(0, score)], k, torch.tensor(chosen, dtype=torch.int64))
    return top, score
