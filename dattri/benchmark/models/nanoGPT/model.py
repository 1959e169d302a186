"""nanoGPT, at its published module path: ``GPT`` is dattri's ``NanoGPT``.

``GPT(GPTConfig(...))`` builds the model from a configuration as the published
module does; the fields are those of ``create_nanogpt_model``.
"""

from __future__ import annotations

import dataclasses

from dattri.benchmark.datasets.shakespeare_char.model import NanoGPT, create_nanogpt_model

__all__ = ["GPT", "GPTConfig", "NanoGPT"]


@dataclasses.dataclass
class GPTConfig:
    """nanoGPT sizes (the published field names)."""

    block_size: int = 256
    vocab_size: int = 65
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = False


def GPT(config: GPTConfig) -> NanoGPT:  # noqa: N802 - the published class name
    """A nanoGPT built from ``config`` (:class:`GPTConfig`)."""
    return create_nanogpt_model(**dataclasses.asdict(config))
