"""Training features kept on disk (``offload="disk"``) and rankings without the
score matrix (``top_k=``), shared by the attributors that cache features (private).

The features of every checkpoint go to a :mod:`dattri.store` under ``cache_dir``
(one store per checkpoint and rank), written batch by batch and resumed after a
crash; scores are then computed in row blocks read from the stores, and with
``top_k`` only each test example's ``k`` proponents and opponents are kept
(:mod:`dattri.topk`), merged over the ranks of a process group.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from dattri._loader import count_examples
from dattri.distributed import Shard, row_range
from dattri.errors import DattriError, DattriRuntimeError, DattriValueError
from dattri.model_util.dropout import active_dropout
from dattri.store import aligned_blocks  # noqa: F401 - the attributors read blocks with it
from dattri.topk import TopK, merge_topk, topk_from_blocks

__all__ = ["OFFLOADS", "HostRows", "aligned_blocks", "check_store_args", "fill", "fill_stores",
           "ranked", "refuse_sharded_dropout"]

OFFLOADS = ("none", "cpu", "disk")


def check_store_args(owner: str, offload: object, cache_dir: object) -> None:
    """Typed errors for ``offload`` / ``cache_dir``."""
    if offload not in OFFLOADS:
        msg = f"{owner}: offload={offload!r} must be one of {OFFLOADS}."
        raise DattriValueError(msg)
    if offload == "disk" and cache_dir is None:  # "cpu": host memory, no folder
        msg = (f"{owner}: offload='disk' writes the training features to a feature store "
               "on disk (dattri.store): pass cache_dir= a folder for it.")
        raise DattriValueError(msg)


def check_top_k(top_k: object) -> int | None:
    """``top_k`` as an int >= 1 or None."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        msg = f"top_k={top_k!r} must be None (the full score matrix) or an int >= 1."
        raise DattriValueError(msg)
    return top_k


def checkpoint_digest(task: Any, ckpt: int, layer_name: Any) -> str:
    """A hash of the selected parameters at ``ckpt``: a store written for other
    weights is refused, not reused."""
    theta, _ = task.get_param(ckpt, layer_name)
    t = theta.detach().to("cpu").contiguous()
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _keys(att: Any, keys: Sequence[str] | None) -> Sequence[str]:
    """One weight digest per store: ``keys``, or each checkpoint's (:func:`checkpoint_digest`)."""
    if keys is not None:
        return keys
    return [checkpoint_digest(att.task, c, att.layer_name) for c in range(att.num_checkpoints)]


def fill_stores(att: Any, features: Any, loader: Iterable, settings: dict[str, Any],
                desc: str = "train grads", subdir: str | None = None,
                keys: Sequence[str] | None = None) -> list[Any]:
    """One finished store per checkpoint with ``features`` of this rank's ``loader``
    (batches already on disk are not recomputed), under ``att.cache_dir`` (or its
    ``subdir``). ``keys``: the weight digest of each store (default: one store per
    checkpoint of ``att.task``, keyed by :func:`checkpoint_digest`); store ``c`` is
    featurized with ``features.batch(batch, c)``."""
    from dattri._loader import loader_fingerprint
    from dattri.store import featurize_to_store, open_store

    shard = att._shard()
    start = row_range(count_examples(loader), shard)[0]
    fingerprint = loader_fingerprint(loader)  # every example hashed: once for every store
    stores = []
    for c, digest in enumerate(_keys(att, keys)):
        key = {**settings, "checkpoint": digest}
        root = att.cache_dir if subdir is None else os.path.join(att.cache_dir, subdir)
        store = open_store(root, loader, c, shard=0 if shard is None else shard.rank,
                           settings=key, row_offset=start, fingerprint=fingerprint)
        featurize_to_store(features, loader, c, store, desc=f"{desc} (checkpoint {c})",
                           show_progress=att.show_progress)
        stores.append(store)
    return stores


