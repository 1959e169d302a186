"""Training and evaluation of the ResNet-9 settings (paper, App. C).

Recipe: SGD, learning rate 0.01, momentum 0.9, mean cross-entropy, 50 epochs,
batch size of the loader (64 in the paper), dropout 0.1 after every convolution.
The trained model is returned in eval mode (BatchNorm uses its running
statistics), which is the mode attribution needs.

``loss_cifar_resnet9`` keeps the published semantics: per-example test losses of
a trained model, the target values of LDS / LOO ground truth. For attribution,
``dattri.benchmark.utils.cross_entropy_loss_func(model)`` gives
``loss_func(params, data)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from functools import partial

import torch
from torch import nn

from dattri.benchmark.datasets.cifar.resnet9 import create_resnet9_model
from dattri.benchmark.utils import load_model, per_example_loss, train_classifier
from dattri.errors import DattriValueError

__all__ = [
    "loss_cifar_resnet9",
    "train_cifar10_resnet9",
    "train_cifar2_resnet9",
    "train_cifar_resnet9",
]

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


def train_cifar_resnet9(
    train_loader: Iterable,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int = 2,
    epoch_num: int = 50,
    *,
    num_epochs: int | None = None,
    dropout_rate: float = 0.1,
    variant: str = "dattri",
    progress: bool | None = None,
) -> nn.Module:
    """Train a ResNet-9 on CIFAR (SGD 0.01, momentum 0.9, 50 epochs).

    Args:
        train_loader: yields ``(x (B, 3, 32, 32), y (B,))`` batches.
        seed: seed of initialisation, dropout masks and loader shuffling.
        device: where to train.
        num_classes: 2 for CIFAR-2, 10 for CIFAR-10.
        epoch_num: number of epochs (50 in the paper).
        num_epochs: the published keyword for ``epoch_num``; overrides it.
        dropout_rate: dropout after every convolution block.
        variant: ResNet-9 variant, see :func:`create_resnet9_model`.
        progress: tqdm bar over epochs (``None``: only on a terminal).

    Returns:
        The trained model in eval mode.

    Raises:
        DattriValueError: ``epoch_num`` and ``num_epochs`` disagree.
    """
    if num_epochs is not None:
        if epoch_num not in (50, num_epochs):
            msg = (
                f"num_epochs: got num_epochs={num_epochs} and epoch_num={epoch_num}; "
                "pass only one of them."
            )
            raise DattriValueError(msg)
        epoch_num = num_epochs
    factory = partial(create_resnet9_model, num_classes, dropout_rate, variant)
    return train_classifier(
        factory, train_loader, epoch_num=epoch_num, seed=seed,
        device=device, progress=progress,
    )


def train_cifar2_resnet9(
    train_loader: Iterable, seed: int = 0, device: str | torch.device = "cpu",
    epoch_num: int = 50, **kwargs: object,
) -> nn.Module:
    """:func:`train_cifar_resnet9` with 2 classes (CIFAR-2: cat vs dog)."""
    return train_cifar_resnet9(train_loader, seed, device, 2, epoch_num, **kwargs)


def train_cifar10_resnet9(
    train_loader: Iterable, seed: int = 0, device: str | torch.device = "cpu",
    epoch_num: int = 50, **kwargs: object,
) -> nn.Module:
    """:func:`train_cifar_resnet9` with 10 classes (CIFAR-10)."""
    return train_cifar_resnet9(train_loader, seed, device, 10, epoch_num, **kwargs)


def loss_cifar_resnet9(
    model_path: ModelLike,
    dataloader: Iterable,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> torch.Tensor:
    """Per-example cross-entropy of a trained ResNet-9 (eval mode), in loader order.

    Args:
        model_path: checkpoint path (torch file or ``.safetensors``), state dict
            of the ``"dattri"`` variant, or the model itself (any variant).
        dataloader: yields ``(x, y)`` batches.
        device: where to evaluate.
        num_classes: classes of a checkpoint; ``None`` reads it from the
            checkpoint's ``linear.weight``.

    Returns:
        ``(n,)`` losses on the CPU.
    """
    if not isinstance(model_path, nn.Module):
        from dattri.task import load_state_dict_file  # noqa: PLC0415

        state = model_path if isinstance(model_path, Mapping) else load_state_dict_file(model_path)
        if num_classes is None and "linear.weight" in state:
            num_classes = int(state["linear.weight"].shape[0])
        model_path = state
    factory = partial(create_resnet9_model, num_classes or 2)
    return per_example_loss(load_model(model_path, factory), dataloader, device)
