"""GPT-2 training and evaluation on WikiText-2 blocks (the published helpers).

The model comes from :func:`dattri.benchmark.models.gpt2.create_gpt2_model` (built
from a configuration; ``config=`` sets its sizes), so nothing is downloaded.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from dattri.benchmark.models.gpt2 import create_gpt2_model

__all__ = ["lm_loss", "loss_wikitext2_gpt2", "train_wikitext2_gpt2"]


def lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], device: Any = "cpu") -> torch.Tensor:
    """Mean next-token cross-entropy of a ``{"input_ids", "attention_mask", "labels"}`` batch."""
    inputs = {k: v.to(device) for k, v in batch.items()}
    return model(**inputs).loss


def train_wikitext2_gpt2(dataloader: Iterable, seed: int = 0, device: str = "cpu",
                         epoch_num: int = 3, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Train GPT-2 (AdamW, lr 5e-5, the published recipe) for ``epoch_num`` epochs."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    random.seed(seed)
    model = create_gpt2_model(**dict(config or {})).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    for _ in range(epoch_num):
        for batch in dataloader:
            lm_loss(model, batch, device).backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


def loss_wikitext2_gpt2(model_path: str | os.PathLike, dataloader: Iterable, device: str = "cpu",
                        config: Mapping[str, Any] | None = None) -> torch.Tensor:
    """Mean loss of each batch of ``dataloader`` under the GPT-2 saved at ``model_path``."""
    from dattri.task import load_state_dict_file

    model = create_gpt2_model(**dict(config or {}))
    model.load_state_dict(load_state_dict_file(model_path))
    model.to(device).eval()
    with torch.no_grad():
        return torch.stack([lm_loss(model, b, device).detach().cpu() for b in dataloader])
