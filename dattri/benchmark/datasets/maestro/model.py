"""Music Transformer (Huang et al., ICLR 2019): a decoder-only Transformer with
relative self-attention, as used by the paper's MAESTRO setting (Appendix C:
6 layers, 8 heads, d_model 512, feed-forward 1024, 388 events; about 13.1M
parameters with relative embeddings for 256 positions).

Relative attention with the "skewing" trick of Huang et al. Per layer and head,
with ``Q, K, V`` of shape ``(L, D_h)`` and learned relative embeddings
``E^r`` of shape ``(L_max, D_h)`` (row ``m`` is distance ``m - (L_max - 1)``,
i.e. ``-(L_max - 1) .. 0``; shared by the heads of a layer, as in Shaw et al.
2018), ``S_rel[i, j] = q_i . E^r_{j - i}`` for ``j <= i`` is read off
``Q (E^r_{last L rows})^T`` by padding one zero column on the left, reshaping
``(L, L + 1) -> (L + 1, L)`` and dropping the first row. Then

    Attention(Q, K, V) = softmax( (Q K^T + S_rel) / sqrt(D_h) + M ) V,

with the causal mask ``M[i, j] = -inf`` for ``j > i``. Blocks are pre-LayerNorm
(``x + Attn(LN(x))``, ``x + FF(LN(x))``, FF = Linear-ReLU-Linear), followed by a
final LayerNorm and a linear read-out to the 388 event logits. Inputs are
``sqrt(d_model) * embedding + sinusoidal timing signal`` (Vaswani et al. 2017).
Everything is written with pure tensor ops (no in-place updates of parameters,
no branches on tensor values), so ``torch.func.functional_call`` and
``vmap(grad(...))`` work on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from dattri.benchmark.datasets.maestro.events import VOCAB_SIZE
from dattri.errors import CheckpointError, DattriValueError

__all__ = [
    "DIM_FEEDFORWARD",
    "DROPOUT",
    "D_MODEL",
    "NUM_HEADS",
    "N_LAYERS",
    "MusicTransformer",
    "RelativeSelfAttention",
    "create_musictransformer_model",
    "musictransformer_from_state_dict",
    "musictransformer_num_params",
    "relative_skew",
    "sinusoidal_timing_signal",
]


#: the paper's size (Appendix C), the published names; the defaults below
N_LAYERS = 6
NUM_HEADS = 8
D_MODEL = 512
DIM_FEEDFORWARD = 1024
DROPOUT = 0.1


def relative_skew(rel: torch.Tensor) -> torch.Tensor:
    """Huang et al.'s skewing: ``out[..., i, j] = rel[..., i, j - i + L - 1]`` for ``j <= i``.

    Args:
        rel: ``(..., L, L)``, column ``m`` holding the logit for distance
            ``m - (L - 1)``.

    Returns:
        ``(..., L, L)``; entries with ``j > i`` are meaningless (masked later).
    """
    length = rel.shape[-1]
    padded = F.pad(rel, (1, 0))
    return padded.reshape(*rel.shape[:-2], length + 1, length)[..., 1:, :]


def sinusoidal_timing_signal(length: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """``(length, dim)``: ``sin(p / 10000^(2k/dim))`` in even, ``cos`` in odd columns."""
    pos = torch.arange(length, dtype=like.dtype, device=like.device).unsqueeze(1)
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=like.dtype, device=like.device) * (-math.log(10000.0) / dim),
    )
    angles = pos * freq
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(length, -1)[:, :dim]


class RelativeSelfAttention(nn.Module):
    """Causal multi-head self-attention with relative position logits (see module doc)."""

    def __init__(self, d_model: int, n_heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.max_len = n_heads, d_model // n_heads, max_len
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.rel_emb = nn.Parameter(torch.randn(max_len, self.d_head) * self.d_head ** -0.5)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, d_model) -> (B, L, d_model)``."""
        b, length, d = x.shape
        q, k, v = (
            t.reshape(b, length, self.n_heads, self.d_head).transpose(1, 2)
            for t in self.qkv(x).split(d, dim=-1)
        )
        er = self.rel_emb[self.max_len - length:]
        s_rel = relative_skew(q @ er.transpose(0, 1))
        scores = (q @ k.transpose(-2, -1) + s_rel) / math.sqrt(self.d_head)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        att = self.dropout(torch.softmax(scores, dim=-1))
        return self.out((att @ v).transpose(1, 2).reshape(b, length, d))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, max_len: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = RelativeSelfAttention(d_model, n_heads, max_len, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model),
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.ff(self.norm2(x)))


