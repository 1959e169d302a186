"""Data-loader helpers shared by the whole library (private).

Attribution indexes scores by loader order, so loaders must iterate in a fixed
order. Batches may be tensors, tuples, lists or dicts of tensors with a leading
batch dimension.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch.utils import data as tud
from torch.utils._pytree import tree_flatten, tree_map

from dattri.errors import (
    DattriError,
    DattriValueError,
    DeviceError,
    InvalidBatchError,
    LoaderError,
    LoaderMismatchError,
    OnePassLoaderError,
    ShuffledLoaderError,
)

__all__ = [
    "LoaderFingerprint",
    "batch_context",
    "batches",
    "batch_size_of",
    "check_device_available",
    "check_loader",
    "check_same_loader",
    "count_examples",
    "hash_batch",
    "loader_fingerprint",
    "slice_batch",
    "to_device",
]

_RANDOM_SAMPLERS = (
    tud.RandomSampler,
    tud.SubsetRandomSampler,
    tud.WeightedRandomSampler,
)


def _sampler_is_random(sampler: Any) -> bool:
    if isinstance(sampler, _RANDOM_SAMPLERS):
        return True
    if getattr(sampler, "shuffle", False) is True:  # DistributedSampler(shuffle=True)
        return True
    inner = getattr(sampler, "sampler", None)  # BatchSampler wraps a sampler
    return inner is not None and inner is not sampler and _sampler_is_random(inner)


def _is_empty(loader: Iterable) -> bool:
    """Whether ``loader`` yields nothing (from ``len`` where it has one, without
    loading data; else from its first batch)."""
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:  # no __len__ (e.g. a DataLoader over an IterableDataset)
        pass
    return next(iter(loader), None) is None


class _TensorBatches:
    """The batches of a ``DataLoader`` over a ``TensorDataset`` (or a ``Subset`` of
    one) with the default collate: each index batch of its batch sampler gathered
    from the tensors by ``index_select`` (what the default collate stacks example by
    example; it returns the fields as a list)."""

    def __init__(self, loader: tud.DataLoader, tensors: tuple, rows: torch.Tensor | None) -> None:
        self.loader, self.tensors, self.rows = loader, tensors, rows

    def __iter__(self) -> Iterator[list]:
        for idx in self.loader.batch_sampler:
            i = torch.as_tensor(list(idx), dtype=torch.long)
            if self.rows is not None:
                i = self.rows[i]
            yield [t.index_select(0, i) for t in self.tensors]

    def __len__(self) -> int:
        return len(self.loader)


def batches(loader: Iterable) -> Iterable:
    """``loader``'s batches, as iterating it gives them.

    A map-style ``DataLoader`` over a ``TensorDataset`` (or a ``Subset`` of one) with
    automatic batching, the default collate, no worker processes and no pinned
    memory is read by one ``index_select`` per tensor and batch instead of indexing
    and stacking every example (MNIST LR, 1,100 digits in batches of 1,000: 0.06 s of
    Python per pass); the batches are equal (values, dtypes, shapes, the list of
    fields). Any other loader is returned as it is."""
    part = getattr(loader, "_dattri_loader", None)  # one rank's part of a loader
    if part is not None and part is not loader:
        fast = batches(part)
        return loader if fast is part else fast
    if not (isinstance(loader, tud.DataLoader) and loader.batch_sampler is not None
            and loader.num_workers == 0 and not loader.pin_memory
            and loader.collate_fn is tud.default_collate):
        return loader
    ds, rows = loader.dataset, None
    if type(ds) is tud.Subset and type(ds.dataset) is tud.TensorDataset:
        rows = torch.as_tensor(list(ds.indices), dtype=torch.long)
        ds = ds.dataset
    if type(ds) is not tud.TensorDataset or not ds.tensors:
        return loader
    return _TensorBatches(loader, ds.tensors, rows)


def check_loader(loader: Iterable, name: str = "train_loader", empty: bool = True) -> None:
    """Raise :class:`ShuffledLoaderError` if ``loader`` iterates in a random order.

    Args:
        loader: a ``torch.utils.data.DataLoader`` or any iterable of batches.
        name: argument name used in the error message.
        empty: also refuse a loader that yields nothing (from its ``len`` where it
            has one, else by reading its first batch).

    Raises:
        ShuffledLoaderError: the loader uses a random sampler.
        OnePassLoaderError: ``loader`` is a generator or another iterator (its
            first pass would be consumed by the next).
        LoaderError: ``loader`` yields no batches.
        DattriValueError: ``loader`` is not iterable.
    """
    if not isinstance(loader, Iterable):
        msg = (
            f"{name} must be an iterable of batches (e.g. a DataLoader), "
            f"got {type(loader).__name__}."
        )
        raise DattriValueError(msg)
    if isinstance(loader, Iterator):  # generators, iter(...), map(...): one pass only
        msg = (
            f"{name} is a one-pass {type(loader).__name__} (an iterator): dattri "
            "iterates its loaders several times (a check, the curvature, the scores), "
            "so the first pass would consume it. Pass a re-iterable loader: "
            f"list({name}) of batches, or a torch.utils.data.DataLoader."
        )
        raise OnePassLoaderError(msg)
    if empty and _is_empty(loader):
        msg = f"{name} is empty (it yields no batches); pass a loader with at least one example."
        raise LoaderError(msg)
    if isinstance(loader, tud.DataLoader):
        for s in (loader.sampler, loader.batch_sampler):
            if s is not None and _sampler_is_random(s):
                msg = (
                    f"{name} shuffles ({type(s).__name__}); attribution indexes "
                    "scores by loader order and needs a fixed order: pass "
                    "shuffle=False, or a SequentialSampler / "
                    "dattri.benchmark.utils.SubsetSampler."
                )
                raise ShuffledLoaderError(msg)


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in ``batch``."""
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    msg = "a batch must contain at least one tensor with a leading batch dimension."
    raise DattriValueError(msg)


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move every tensor of ``batch`` to ``device`` (other leaves unchanged)."""
    return tree_map(
        lambda t: t.to(device) if isinstance(t, torch.Tensor) else t,
        batch,
    )


def slice_batch(batch: Any, index: slice | torch.Tensor) -> Any:
    """Select examples ``index`` of every tensor leaf along the batch dimension."""
    return tree_map(
        lambda t: t[index] if isinstance(t, torch.Tensor) and t.dim() > 0 else t,
        batch,
    )


def hash_batch(h: Any, batch: Any, max_examples: int | None = None) -> None:
    """Feed the structure, dtypes, shapes and bytes of ``batch`` (its first
    ``max_examples`` examples when given) into the ``hashlib`` object ``h``."""
    leaves, spec = tree_flatten(batch)
    h.update(str(spec).encode())
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            t = leaf.detach()
            if max_examples is not None and t.dim() > 0:
                t = t[:max_examples]
            t = t.cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())


def count_examples(loader: Iterable) -> int:
    """Number of examples ``loader`` yields, without loading data when it is a
    map-style ``DataLoader`` (from its sampler or batch sampler); otherwise by
    iterating it."""
    loader = getattr(loader, "_dattri_loader", loader)  # one rank's part of a loader
    if isinstance(loader, tud.DataLoader) and not isinstance(loader.dataset, tud.IterableDataset):
        try:
            if loader.batch_size is not None and loader.drop_last:
                return len(loader) * loader.batch_size
            if loader.batch_size is not None:
                return len(loader.sampler)
            return sum(len(b) for b in loader.batch_sampler)
        except TypeError:  # a sampler without __len__
            pass
    return sum(batch_size_of(b) for b in loader)


def head(loader: Iterable, n: int) -> Any:
    """The first ``n`` examples of ``loader`` as one batch (``None`` if it is empty).

    A map-style ``DataLoader`` with automatic batching loads only those examples
    (the indices of its first batch, collated by its ``collate_fn``); any other
    iterable gives the head of its first batch."""
    loader = getattr(loader, "_dattri_loader", loader)  # one rank's part of a loader
    if (isinstance(loader, tud.DataLoader) and loader.batch_sampler is not None
            and not isinstance(loader.dataset, tud.IterableDataset)):
        idx = next(iter(loader.batch_sampler), None)
        if idx is None:
            return None
        return loader.collate_fn([loader.dataset[i] for i in list(idx)[:n]])
    first = next(iter(loader), None)
    return None if first is None else slice_batch(first, slice(0, n))


class LoaderFingerprint(NamedTuple):
    """What :func:`loader_fingerprint` records about a loader."""

    n: int
    digest: str


def loader_fingerprint(loader: Iterable, name: str = "train_loader") -> LoaderFingerprint:
    """The identity of a loader's data: its number of examples and a hash of every
    example, in order (each field's dtype, per-example shape and bytes; the batch
    size does not enter, so the same data in other batches has the same
    fingerprint). One pass over the loader without the model (a ``TensorDataset``
    loader: one ``index_select`` per field and batch; MNIST's 5,000 digits hash in
    milliseconds). A loader that differs from another only in its later examples
    (labels flipped for a noisy-label study) has another fingerprint.

    Raises:
        LoaderError: the loader yields no batches (the message names it).

    One rank's part of a loader (``dattri.distributed.ShardedLoader``) has the
    fingerprint of the whole loader it was split from.
    """
    loader = getattr(loader, "_dattri_source", loader)
    layout, fields, n = hashlib.sha256(), [], 0
    last = None
    fast = batches(loader)
    # a TensorDataset loader: every field hashed whole, in the loader's order (the
    # bytes the batches would give one after the other), from the tensor itself when
    # the order is the tensor's own (no copy); the first batch gives the structure
    whole = _fields_in_order(fast) if isinstance(fast, _TensorBatches) else None
    for batch in (fast if whole is None else [next(iter(fast))]):
        leaves, spec = tree_flatten(batch)
        shape = (str(spec), [(str(t.dtype), tuple(t.shape[1:])) if isinstance(t, torch.Tensor)
                             else type(t).__name__ for t in leaves])
        if shape != last:  # the structure, once for a loader whose batches share it
            layout.update(repr(shape).encode())
            last = shape
        while len(fields) < len(leaves):
            fields.append(hashlib.sha256())
        for h, leaf in zip(fields, leaves if whole is None else whole):
            if isinstance(leaf, torch.Tensor):
                t = leaf.detach().cpu().contiguous()
                h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer, not a copy
            else:
                h.update(repr(leaf).encode())
        n += batch_size_of(batch) if whole is None else int(whole[0].shape[0])
    if last is None:
        msg = f"{name} yielded no batches; pass a non-empty loader."
        raise LoaderError(msg)
    for h in fields:
        layout.update(h.digest())
    return LoaderFingerprint(n, layout.hexdigest()[:16])


def _fields_in_order(tb: _TensorBatches) -> list[torch.Tensor] | None:
    """Every field of a ``TensorDataset`` loader's data in the loader's order (None
    when it yields nothing)."""
    idx = [i for b in tb.loader.batch_sampler for i in b]
    if not idx:
        return None
    i = torch.as_tensor(idx, dtype=torch.long)
    if tb.rows is not None:
        i = tb.rows[i]
    same = all(i.numel() == t.shape[0] for t in tb.tensors) and bool(
        torch.equal(i, torch.arange(i.numel())))
    return [t if same else t.index_select(0, i) for t in tb.tensors]


def check_same_loader(
    cached: LoaderFingerprint | None, loader: Iterable, owner: str, name: str = "train_loader",
) -> None:
    """Raise :class:`LoaderMismatchError` unless ``loader`` holds the data of the
    loader that ``cached`` was taken from (same examples in the same order)."""
    if cached is None:
        return
    now = loader_fingerprint(loader, name)
    if now == cached:
        return
    what = (f"has {now.n} examples, the cached one {cached.n}" if now.n != cached.n
            else f"has the same size ({now.n}) but different examples")
    msg = (
        f"{owner}: the {name} given to this call differs from the one given to "
        f"cache() ({what}); its scores come from the cached training set. Call "
        f"{owner}.cache({name}) with this loader first (or pass the cached loader). "
        "If the data is the same, make the loader deterministic (no random transforms)."
    )
    raise LoaderMismatchError(msg)


@contextmanager
def batch_context(name: str, index: int) -> Iterator[None]:
    """Re-raise a raw error of the model on one batch (a feature size that does not
    fit, labels out of range) as :class:`InvalidBatchError` naming the loader and
    the batch; dattri's own typed errors pass through."""
    try:
        yield
    except DattriError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        msg = (
            f"{name} batch {index} does not fit the model ({type(e).__name__}: "
            f"{first[:300]}). Check that its inputs have the model's feature size, "
            "dtype and device, and its labels are in range (as for the batches used "
            "when caching); or fix loss_func / target_func if the error is theirs."
        )
        raise InvalidBatchError(msg) from e


def check_device_available(dev: torch.device, given: Any = None) -> None:
    """Raise :class:`DeviceError` if ``dev`` is an accelerator this torch build or
    machine does not have (e.g. ``"cuda"`` on a CPU-only torch)."""
    if dev.type == "cpu" or dev.type == "meta":
        return
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    ok = bool(available()) if callable(available) else False
    if ok and dev.index is not None and hasattr(module, "device_count"):
        ok = dev.index < module.device_count()
    if not ok:
        msg = (
            f"device={given if given is not None else str(dev)!r}: this torch "
            f"({torch.__version__}) or machine has no such {dev.type} device; pass "
            "device='cpu', or install a torch build with that accelerator."
        )
        raise DeviceError(msg)
