"""Training and evaluation of the MNIST-10 LR / MLP settings (paper, App. C).

Recipe: SGD, learning rate 0.01, momentum 0.9, mean cross-entropy; 20 epochs for
LR and 50 for the MLP; batch size is the loader's (64 in the paper).

``loss_mnist_lr`` / ``loss_mnist_mlp`` keep the published dattri semantics: they
take a trained model (checkpoint path, state dict or module) and a loader and
return the per-example test losses, the target values that LDS / LOO ground
truth is built from (``calculate_lds_ground_truth(loss_mnist_mlp, ...)``). For
attribution, ``dattri.benchmark.utils.cross_entropy_loss_func(model)`` gives the
``loss_func(params, data)`` form.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dattri.benchmark.datasets.mnist.models import (
    LogisticRegressionMnist,
    MLPMnist,
    create_lr_model,
    create_mlp_model,
)
from dattri.benchmark.utils import load_model, per_example_loss, train_classifier

__all__ = ["loss_mnist_lr", "loss_mnist_mlp", "train_mnist_lr", "train_mnist_mlp"]

ModelLike = nn.Module | Mapping[str, torch.Tensor] | str | os.PathLike


def train_mnist_lr(
    train_loader: Iterable,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epoch_num: int = 20,
    progress: bool | None = None,
) -> LogisticRegressionMnist:
    """Train the MNIST logistic regression (SGD 0.01, momentum 0.9, 20 epochs).

    Args:
        train_loader: yields ``(x (B, 1, 28, 28), y (B,))`` batches.
        seed: seed of initialisation and loader shuffling.
        device: where to train.
        epoch_num: number of epochs (20 in the paper).
        progress: tqdm bar over epochs (``None``: only on a terminal).

    Returns:
        The trained model in eval mode.
    """
    return train_classifier(
        create_lr_model, train_loader, epoch_num=epoch_num, seed=seed,
        device=device, progress=progress,
    )


def train_mnist_mlp(
    train_loader: Iterable,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epoch_num: int = 50,
    progress: bool | None = None,
) -> MLPMnist:
    """Train the MNIST MLP (SGD 0.01, momentum 0.9, 50 epochs, dropout 0.1).

    Args:
        train_loader: yields ``(x (B, 1, 28, 28), y (B,))`` batches.
        seed: seed of initialisation, dropout masks and loader shuffling.
        device: where to train.
        epoch_num: number of epochs (50 in the paper).
        progress: tqdm bar over epochs (``None``: only on a terminal).

    Returns:
        The trained model in eval mode (dropout off).
    """
    return train_classifier(
        create_mlp_model, train_loader, epoch_num=epoch_num, seed=seed,
        device=device, progress=progress,
    )


def loss_mnist_lr(
    model_path: ModelLike, dataloader: Iterable, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-example cross-entropy of a trained MNIST LR model, in loader order.

    Args:
        model_path: checkpoint path (torch file or ``.safetensors``), state dict,
            or the model itself.
        dataloader: yields ``(x, y)`` batches.
        device: where to evaluate.

    Returns:
        ``(n,)`` losses on the CPU.
    """
    return per_example_loss(load_model(model_path, create_lr_model), dataloader, device)


def loss_mnist_mlp(
    model_path: ModelLike, dataloader: Iterable, device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Per-example cross-entropy of a trained MNIST MLP (eval mode), in loader order.

    Args:
        model_path: checkpoint path (torch file or ``.safetensors``), state dict,
            or the model itself.
        dataloader: yields ``(x, y)`` batches.
        device: where to evaluate.

    Returns:
        ``(n,)`` losses on the CPU.
    """
    return per_example_loss(load_model(model_path, create_mlp_model), dataloader, device)