class MusicTransformer(nn.Module):
    """Decoder-only Music Transformer: ``(B, L)`` event ids -> ``(B, L, vocab)`` logits.

    Args:
        vocab_size: number of events (388).
        n_layers, n_heads, d_model, d_ff: sizes (paper: 6, 8, 512, 1024).
        max_len: longest input; relative embeddings cover distances
            ``0 .. max_len - 1`` (published setting: 256).
        dropout: dropout rate of attention weights, residual branches and FF.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        n_layers: int = 6,
        n_heads: int = 8,
        d_model: int = 512,
        d_ff: int = 1024,
        max_len: int = 256,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=d_model ** -0.5)
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            _Block(d_model, n_heads, d_ff, max_len, dropout) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` int64 event ids, ``L <= max_len`` -> ``(B, L, vocab)`` logits."""
        length = tokens.shape[-1]
        if length > self.max_len:
            msg = (
                f"tokens: sequence length {length} exceeds max_len={self.max_len}; "
                "cut the input or build the model with a larger max_len."
            )
            raise DattriValueError(msg)
        h = self.embedding(tokens) * math.sqrt(self.d_model)
        h = self.dropout(h + sinusoidal_timing_signal(length, self.d_model, h))
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def musictransformer_num_params(
    vocab_size: int = VOCAB_SIZE,
    n_layers: int = 6,
    n_heads: int = 8,
    d_model: int = 512,
    d_ff: int = 1024,
    max_len: int = 256,
) -> int:
    """Closed-form parameter count of :class:`MusicTransformer` (13,113,732 at paper size).

    ``V d`` (embedding) ``+ n_layers (4 d^2 + 4 d + 2 d d_ff + d_ff + d + 4 d
    + max_len d / n_heads)`` ``+ 2 d`` (final norm) ``+ d V + V`` (read-out).
    """
    d, d_head = d_model, d_model // n_heads
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * d_ff + d_ff + d) + 4 * d
    per_layer += max_len * d_head
    return vocab_size * d + n_layers * per_layer + 2 * d + d * vocab_size + vocab_size


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name}: expected a positive int, got {value!r}."
            raise DattriValueError(msg)
    if sizes["d_model"] % sizes["n_heads"]:
        msg = (
            f"d_model / n_heads: d_model={sizes['d_model']} is not divisible by "
            f"n_heads={sizes['n_heads']}; choose sizes with d_model % n_heads == 0."
        )
        raise DattriValueError(msg)


def create_musictransformer_model(
    device: str | torch.device = "cpu",
    *,
    vocab_size: int = VOCAB_SIZE,
    n_layers: int = N_LAYERS,
    n_heads: int = NUM_HEADS,
    d_model: int = D_MODEL,
    d_ff: int = DIM_FEEDFORWARD,
    max_len: int = 256,
    dropout: float = DROPOUT,
) -> MusicTransformer:
    """Create a Music Transformer (defaults: the paper's size, about 13.1M parameters).

    Args:
        device: where to put it.
        vocab_size, n_layers, n_heads, d_model, d_ff, max_len, dropout: see
            :class:`MusicTransformer`; small values give test models.

    Returns:
        The model, in training mode.

    Raises:
        DattriValueError: a size is not a positive int, ``d_model % n_heads != 0``
            or ``dropout`` is outside ``[0, 1)``.
    """
    _check_sizes(
        vocab_size=vocab_size, n_layers=n_layers, n_heads=n_heads,
        d_model=d_model, d_ff=d_ff, max_len=max_len,
    )
    if not 0.0 <= float(dropout) < 1.0:
        msg = f"dropout: expected a rate in [0, 1), got {dropout!r}."
        raise DattriValueError(msg)
    model = MusicTransformer(vocab_size, n_layers, n_heads, d_model, d_ff, max_len, dropout)
    return model.to(device)


def musictransformer_from_state_dict(state: Mapping[str, torch.Tensor]) -> MusicTransformer:
    """A :class:`MusicTransformer` whose sizes are read off a state dict (weights not loaded).

    ``vocab_size, d_model`` from ``embedding.weight``; ``n_layers`` from the
    ``layers.<i>`` keys; ``d_ff`` from the first FF weight; ``max_len`` and
    ``n_heads = d_model / d_head`` from the relative embeddings.

    Raises:
        CheckpointError: the state dict is not a Music Transformer's.
    """
    try:
        vocab_size, d_model = state["embedding.weight"].shape
        layers = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
        max_len, d_head = state["layers.0.attn.rel_emb"].shape
        d_ff = state["layers.0.ff.0.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        msg = f"checkpoint: not a MusicTransformer state dict (missing or odd {exc}); pass model=."
        raise CheckpointError(msg) from exc
    return create_musictransformer_model(
        vocab_size=int(vocab_size), n_layers=len(layers), n_heads=int(d_model // d_head),
        d_model=int(d_model), d_ff=int(d_ff), max_len=int(max_len),
    )
