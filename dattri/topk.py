"""Blocked top-k: each test example's strongest proponents and opponents without
ever forming the ``n_train x n_test`` score matrix.

A score ``tau(i, j)`` (row ``i``: training example, column ``j``: test example;
positive = proponent) ranks the training set for every test example. A
:class:`TopK` keeps, per test example, the ``k`` training rows of highest score
(proponents, highest first) and the ``k`` of lowest score (opponents, lowest
first). Equal scores go to the smaller training row, so the result is
deterministic and equal to a stable sort of the full column
(``torch.sort(score[:, j], descending=True, stable=True)`` for the proponents,
ascending for the opponents), whatever the block sizes, block order or sharding.

Sources:

* :func:`topk_from_blocks`: a stream of score blocks ``(row_start, (b, m))``;
* :func:`topk_from_features`: blocks of training features and the test features
  with a score function (default: the inner product, averaged over checkpoints);
* :func:`topk_from_scores`: a score matrix (possibly memory-mapped) read in blocks;
* :func:`merge_topk`: partial results of shards or ranks merged into the global one.

Memory: one score block plus ``O(m k)``; per block the selection costs ``O(b m)``
(``torch.topk`` and comparisons; no sort of the block).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from dattri.errors import DattriValueError, NonFiniteError

__all__ = ["TopK", "concat_topk", "merge_topk", "topk_from_blocks", "topk_from_features", "topk_from_scores"]

_FIELDS = ("test_indices", "proponents", "proponent_scores", "opponents", "opponent_scores")


@dataclass
class TopK:
    """Per test example, the ``k`` training rows of highest and of lowest score.

    Attributes:
        test_indices: ``(m,)`` int64, the test positions (score columns) described.
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
        """Write the ranking (``torch.save`` of plain CPU tensors) and return the path."""
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


def _check_k(k: object) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        msg = f"k: expected a positive int (examples per side), got {k!r}."
        raise DattriValueError(msg)
    return k


