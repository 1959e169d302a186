"""Benchmark utilities: fixed-order subsets, label noise, and training helpers.

* :class:`SubsetSampler` picks the benchmark's 5,000 training / 500 test examples
  in a fixed order (attribution scores are indexed by loader order).
* :func:`flip_label` builds the noisy-label detection task of the paper (Sec. 4,
  "AUC"): a fraction ``p`` of the training labels is replaced by a different
  label, and the flipped positions are the ground truth.
* :func:`cross_entropy_loss_func`, :func:`train_classifier` and
  :func:`per_example_loss` are shared by the image-classification settings.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Sampler
from tqdm import tqdm

from dattri.errors import DattriValueError, NonFiniteError

__all__ = [
    "SubsetSampler",
    "cross_entropy_loss_func",
    "flip_label",
    "load_model",
    "per_example_loss",
    "train_classifier",
]

Label = TypeVar("Label", torch.Tensor, np.ndarray, list)


class SubsetSampler(Sampler[int]):
    """Yield the given dataset indices, in the given order, once per epoch.

    Unlike ``SubsetRandomSampler`` it does not shuffle, so a loader built with it
    passes dattri's fixed-order check.

    Args:
        indices: non-negative integer positions (list, range, array or 1-D tensor).

    Raises:
        DattriValueError: ``indices`` holds non-integers or negative values.
    """

    def __init__(self, indices: Iterable[int]) -> None:
        arr = np.asarray(
            indices.cpu() if isinstance(indices, torch.Tensor) else list(indices),
        )
        if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
            msg = (
                f"indices: expected a 1-D sequence of integers, got shape {arr.shape} "
                f"of {arr.dtype}; pass e.g. range(5000)."
            )
            raise DattriValueError(msg)
        if arr.size and arr.min() < 0:
            msg = f"indices: negative index {int(arr.min())}; pass positions >= 0."
            raise DattriValueError(msg)
        self.indices = [int(i) for i in arr.reshape(-1)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _label_array(label: Any, name: str = "label") -> np.ndarray:
    if isinstance(label, torch.Tensor):
        arr = label.detach().cpu().numpy()
    else:
        arr = np.asarray(label if isinstance(label, np.ndarray) else list(label))
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        msg = (
            f"{name}: expected a 1-D sequence of integer class labels, got shape "
            f"{arr.shape} of {arr.dtype}."
        )
        raise DattriValueError(msg)
    return arr.astype(np.int64)


def flip_label(
    label: Label,
    label_space: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    p: float = 0.1,
    seed: int | None = 0,
) -> tuple[Label, list[int]]:
    """Replace a fraction ``p`` of the labels by a different label, uniformly.

    ``k = round(p * n)`` positions are drawn without replacement; each chosen
    label ``y`` becomes a label drawn uniformly from ``label_space \\ {y}``, so a
    flipped label never equals the original. The input is not modified.

    Args:
        label: ``(n,)`` integer labels (tensor, numpy array or list).
        label_space: the possible labels (at least two); ``None`` means the
            distinct values of ``label``.
        p: fraction of labels to flip, in ``[0, 1]``.
        seed: seed of the numpy generator (same seed, same flips); ``None``
            draws fresh entropy.

    Returns:
        ``(noisy_label, flipped_indices)``: the noisy labels in the input's type
        (a tensor keeps dtype and device) and the sorted flipped positions.

    Raises:
        DattriValueError: ``p`` outside ``[0, 1]``, labels not 1-D integers, or a
            label space of fewer than two labels.
    """
    if not 0.0 <= float(p) <= 1.0:
        msg = f"p: the flip fraction must lie in [0, 1], got {p}."
        raise DattriValueError(msg)
    arr = _label_array(label)
    space = np.unique(
        arr if label_space is None else _label_array(label_space, "label_space"),
    )
    n, k = len(arr), round(float(p) * len(arr))
    if k and len(space) < 2:  # noqa: PLR2004
        msg = (
            f"label_space: flipping needs at least two labels, got {space.tolist()}; "
            "pass label_space=range(num_classes)."
        )
        raise DattriValueError(msg)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(n, size=k, replace=False)) if k else np.zeros(0, np.int64)
    old = arr[idx]
    pos = np.searchsorted(space, old)
    in_space = (pos < len(space)) & (space[np.minimum(pos, len(space) - 1)] == old)
    # draw among the K-1 other labels (K if the old label is outside the space)
    r = rng.integers(0, len(space) - in_space.astype(np.int64))
    new = space[r + (in_space & (r >= pos))]
    if isinstance(label, torch.Tensor):
        out: Any = label.clone()
        out[torch.as_tensor(idx, device=label.device)] = torch.as_tensor(
            new, dtype=label.dtype, device=label.device,
        )
        return out, idx.tolist()
    noisy = arr.copy()
    noisy[idx] = new
    out = noisy.astype(label.dtype) if isinstance(label, np.ndarray) else noisy.tolist()
    return out, idx.tolist()


def cross_entropy_loss_func(model: nn.Module) -> Callable[[dict, Any], torch.Tensor]:
    """``loss_func(params, data)`` for a classifier, as attribution needs it.

    ``loss(params, (x, y)) = mean_i CE(f(x_i; params), y_i)`` with ``f`` the model
    called through ``torch.func.functional_call``; ``x`` is cast to the dtype of
    ``params`` (so float64 parameters work with float32 data).

    Args:
        model: the classifier whose parameters ``params`` names. Models with
            BatchNorm must be in eval mode for attribution (batches of one).

    Returns:
        The function ``loss(params, data) -> scalar``.
    """

    def loss(
        params: Mapping[str, torch.Tensor], data: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        x, y = data[0], data[1]
        ref = next(iter(params.values()))
        out = torch.func.functional_call(model, dict(params), (x.to(ref.dtype),))
        return F.cross_entropy(out, y.to(out.device))

    return loss


def load_model(
    model: nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike,
    factory: Callable[[], nn.Module],
) -> nn.Module:
    """An ``nn.Module`` from a module, a state dict or a checkpoint path."""
    if isinstance(model, nn.Module):
        return model
    from dattri.task import load_state_dict_file  # noqa: PLC0415

    state = model if isinstance(model, Mapping) else load_state_dict_file(model)
    net = factory()
    net.load_state_dict(state)
    return net


def per_example_loss(
    model: nn.Module, loader: Iterable, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy of every example of ``loader``, in loader order.

    Args:
        model: the classifier (evaluated in eval mode, without gradients).
        loader: yields ``(x, y)`` batches.
        device: where to evaluate.

    Returns:
        ``(n,)`` tensor on the CPU, in the dtype of the model's parameters.
    """
    model = model.to(device).eval()
    dtype = next(model.parameters()).dtype
    out = []
    with torch.no_grad():
        for batch in loader:
            x, y = batch[0].to(device, dtype), batch[1].to(device)
            out.append(F.cross_entropy(model(x), y, reduction="none").cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=dtype)


