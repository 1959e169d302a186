"""The score seam (private): the loop over checkpoints, how their scores combine,
blocked score products and the self-influence diagonal.

Every attributor scores ``tau(i, j) = sum_c w_c <T_c(f_c(z_i)), S_c(f_c(z_j))>``
over the task's checkpoints ``c``: ``w_c = 1 / C`` for an ensemble (influence
functions, TRAK, LoGra) and the learning rates for TracInCP. The attributors give
the per-checkpoint parts (features, preconditioned test side, the product of one
block); this module owns the checkpoint loop and the combination, so no attributor
writes ``for c in range(num_checkpoints)`` itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from dattri._loader import batch_context, batches, to_device
from dattri.algorithm._loop import _disable

__all__ = ["Ensemble", "checkpoint_batches", "diagonal", "score_blocks", "started"]

T = TypeVar("T")


class Ensemble:
    """The checkpoints of a task and their weights: ``tau = sum_c w_c tau_c``.

    Args:
        count: the number of checkpoints ``C``.
        weights: ``(C,)`` weights (TracInCP's learning rates); ``None`` = the mean
            (``w_c = 1 / C``, applied as one division of the sum).
    """

    def __init__(self, count: int, weights: torch.Tensor | None = None) -> None:
        if weights is not None and weights.numel() != count:
            msg = f"{weights.numel()} weights for {count} checkpoints."
            raise ValueError(msg)
        self.count, self.weights = int(count), weights

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.count))

    def __len__(self) -> int:
        return self.count

    def each(self, fn: Callable[[int], T]) -> list[T]:
        """``[fn(c) for every checkpoint c]`` (per-checkpoint state, test sides)."""
        return [fn(c) for c in self]

    def _weighted(self, part: torch.Tensor, c: int) -> torch.Tensor:
        return part if self.weights is None else part * self.weights[c].to(part.dtype)

    def _finish(self, total: torch.Tensor) -> torch.Tensor:
        return total / self.count if self.weights is None else total

    def combine(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """``sum_c w_c parts[c]`` (in the first part's dtype)."""
        total = self._weighted(parts[0], 0)
        for c in range(1, len(parts)):
            total = total + self._weighted(parts[c], c).to(total.dtype)
        return self._finish(total)

    def total(self, fn: Callable[[int], torch.Tensor]) -> torch.Tensor:
        """``sum_c w_c fn(c)``, one checkpoint at a time (only the running sum and
        one checkpoint's part are held)."""
        total = None
        for c in self:
            part = self._weighted(fn(c), c)
            total = part if total is None else total + part.to(total.dtype)
        return self._finish(total)


def checkpoint_batches(featurize: Callable[[Any, int], torch.Tensor], loader: Iterable[Any],
                       ensemble: Ensemble, device: torch.device, desc: str = "train grads",
                       show_progress: bool | None = None, name: str = "train_loader",
                       total: int | None = None,
                       release: Callable[[torch.Tensor], None] | None = None,
                       ) -> Iterator[list[torch.Tensor] | None]:
    """Every checkpoint's features of each batch of ``loader``, one batch at a time
    (the loader is read once; ``featurize(batch, c)``); a ``None`` batch (a lockstep
    step of a rank without rows) yields ``None``. With ``release``, each batch's
    features are released when the next batch is asked for (the consumer keeps
    nothing of them: a featurizer may reuse their memory)."""
    bar = tqdm(batches(loader), desc=desc, leave=False, total=total, disable=_disable(show_progress))
    for i, b in enumerate(bar):
        if b is None:
            yield None
            continue
        b = to_device(b, device)
        with batch_context(name, i):
            parts = ensemble.each(lambda c, b=b: featurize(b, c))
        yield parts
        if release is not None:
            for f in parts:
                release(f)


def started(blocks: Iterable[Sequence[torch.Tensor] | None], start: int,
            ) -> Iterator[tuple[int, Sequence[torch.Tensor] | None]]:
    """``(global_row_start, parts)`` of consecutive row blocks from row ``start``
    (a ``None`` block keeps its place and holds no rows)."""
    for parts in blocks:
        yield start, parts
        if parts is not None:
            start += parts[0].shape[0]


def score_blocks(blocks: Iterable[tuple[int, Sequence[torch.Tensor] | None]],
                 pair: Callable[[torch.Tensor | None, int], torch.Tensor | None],
                 ensemble: Ensemble) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, sum_c w_c pair(rows_c, c))`` for blocks ``(start, [rows_c per
    checkpoint])`` of training rows; ``pair(rows, c)`` scores one checkpoint's rows
    against its test side. A ``None`` block (a lockstep step, see
    ``_IFBase._lockstep``) still calls ``pair(None, c)`` for every checkpoint (a
    collective solve takes part) and yields nothing."""
    for start, parts in blocks:
        if parts is None:
            for c in ensemble:
                pair(None, c)
            continue
        yield start, ensemble.total(lambda c, parts=parts: pair(parts[c], c))


def diagonal(left: Iterable[torch.Tensor], right: Iterable[torch.Tensor] | None = None,
             ) -> torch.Tensor:
    """``<l_i, r_i>`` of matching row blocks as one ``(n,)`` vector (``right=None``:
    ``||l_i||^2``): a self-influence without the ``n x n`` matrix."""
    right_it = None if right is None else iter(right)
    parts = []
    for lb in left:
        rb = lb if right_it is None else next(right_it)
        parts.append((lb * rb).sum(dim=1))
    return torch.cat(parts)
