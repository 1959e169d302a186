"""Training, loss and target of the Music Transformer on MAESTRO (paper, Appendix C).

Training (Appendix C): the seq2seq (next-event) cross-entropy, Adam with
learning rate 1e-4, ``betas=(0.9, 0.98)``, ``eps=1e-9``, no warm-up, 20 epochs,
batch size 64 (the loader's). The attributed test quantity is the prediction
of a single event after a prompt: :func:`target_maestro_musictransformer`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dattri.benchmark.datasets.maestro import _lm
from dattri.benchmark.datasets.maestro.data import MAX_SEQUENCE
from dattri.benchmark.datasets.maestro.model import (
    D_MODEL,
    DIM_FEEDFORWARD,
    DROPOUT,
    N_LAYERS,
    NUM_HEADS,
    MusicTransformer,
    create_musictransformer_model,
    musictransformer_from_state_dict,
)

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPSILON",
    "DIM_FEEDFORWARD",
    "DROPOUT",
    "D_MODEL",
    "EPOCHS",
    "LR",
    "MAX_SEQUENCE",
    "NUM_HEADS",
    "N_LAYERS",
    "RPR",
    "create_optimizer_and_scheduler",
    "loss_maestro_musictransformer",
    "target_maestro_musictransformer",
    "train_maestro_musictransformer",
]


#: the paper's training recipe (Appendix C), the published names; the defaults below
LR = 1e-4
EPOCHS = 20
ADAM_BETAS = (0.9, 0.98)
ADAM_EPSILON = 1e-9
#: the model's attention uses relative position representations (Huang et al. 2018)
RPR = True


def create_optimizer_and_scheduler(model: nn.Module,
                                   train_loader: Iterable | None = None) -> tuple[Any, None]:
    """The optimiser of the paper's training: ``Adam(lr=LR, betas=ADAM_BETAS,
    eps=ADAM_EPSILON)`` over ``model``'s parameters, and no scheduler (a constant
    rate, as published with ``LR`` set); ``train_loader`` is accepted for the
    published signature."""
    del train_loader
    return torch.optim.Adam(model.parameters(), lr=LR, betas=ADAM_BETAS, eps=ADAM_EPSILON), None


def train_maestro_musictransformer(  # noqa: PLR0913
    train_dataloader: Iterable,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epoch_num: int = EPOCHS,
    *,
    num_epoch: int | None = None,
    model: nn.Module | None = None,
    lr: float = LR,
    progress: bool | None = None,
) -> MusicTransformer:
    """Train a Music Transformer with the paper's optimiser.

    Minimises the mean next-event cross-entropy over the loader's batches
    ``(x, y)`` (``(B, L)`` int64) with Adam(lr, betas=(0.9, 0.98), eps=1e-9)
    for ``epoch_num`` passes; the loader's order is used as given.

    Args:
        train_dataloader: yields ``(x, y)`` batches (e.g. of
            :func:`create_maestro_datasets`).
        seed: seeds ``torch`` before the model is created (initialisation and
            dropout).
        device: where to train.
        epoch_num: passes over the loader (paper: 20). The published positional
            order ``(loader, seed, num_epoch, device)`` is accepted too.
        num_epoch: the published keyword for ``epoch_num`` (overrides it).
        model: the module to train in place; default a new paper-size model.
        lr: Adam learning rate (paper: 1e-4).
        progress: progress bar (``None``: only on a terminal).

    Returns:
        The trained model, in eval mode.

    Raises:
        DattriValueError: a bad epoch count or a batch that is not ``(x, y)``.
    """
    if isinstance(device, int) and not isinstance(device, bool):  # published order
        device, epoch_num = epoch_num, device  # (loader, seed, num_epoch, device)
    if num_epoch is not None:
        epoch_num = num_epoch
    torch.manual_seed(seed)
    if model is None:
        model = create_musictransformer_model(device)
    return _lm.train_language_model(
        model, train_dataloader, epoch_num=epoch_num, max_iters=None, lr=lr,
        betas=ADAM_BETAS, eps=ADAM_EPSILON, grad_clip=None, device=device,
        progress=progress, desc="train Music Transformer",
    )


def loss_maestro_musictransformer(
    params: dict[str, torch.Tensor] | str | os.PathLike,
    data: Any,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Mean next-event cross-entropy of a batch, in ``loss(params, data)`` form.

    ``loss = 1/(B L) sum_{b,t} -log p_params(y_{b,t} | x_{b, <=t})`` with
    ``p = softmax(functional_call(model, params, x))``; ``x, y`` are ``(B, L)``.
    Use it as an :class:`~dattri.task.AttributionTask` ``loss_func`` (bind a
    non-default model with ``functools.partial(loss, model=model)``); it works
    on batches of one under ``torch.func.vmap(grad(...))``.

    Called as ``loss(checkpoint, dataloader, device="cpu")`` (the published
    call form, for ground-truth retraining) with a checkpoint path, a state
    dict or a model, it returns the per-example losses ``(n,)`` over the
    loader; the architecture is read off the state dict unless ``model=`` is
    given (:func:`musictransformer_from_state_dict`).

    Args:
        params: name -> tensor dict of the model's parameters, or a checkpoint path.
        data: one batch ``(x, y)``, or a loader with a checkpoint path.
        model: the module the params belong to (eval mode); default the
            paper-size :func:`create_musictransformer_model`.
        device: device of the checkpoint evaluation.

    Returns:
        A scalar tensor (functional form) or ``(n,)`` per-example losses.

    Raises:
        DattriValueError: params of another size without ``model=``, or a bad batch.
    """
    return _lm.lm_loss(
        params, data, model, device,
        create_musictransformer_model, musictransformer_from_state_dict,
        last_only=False, name="loss_maestro_musictransformer",
    )


def target_maestro_musictransformer(
    params: dict[str, torch.Tensor] | str | os.PathLike,
    data: Any,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Cross-entropy of the last event only: the paper's "generate one event" target.

    ``target = 1/B sum_b -log p_params(y_{b, L-1} | x_b)``. Same call forms as
    :func:`loss_maestro_musictransformer`; with a checkpoint path it returns
    the per-example values ``(n,)`` (positive losses; deliberate: the published
    function returned their negatives).
    """
    return _lm.lm_loss(
        params, data, model, device,
        create_musictransformer_model, musictransformer_from_state_dict,
        last_only=True, name="target_maestro_musictransformer",
    )
