"""Top-k proponents and opponents of test examples, for the report page.

The ranking itself is :mod:`dattri.topk` (blocked, exact, ties to the lower
training row); the report takes it

* from a score matrix, read in blocks of training rows (:func:`topk_from_scores`);
* from any stream of row blocks, e.g. the shards of a sharded run, each block
  ``(row_start, scores (b, m))`` (:func:`topk_from_blocks`), merged exactly
  (:func:`merge_topk`);
* from training features cached on disk by :mod:`dattri.store`, scored block by
  block against the test features (:func:`topk_from_store`): no score matrix;
* from an attributor, attributing only the chosen test examples
  (:func:`topk_from_attributor`): ``(n_train, m)`` for ``m`` shown examples;
* or precomputed (a :class:`TopK` saved with :meth:`TopK.save`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dattri.store import DEFAULT_BUDGET, store_blocks
from dattri.topk import (
    Features,
    TopK,
    merge_topk,
    topk_from_blocks,
    topk_from_features,
    topk_from_scores,
)

__all__ = ["TopK", "merge_topk", "topk_from_attributor", "topk_from_blocks", "topk_from_scores",
           "topk_from_store"]


def topk_from_store(
    cache_dir: str | os.PathLike,
    test_features: Features,
    k: int,
    checkpoints: Sequence[int] = (0,),
    score_fn: Callable[[Features, Features], torch.Tensor] | None = None,
    test_indices: Sequence[int] | torch.Tensor | None = None,
    budget_bytes: int = DEFAULT_BUDGET,
    device: torch.device | str = "cpu",
) -> TopK:
    """Top-k from training features cached in a :mod:`dattri.store` folder.

    Every shard of ``checkpoints`` under ``cache_dir`` is read in blocks of at most
    ``budget_bytes`` and scored against ``test_features`` (one ``(m, d)`` tensor
    per checkpoint, preconditioned where the method needs it), so the page of a
    sharded run needs neither the score matrix nor all the features in memory.

    Args:
        cache_dir: the folder the featurize run wrote (``ckpt-*/shard-*``).
        test_features: ``(m, d)`` or a sequence of them, one per checkpoint.
        k: proponents and opponents per test example.
        checkpoints: the checkpoint indices to score (ensemble mean by default).
        score_fn: ``f([train block per checkpoint], test_features) -> (b, m)``;
            default: the mean over checkpoints of the inner products.
        test_indices: the test positions of the ``m`` test rows (default ``0..m-1``).
        budget_bytes: feature bytes per block read (shared by the checkpoints).
        device: where the blocks are scored.
    """
    test = [test_features] if isinstance(test_features, torch.Tensor) else list(test_features)
    blocks = store_blocks(cache_dir, checkpoints, budget_bytes, device)
    return topk_from_features(blocks, test, k, score_fn, test_indices)


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