def _check_epochs(epoch_num: Any) -> int:
    is_int = isinstance(epoch_num, (int, np.integer)) and not isinstance(epoch_num, bool)
    if not is_int or epoch_num < 0:
        msg = f"epoch_num: expected an integer >= 0, got {epoch_num!r}."
        raise DattriValueError(msg)
    return int(epoch_num)


def train_classifier(
    model_fn: Callable[[], nn.Module],
    train_loader: Iterable,
    *,
    epoch_num: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    lr: float = 0.01,
    momentum: float = 0.9,
    progress: bool | None = None,
) -> nn.Module:
    """Train a classifier with SGD on the mean cross-entropy; the paper's recipe.

    The model is built and trained under ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng``, so the same seed and loader give the same model
    and the caller's global RNG state is left untouched.

    Args:
        model_fn: builds the (untrained) model.
        train_loader: yields ``(x, y)`` batches; its batch size is the paper's
            batch size (64 in App. C).
        epoch_num: passes over ``train_loader`` (0 returns the initial model).
        seed: seed of initialisation, dropout and loader shuffling.
        device: where to train.
        lr: SGD learning rate (0.01 in the paper).
        momentum: SGD momentum (0.9 in the paper).
        progress: tqdm bar over epochs (``None``: only on a terminal).

    Returns:
        The trained model, in eval mode, on ``device``.

    Raises:
        DattriValueError: ``epoch_num`` is not an integer >= 0.
        NonFiniteError: the training loss became NaN or infinite.
    """
    epoch_num = _check_epochs(epoch_num)
    device = torch.device(device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        model = model_fn().to(device)
        dtype = next(model.parameters()).dtype
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        model.train()
        disable = None if progress is None else not progress
        bar = tqdm(range(epoch_num), desc="train", disable=disable)
        for epoch in bar:
            total = torch.zeros((), device=device)
            for batch in train_loader:
                x, y = batch[0].to(device, dtype), batch[1].to(device)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                total += loss.detach()
            if not torch.isfinite(total):
                msg = f"training loss is not finite at epoch {epoch}; lower lr (now {lr})."
                raise NonFiniteError(msg)
            bar.set_postfix(loss_sum=float(total))
    return model.eval()
