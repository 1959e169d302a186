"""Attribution split across processes with ``torch.distributed``.

Every rank of a process group runs the same script on the same loaders; an
attributor that shards splits the *training* loader into one contiguous run of
batches per rank (:func:`shard_loader`; the batches themselves are unchanged, so
each example's features are exactly those of a single process), sums its
curvature or Gram terms over the ranks (:func:`all_reduce`) and gathers the score
rows in rank order (:func:`all_gather_rows`). Scores then equal the single-process
scores up to the order of the floating-point sums.

A process group is picked up as ``torch.distributed`` does: ``process_group=None``
(the default of every attributor method) means the default group when
``torch.distributed`` is initialised with more than one process, and one process
otherwise. Launch with ``torchrun --nproc-per-node N script.py`` (backend ``gloo``
on CPUs, ``nccl`` on GPUs)::

    import torch.distributed as dist
    dist.init_process_group("gloo")
    attributor = TRAKAttributor(task, ...)
    attributor.cache(train_loader)               # each rank: its share of the data
    scores = attributor.attribute(test_loader)   # every rank: all (n_train, n_test)

To run one process's attribution inside a distributed job, pass a group of one
(``process_group=dist.new_group([dist.get_rank()])``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.utils.data as tud

from dattri.errors import DattriValueError

__all__ = [
    "Shard",
    "ShardedLoader",
    "all_gather_rows",
    "all_reduce",
    "broadcast",
    "resolve",
    "row_range",
    "shard_loader",
    "split",
]


class Shard(NamedTuple):
    """This process's place in a process group of ``world > 1`` processes."""

    rank: int
    world: int
    group: Any  # a torch.distributed ProcessGroup (None = the default group)


def resolve(process_group: Any = None) -> Shard | None:
    """The :class:`Shard` of this process in ``process_group`` (``None`` = the
    default group), or ``None`` for a single process (``torch.distributed`` not
    initialised, or a group of one).

    Raises:
        DattriValueError: ``process_group`` is given but ``torch.distributed`` is
            not initialised.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if process_group is not None:
            msg = (f"process_group={process_group!r} was given but torch.distributed is not "
                   "initialised; call torch.distributed.init_process_group(...) first "
                   "(torchrun sets its environment), or pass process_group=None.")
            raise DattriValueError(msg)
        return None
    world = dist.get_world_size(process_group)
    if world <= 1:
        return None
    return Shard(dist.get_rank(process_group), world, process_group)


def split(n: int, world: int) -> list[tuple[int, int]]:
    """``world`` contiguous ranges ``[lo, hi)`` covering ``range(n)``, sizes differing
    by at most one (the first ``n % world`` ranges are one longer)."""
    base, extra = divmod(n, world)
    out, lo = [], 0
    for r in range(world):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class ShardedLoader:
    """One rank's contiguous run of a loader's batches.

    Attributes:
        loader: the iterable of this rank's batches (a ``DataLoader`` over the same
            dataset when the source is a map-style ``DataLoader``, so a rank loads
            only its own examples).
        batches: ``(lo, hi)``, the rank's batch indices in the whole loader.
        num_batches: batches of the whole loader.
        shard: the :class:`Shard`.
    """

    def __init__(self, loader: Iterable, batches: tuple[int, int], num_batches: int,
                 shard: Shard, source: Iterable) -> None:
        self.loader, self.batches, self.num_batches = loader, batches, num_batches
        self.shard, self.source = shard, source
        # what dattri._loader's helpers read (counts and heads of the part,
        # fingerprints of the whole)
        self._dattri_loader, self._dattri_source = loader, source

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def __len__(self) -> int:
        return self.batches[1] - self.batches[0]


class _Slice:
    """Batches ``lo..hi-1`` of a re-iterable loader without a map-style dataset."""

    def __init__(self, loader: Iterable, lo: int, hi: int) -> None:
        self.loader, self.lo, self.hi = loader, lo, hi

    def __iter__(self) -> Iterator[Any]:
        for i, b in enumerate(self.loader):
            if i >= self.hi:
                return
            if i >= self.lo:
                yield b

    def __len__(self) -> int:
        return self.hi - self.lo


def shard_loader(loader: Iterable, shard: Shard, name: str = "train_loader") -> ShardedLoader:
    """This rank's contiguous batches of ``loader`` (see :class:`ShardedLoader`).

    A map-style ``DataLoader`` with automatic batching is split by its batch
    sampler's index lists (a rank collates only its own batches); a list or tuple
    of batches is sliced; any other re-iterable loader is read in full by every
    rank, each keeping its own batches.

    Raises:
        DattriValueError: ``loader`` already holds one rank's part (a
            ``DistributedSampler``): dattri splits the whole training set itself.
    """
    if isinstance(loader, ShardedLoader):
        return loader
    part = _shard_loader(loader, shard, name)
    if part.batches[1] <= part.batches[0]:
        msg = (f"{name} has {part.num_batches} batch(es) for {shard.world} ranks, so rank "
               f"{shard.rank} would get none; use smaller batches (at least one per rank) "
               "or fewer processes.")
        raise DattriValueError(msg)
    return part


def _shard_loader(loader: Iterable, shard: Shard, name: str) -> ShardedLoader:
    if isinstance(loader, tud.DataLoader):
        for s in (loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)):
            if isinstance(s, tud.DistributedSampler):
                msg = (f"{name} uses a DistributedSampler (one rank's part of the data); "
                       "dattri splits the training set across the ranks itself and gathers "
                       "the scores in loader order: pass every rank the same loader over "
                       "the whole training set (e.g. shuffle=False, no sampler).")
                raise DattriValueError(msg)
    if (isinstance(loader, tud.DataLoader) and loader.batch_sampler is not None
            and not isinstance(loader.dataset, tud.IterableDataset)):
        index_batches = [list(b) for b in loader.batch_sampler]
        lo, hi = split(len(index_batches), shard.world)[shard.rank]
        part = tud.DataLoader(
            loader.dataset, batch_sampler=index_batches[lo:hi], collate_fn=loader.collate_fn,
            num_workers=loader.num_workers, pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
        )
        return ShardedLoader(part, (lo, hi), len(index_batches), shard, loader)
    if isinstance(loader, (list, tuple)):
        lo, hi = split(len(loader), shard.world)[shard.rank]
        return ShardedLoader(list(loader[lo:hi]), (lo, hi), len(loader), shard, loader)
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in loader)
    lo, hi = split(n, shard.world)[shard.rank]
    return ShardedLoader(_Slice(loader, lo, hi), (lo, hi), n, shard, loader)


def _comm(t: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``t`` on a device the group's backend can communicate (gloo: the CPU)."""
    import torch.distributed as dist

    if t.device.type != "cpu" and dist.get_backend(shard.group) == "gloo":
        return t.detach().to("cpu").contiguous()
    return t.detach().clone().contiguous()  # collectives work in place: never on ``t``


