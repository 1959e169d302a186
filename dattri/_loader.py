"""Data-loader helpers shared by the whole library (private).

Attribution indexes scores by loader order, so loaders must iterate in a fixed
order. Batches may be tensors, tuples, lists or dicts of tensors with a leading
batch dimension.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.utils import data as tud
from torch.utils._pytree import tree_flatten, tree_map

from dattri.errors import DattriValueError, ShuffledLoaderError

__all__ = ["batch_size_of", "check_loader", "slice_batch", "to_device"]

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


def check_loader(loader: Iterable, name: str = "train_loader") -> None:
    """Raise :class:`ShuffledLoaderError` if ``loader`` iterates in a random order.

    Args:
        loader: a ``torch.utils.data.DataLoader`` or any iterable of batches.
        name: argument name used in the error message.

    Raises:
        ShuffledLoaderError: the loader uses a random sampler.
        DattriValueError: ``loader`` is not iterable.
    """
    if not isinstance(loader, Iterable):
        msg = (
            f"{name} must be an iterable of batches (e.g. a DataLoader), "
            f"got {type(loader).__name__}."
        )
        raise DattriValueError(msg)
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
