"""nanoGPT, at its published module path: ``GPT`` is dattri's ``NanoGPT``.

``GPT(GPTConfig(...))`` builds the model from a configuration as the published
module does; the fields are those of ``create_nanogpt_model``.
"""

from __future__ import annotations

import dataclasses

from dattri.benchmark.datasets.shakespeare_char.model import (
    NanoGPT,
    _Block,
    _CausalSelfAttention,
    _LayerNorm,
    _MLP,
    create_nanogpt_model,
)

__all__ = ["GPT", "Block", "CausalSelfAttention", "GPTConfig", "LayerNorm", "MLP", "NanoGPT"]


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


def LayerNorm(ndim: int, bias: bool) -> _LayerNorm:  # noqa: N802 - the published class name
    """nanoGPT's layer norm with an optional bias (the published signature)."""
    return _LayerNorm(ndim, bias)


def CausalSelfAttention(config: GPTConfig) -> _CausalSelfAttention:  # noqa: N802
    """nanoGPT's causal self-attention block, sized by ``config``."""
    return _CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)


def MLP(config: GPTConfig) -> _MLP:  # noqa: N802
    """nanoGPT's feed-forward block, sized by ``config``."""
    return _MLP(config.n_embd, config.dropout, config.bias)


def Block(config: GPTConfig) -> _Block:  # noqa: N802
    """One nanoGPT transformer block (attention + MLP), sized by ``config``."""
    return _Block(config.n_embd, config.n_head, config.dropout, config.bias)