def all_reduce(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """The sum of ``t`` over the ranks (a new tensor on ``t``'s device); ``t`` itself
    for a single process."""
    if shard is None:
        return t
    import torch.distributed as dist

    buf = _comm(t, shard)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=shard.group)
    return buf.to(t.device)


def broadcast(t: torch.Tensor, shard: Shard | None, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` on every rank (``t``'s shape and dtype on every rank)."""
    if shard is None:
        return t
    import torch.distributed as dist

    buf = _comm(t, shard)
    dist.broadcast(buf, src=dist.get_global_rank(shard.group, src) if shard.group is not None
                   else src, group=shard.group)
    return buf.to(t.device)


def row_range(n_local: int, shard: Shard | None) -> tuple[int, int, int]:
    """``(start, stop, total)``: this rank's rows in the gathered order, given its
    ``n_local`` rows (``(0, n_local, n_local)`` for a single process)."""
    if shard is None:
        return 0, n_local, n_local
    counts = all_gather_rows(torch.tensor([n_local], dtype=torch.int64), shard).tolist()
    start = sum(counts[: shard.rank])
    return start, start + n_local, sum(counts)


def all_gather_rows(t: torch.Tensor, shard: Shard | None) -> torch.Tensor:
    """The ranks' ``t`` (``(n_r, ...)``, equal trailing shapes) concatenated along
    rows in rank order, on every rank; ``t`` itself for a single process."""
    if shard is None:
        return t
    import torch.distributed as dist

    buf = _comm(t, shard)
    sizes = torch.tensor([buf.shape[0]], dtype=torch.int64, device=buf.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(shard.world)]
    dist.all_gather(all_sizes, sizes, group=shard.group)
    counts = [int(s) for s in all_sizes]
    top = max(counts)
    if buf.shape[0] < top:
        pad = buf.new_zeros((top - buf.shape[0], *buf.shape[1:]))
        buf = torch.cat([buf, pad])
    parts = [torch.empty_like(buf) for _ in range(shard.world)]
    dist.all_gather(parts, buf, group=shard.group)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