def _select(block: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Positions ``(m, min(k, b))`` (in no particular order within a column) of the
    ``k`` best rows of each column of ``block (b, m)``; equal scores: the earlier row."""
    b, m = block.shape
    kk = min(k, b)
    if kk == b:
        return torch.arange(b, device=block.device).expand(m, b)
    # the set of the kk best rows is unique unless the kk-th and the next value tie:
    # then torch.topk's choice is taken as it is (one pass; the usual case for real
    # scores), else the exact tie-break below (earlier rows first)
    top = torch.topk(block, kk + 1, dim=0, largest=largest, sorted=True)
    if not bool((top.values[kk - 1] == top.values[kk]).any()):
        return top.indices[:kk].T
    edge = top.values[:kk]
    kth = (edge.min(dim=0) if largest else edge.max(dim=0)).values  # (m,)
    better = block > kth if largest else block < kth
    tied = block == kth
    need = kk - better.sum(dim=0)  # >= 1: the k-th value itself is tied
    excess = tied.sum(dim=0) > need
    if bool(excess.any()):  # more rows equal the k-th value than places left: earliest ones
        cols = excess.nonzero().squeeze(1)
        sub = tied[:, cols]
        tied[:, cols] = sub & (sub.cumsum(dim=0) <= need[cols])
    take = (better | tied).T  # (m, b), exactly kk per column
    return take.nonzero()[:, 1].reshape(m, kk)


def _merge(idx: torch.Tensor, val: torch.Tensor, k: int, largest: bool):
    """The ``k`` best of candidate columns ``(m, c)``; equal scores: lower row first."""
    order = torch.argsort(idx, dim=1, stable=True)
    idx, val = idx.gather(1, order), val.gather(1, order)
    keep = torch.argsort(val, dim=1, descending=largest, stable=True)[:, :k]
    return idx.gather(1, keep), val.gather(1, keep)


def _as_columns(test_indices: Sequence[int] | torch.Tensor | None, m: int) -> torch.Tensor:
    cols = torch.arange(m) if test_indices is None else torch.as_tensor(test_indices).reshape(-1)
    cols = cols.to(torch.int64).cpu()
    if cols.numel() != m:
        msg = (f"test_indices: {cols.numel()} positions for {m} score columns; pass one test "
               "position per column.")
        raise DattriValueError(msg)
    return cols


def topk_from_blocks(
    blocks: Iterable[tuple[int, torch.Tensor]],
    k: int,
    test_indices: Sequence[int] | torch.Tensor | None = None,
    *,
    partial: bool = False,
) -> TopK:
    """Top-k from row blocks of a score matrix, in any order, one block held at a time.

    Args:
        blocks: ``(row_start, scores)`` pairs, ``scores (b, m)`` the training rows
            ``row_start .. row_start + b - 1`` (global indices) for the same ``m``
            test columns. Blocks may come from different shards, in any order,
            on any device (the selection runs there; the result is on the CPU).
        k: proponents and opponents kept per test example (at most the number of
            training rows scored, unless ``partial``).
        test_indices: the test positions of the ``m`` columns (default ``0..m-1``).
        partial: the blocks are one shard of a larger training set (a rank's rows):
            ``k`` is not checked against the rows scored here, and the ranking keeps
            ``min(k, rows)`` per side (``(m, 0)`` for blocks of zero rows), ready for
            ``merge_topk(parts, k=k)``, which checks ``k`` against the union.

    Returns:
        The :class:`TopK` (scores in the blocks' dtype).

    Raises:
        DattriValueError: no blocks, blocks of different widths, a bad ``k``, ``k``
            above the rows scored (without ``partial``).
        NonFiniteError: a block holds NaN (no ranking is defined).
    """
    k = _check_k(k)
    state: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}
    seen, width, dtype = 0, None, None
    for start, block in blocks:
        block = torch.as_tensor(block).detach()
        if block.ndim != 2 or (width is not None and block.shape[1] != width):
            msg = (f"blocks: a block of shape {tuple(block.shape)} at row {start}; every block "
                   f"must be 2-D (rows, {width if width is not None else 'm'} test columns).")
            raise DattriValueError(msg)
        if block.is_floating_point() and bool(torch.isnan(block).any()):
            msg = (f"blocks: the score block at row {start} holds NaN; check the features or "
                   "the score function for overflow before ranking.")
            raise NonFiniteError(msg)
        width, seen, dtype = block.shape[1], seen + block.shape[0], block.dtype
        if block.shape[0] == 0:
            continue
        rows = torch.arange(int(start), int(start) + block.shape[0], device=block.device)
        for largest in (True, False):
            pos = _select(block, k, largest)
            idx, val = rows[pos], block.T.gather(1, pos)
            if largest in state:
                old_idx, old_val = state[largest]
                dtype = torch.promote_types(old_val.dtype, val.dtype)
                idx = torch.cat([old_idx.to(idx.device), idx], dim=1)
                val = torch.cat([old_val.to(val.device, dtype), val.to(dtype)], dim=1)
            state[largest] = _merge(idx, val, k, largest)
    if width is None:
        msg = "blocks: no score block was given; pass at least one (row_start, scores) pair."
        raise DattriValueError(msg)
    if k > seen and not partial:
        msg = f"k: {k} exceeds the {seen} training rows scored; pass k <= {seen}."
        raise DattriValueError(msg)
    if not state:  # a shard of zero rows (partial): nothing to rank, (m, 0) per side
        empty = (torch.empty(width, 0, dtype=torch.int64), torch.empty(width, 0, dtype=dtype))
        state = {True: empty, False: empty}
    out = [t.cpu() for side in (True, False) for t in state[side]]
    return TopK(_as_columns(test_indices, width), *out)


def topk_from_scores(
    score: torch.Tensor,
    k: int,
    test_indices: Sequence[int] | torch.Tensor | None = None,
    block_size: int = 4096,
) -> TopK:
    """Top-k of the columns ``test_indices`` (default: all) of an ``(n_train, n_test)``
    score matrix, read in blocks of ``block_size`` training rows (it may be a
    memory-mapped tensor larger than memory)."""
    if score.ndim != 2:
        msg = f"score: expected (n_train, n_test), got shape {tuple(score.shape)}."
        raise DattriValueError(msg)
    cols = torch.arange(score.shape[1]) if test_indices is None else torch.as_tensor(
        test_indices, dtype=torch.int64).reshape(-1)
    if cols.numel() and (cols.min() < 0 or cols.max() >= score.shape[1]):
        msg = (f"test_indices: must lie in 0..{score.shape[1] - 1} (the score's columns), got "
               f"{cols.tolist()}.")
        raise DattriValueError(msg)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        msg = f"block_size: expected a positive int (training rows per block), got {block_size!r}."
        raise DattriValueError(msg)
    blocks = ((s, score[s:s + block_size][:, cols.to(score.device)])
              for s in range(0, score.shape[0], block_size))
    return topk_from_blocks(blocks, k, cols)


Features = torch.Tensor | Sequence[torch.Tensor]


def _per_checkpoint(x: Features) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def mean_inner_product(train: Features, test: Features) -> torch.Tensor:
    """``mean_c train_c @ test_c.T`` ``(b, m)``: the default score of
    :func:`topk_from_features` (one tensor = one checkpoint), in the training
    features' dtype and on their device."""
    tr, te = _per_checkpoint(train), _per_checkpoint(test)
    if len(tr) != len(te):
        msg = (f"test: {len(te)} checkpoint feature sets for {len(tr)} training ones; pass one "
               "test feature matrix per checkpoint of the training blocks.")
        raise DattriValueError(msg)
    total = None
    for a, t in zip(tr, te):
        s = a @ t.to(a.device, a.dtype).T
        total = s if total is None else total + s
    return total / len(tr) if len(tr) > 1 else total


def topk_from_features(
    train_blocks: Iterable[tuple[int, Features]],
    test: Features,
    k: int,
    score_fn: Callable[[Features, Features], torch.Tensor] | None = None,
    test_indices: Sequence[int] | torch.Tensor | None = None,
) -> TopK:
    """Top-k from blocks of training features, scoring one block at a time.

    Args:
        train_blocks: ``(row_start, features)`` pairs; ``features`` is a ``(b, d)``
            tensor, or a sequence of them (one per checkpoint), e.g.
            :meth:`dattri.store.FeatureStore.blocks` or
            :func:`dattri.store.checkpoint_blocks`.
        test: the test-side features ``(m, d)`` (or one per checkpoint), already
            preconditioned where the method needs it (TRAK: ``phi K^{-1}``).
        k: proponents and opponents per test example.
        score_fn: ``f(train_block, test) -> (b, m)`` scores; default
            :func:`mean_inner_product`.
        test_indices: the test positions of the ``m`` rows of ``test``.
    """
    fn = score_fn or mean_inner_product
    blocks = ((start, fn(block, test)) for start, block in train_blocks)
    return topk_from_blocks(blocks, k, test_indices)


def concat_topk(parts: Sequence[TopK]) -> TopK:
    """One :class:`TopK` from rankings of disjoint sets of test examples (blocks of
    test columns, or the columns of each rank), ordered by test position."""
    if not parts:
        msg = "parts: no rankings given; pass at least one TopK."
        raise DattriValueError(msg)
    k = min(p.k for p in parts)
    order = torch.argsort(torch.cat([p.test_indices for p in parts]), stable=True)
    fields = [torch.cat([getattr(p, name)[:, :k] if name != "test_indices" else p.test_indices
                         for p in parts])[order] for name in _FIELDS]
    return TopK(*fields)


def merge_topk(parts: Sequence[TopK | tuple[int, TopK]], k: int | None = None) -> TopK:
    """The exact top-k of a training set split into shards or ranks.

    Args:
        parts: each a :class:`TopK` over the same test examples, with global
            training rows, or a ``(row_offset, TopK)`` pair whose rows are numbered
            from 0 within its shard.
        k: the ``k`` of the result. ``None``: the smallest ``k`` of the parts (shards
            ranked with one ``k``). Given: each part must rank ``min(k, its rows)``
            (``topk_from_blocks(..., partial=True)``; a shard with fewer than ``k``
            rows ranks all of them, possibly none), and the ``k`` best of all their
            candidates are kept.

    Returns:
        The ranking of the union, equal to the one of the whole score matrix.

    Raises:
        DattriValueError: no parts, parts over different test examples, a bad ``k``,
            or ``k`` above the training rows of all parts together.
    """
    pairs = [p if isinstance(p, tuple) else (0, p) for p in parts]
    if not pairs:
        msg = "parts: no shard rankings given; pass TopK results or (row_offset, TopK) pairs."
        raise DattriValueError(msg)
    first = pairs[0][1]
    if any(not torch.equal(p.test_indices, first.test_indices) for _, p in pairs):
        msg = ("parts: shards rank different test examples; rank the same test_indices "
               "in every shard.")
        raise DattriValueError(msg)
    if k is None:
        k = min(p.k for _, p in pairs)
    else:
        k = _check_k(k)
        # each part holds min(k, its rows): their sum is below k only when the rows
        # of all parts together are, and then it is that number of rows
        total = sum(p.k for _, p in pairs)
        if k > total:
            msg = f"k: {k} exceeds the {total} training rows scored; pass k <= {total}."
            raise DattriValueError(msg)
    out = []
    for largest, (idx_name, val_name) in ((True, ("proponents", "proponent_scores")),
                                          (False, ("opponents", "opponent_scores"))):
        idx = torch.cat([getattr(p, idx_name)[:, :k] + int(off) for off, p in pairs], dim=1)
        val = torch.cat([getattr(p, val_name)[:, :k] for _, p in pairs], dim=1)
        out.extend(_merge(idx, val, k, largest))
    return TopK(first.test_indices.clone(), *out)