class HostRows:
    """Features of one checkpoint in host memory (``offload="cpu"``), read like a
    :class:`dattri.store.FeatureStore`: ``n``, ``dim``, ``dtype``, ``row_offset``,
    ``blocks(rows=, device=)`` with global row starts."""

    def __init__(self, rows: torch.Tensor, row_offset: int) -> None:
        self.rows, self.row_offset = rows, int(row_offset)
        self.n, self.dim, self.dtype = rows.shape[0], rows.shape[1], rows.dtype

    def blocks(self, budget_bytes: int | None = None, device: Any = "cpu",
               rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        step = rows or (self.n if budget_bytes is None else
                        max(1, budget_bytes // max(1, self.dim * self.rows.element_size())))
        for i in range(0, self.n, step):
            yield self.row_offset + i, self.rows[i:i + step].to(device)


def fill_host(att: Any, features: Any, loader: Iterable, desc: str = "train grads",
              keys: Sequence[str] | None = None) -> list[HostRows]:
    """One :class:`HostRows` per store (see :func:`fill_stores`) with ``features`` of
    this rank's ``loader``: in host memory for ``att.offload == "cpu"``, on
    ``att.device`` otherwise."""
    where = "cpu" if att.offload == "cpu" else att.device
    out = []
    for c in range(len(_keys(att, keys))):
        rows = torch.cat([f.to(where) for f in features.iterate(loader, c, desc)])
        out.append(HostRows(rows, row_range(rows.shape[0], att._shard())[0]))
    return out


def fill(att: Any, features: Any, loader: Iterable, settings: dict[str, Any],
         desc: str = "train grads", subdir: str | None = None,
         keys: Sequence[str] | None = None) -> list[Any]:
    """:func:`fill_stores` for ``offload="disk"``, :func:`fill_host` otherwise
    (``"cpu"``: host memory; ``"none"``: the device)."""
    if att.offload == "disk":
        return fill_stores(att, features, loader, settings, desc, subdir, keys)
    return fill_host(att, features, loader, desc, keys)


def ranked(blocks: Iterable[tuple[int, torch.Tensor]], k: int, shard: Shard | None) -> TopK:
    """The top-k of score row blocks with global row starts, over every rank.

    Each rank ranks ``min(k, its rows)`` (possibly none: a rank without blocks
    sends nothing) and the rankings are gathered and merged, so ``k`` is checked
    against the training rows of all ranks together. One collective, reached by
    every rank: a rank's error (``k`` above the global rows, NaN scores) is
    raised on every rank alike, none is left waiting for the others.
    """
    if shard is None:
        return topk_from_blocks(blocks, k)
    import torch.distributed as dist

    local: TopK | None = None
    error: Exception | None = None
    try:
        it = iter(blocks)
        first = next(it, None)
        if first is not None:
            local = topk_from_blocks(itertools.chain([first], it), k, partial=True)
    except Exception as exc:  # noqa: BLE001 - sent to the other ranks, raised below
        error = exc
    parts: list[Any] = [None] * shard.world
    dist.all_gather_object(parts, (local, _portable(error)), group=shard.group)
    if error is not None:
        raise error
    for r, (_, err) in enumerate(parts):
        if err is not None:
            kind, text = err
            raise kind(f"rank {r}: {text}")
    tops = [top for top, _ in parts if top is not None]
    if not tops:
        msg = (f"k: {k} exceeds the 0 training rows scored (no rank of the {shard.world} "
               "had a score block); pass a training loader with at least k examples.")
        raise DattriValueError(msg)
    return merge_topk(tops, k=k)


def _portable(error: Exception | None) -> tuple[type, str] | None:
    """``error`` as ``(type, message)`` for another rank: its dattri type (else
    :class:`DattriRuntimeError`), whatever its constructor takes."""
    if error is None:
        return None
    kind = type(error) if isinstance(error, DattriError) else DattriRuntimeError
    return kind, f"{type(error).__name__}: {error}"


def block_rows(dim: int, m: int, checkpoints: int = 1, budget_bytes: int = 64 << 20) -> int:
    """Rows per block such that a block's float64 features of width ``dim`` for
    every checkpoint and its ``(rows, m)`` scores fit in ``budget_bytes``."""
    return max(1, budget_bytes // max(1, 8 * (dim * checkpoints + 2 * m)))



def refuse_sharded_dropout(att: Any, owner: str) -> None:
    """A typed error for a sharded run of a method whose random masks follow the
    order of the rank's own batches (DataInf's Fisher gradients, LiSSA's minibatch
    products, DVEmb's steps): with an active dropout layer each rank would draw other
    masks than one process does, so the results would differ from it."""
    if att._shard() is None:
        return
    active = active_dropout(att.task.get_model())
    if active:
        msg = (f"{owner}: the model has active dropout ({', '.join(active[:5])}) and the run is "
               "sharded over a torch.distributed group: each rank would draw its own dropout "
               "masks, unlike one process. Put the model in eval mode (model.eval()) or set "
               "p=0 for attribution, or run this method unsharded (process_group="
               "dist.new_group([dist.get_rank()]), a group of one).")
        raise DattriValueError(msg)
