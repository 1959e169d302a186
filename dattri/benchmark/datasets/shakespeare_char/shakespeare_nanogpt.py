"""Training and loss of nanoGPT on character-level Shakespeare (paper, Appendix C).

Training (Appendix C, following nanoGPT's ``shakespeare_char`` defaults): the
next-character cross-entropy, Adam with learning rate 1e-3, ``betas=(0.9,
0.99)``, gradient-norm clipping at 1.0, batch size 32 (the loader's), 5,000
iterations. The attributed test quantity is the same loss on generated blocks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dattri.benchmark.datasets.maestro import _lm
from dattri.benchmark.datasets.shakespeare_char.model import (
    NanoGPT,
    create_nanogpt_model,
    nanogpt_from_state_dict,
)

__all__ = ["loss_shakespeare_nanogpt", "train_shakespeare_nanogpt"]


def train_shakespeare_nanogpt(  # noqa: PLR0913
    train_dataloader: Iterable,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epoch_num: int | None = None,
    *,
    max_iters: int | None = 5000,
    model: nn.Module | None = None,
    vocab_size: int | None = None,
    lr: float = 1e-3,
    grad_clip: float | None = 1.0,
    progress: bool | None = None,
) -> NanoGPT:
    """Train a nanoGPT with the paper's optimiser.

    Minimises the mean next-character cross-entropy over the loader's batches
    ``(x, y)`` (``(B, T)`` int64) with Adam(lr, betas=(0.9, 0.99)), cycling
    through the loader (in its own order) until ``max_iters`` steps or
    ``epoch_num`` passes, whichever comes first.

    Args:
        train_dataloader: yields ``(x, y)`` batches (e.g. of
            :func:`create_shakespeare_dataset`).
        seed: seeds ``torch`` before the model is created.
        device: where to train.
        epoch_num: passes over the loader; ``None``: no limit.
        max_iters: optimiser steps (paper / nanoGPT: 5,000); ``None``: no limit.
        model: the module to train in place; default a new paper-size nanoGPT.
        vocab_size: vocabulary of the default model; default the loader's
            dataset vocabulary (``dataset.vocab``) or 65.
        lr: Adam learning rate (paper: 1e-3).
        grad_clip: maximum gradient norm (nanoGPT: 1.0); ``None`` disables it.
        progress: progress bar (``None``: only on a terminal).

    Returns:
        The trained model, in eval mode.

    Raises:
        DattriValueError: bad iteration limits or a batch that is not ``(x, y)``.
    """
    torch.manual_seed(seed)
    if model is None:
        if vocab_size is None:
            vocab = getattr(getattr(train_dataloader, "dataset", None), "vocab", None)
            vocab_size = len(vocab) if vocab is not None else 65
        model = create_nanogpt_model(device, vocab_size=vocab_size)
    return _lm.train_language_model(
        model, train_dataloader, epoch_num=epoch_num, max_iters=max_iters, lr=lr,
        betas=(0.9, 0.99), eps=1e-8, grad_clip=grad_clip, device=device,
        progress=progress, desc="train nanoGPT",
    )


def loss_shakespeare_nanogpt(
    params: dict[str, torch.Tensor] | str | os.PathLike,
    data: Any,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Mean next-character cross-entropy of a batch, in ``loss(params, data)`` form.

    ``loss = 1/(B T) sum_{b,t} -log p_params(y_{b,t} | x_{b, <=t})`` with
    ``p = softmax(functional_call(model, params, x))``; ``x, y`` are ``(B, T)``.
    Use it as an :class:`~dattri.task.AttributionTask` ``loss_func`` (bind the
    model with ``functools.partial(loss, model=model)``; the default is the
    paper-size nanoGPT with the 65-character vocabulary); it works on batches
    of one under ``torch.func.vmap(grad(...))`` with the model in eval mode.

    Called as ``loss(checkpoint, dataloader, device="cpu")`` (the published
    call form, for ground truth) with a checkpoint path, a state dict or a
    model, it returns the per-example losses ``(n,)`` over the loader; the
    architecture is read off the state dict unless ``model=`` is given
    (:func:`nanogpt_from_state_dict`).

    Returns:
        A scalar tensor (functional form) or ``(n,)`` per-example losses.

    Raises:
        DattriValueError: params of another size without ``model=``, or a bad batch.
    """
    return _lm.lm_loss(
        params, data, model, device, create_nanogpt_model, nanogpt_from_state_dict,
        last_only=False, name="loss_shakespeare_nanogpt",
    )
