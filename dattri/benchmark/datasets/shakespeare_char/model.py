"""nanoGPT (Karpathy 2022), a GPT-2-style decoder, at the size of the paper's
Shakespeare setting (Appendix C: 6 layers, 6 heads, n_embd 384, block 256;
about 10.7M parameters with the 65-character Tiny Shakespeare vocabulary).

For ``(B, T)`` token ids, ``h_0 = wte[idx] + wpe[0..T-1]``, then per block

    h = h + Proj(CausalSelfAttention(LN_1(h))),  h = h + MLP(LN_2(h)),

``MLP(z) = W_2 GELU(W_1 z)`` with a 4x hidden width, a final LayerNorm and
logits ``LN_f(h) wte^T`` (the read-out shares the token embedding). Attention
is ``softmax(q k^T / sqrt(d_head) + M) v`` with the causal mask ``M``, written
out (torch's fused attention has no ``vmap`` batching rule on CPU).
Initialisation as GPT-2: weights ``N(0, 0.02)``, the residual projections
``N(0, 0.02 / sqrt(2 n_layer))``, biases zero. Parameter names follow nanoGPT
(``transformer.h.0.attn.c_attn.weight`` ...), so its ``state_dict`` files load.
Pure tensor ops: ``functional_call`` and ``vmap(grad(...))`` work in eval mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from dattri.errors import CheckpointError, DattriValueError

__all__ = ["NanoGPT", "create_nanogpt_model", "nanogpt_from_state_dict", "nanogpt_num_params"]


class _LayerNorm(nn.Module):
    """LayerNorm with an optional bias (as nanoGPT's ``bias=False``)."""

    def __init__(self, dim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class _CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.attn_dropout = nn.Dropout(dropout)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.reshape(b, t, self.n_head, c // self.n_head).transpose(1, 2)
            for z in self.c_attn(x).split(c, dim=2)
        )
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.n_head)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        y = self.attn_dropout(att) @ v
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))


class _MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class _Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(n_embd, bias)
        self.attn = _CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = _LayerNorm(n_embd, bias)
        self.mlp = _MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """``(B, T)`` character ids, ``T <= block_size`` -> ``(B, T, vocab_size)`` logits."""

    def __init__(
        self,
        vocab_size: int = 65,
        block_size: int = 256,
        n_layer: int = 6,
        n_head: int = 6,
        n_embd: int = 384,
        dropout: float = 0.2,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab_size, n_embd),
            "wpe": nn.Embedding(block_size, n_embd),
            "drop": nn.Dropout(dropout),
            "h": nn.ModuleList(_Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)),
            "ln_f": _LayerNorm(n_embd, bias),
        })
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layer))
            elif p.ndim == 2:  # noqa: PLR2004
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` int64 -> ``(B, T, vocab_size)`` logits for every position."""
        t = idx.shape[-1]
        if t > self.block_size:
            msg = (
                f"idx: sequence length {t} exceeds block_size={self.block_size}; cut the "
                "input or build the model with a larger block_size."
            )
            raise DattriValueError(msg)
        pos = torch.arange(t, device=idx.device)
        h = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            h = block(h)
        return self.lm_head(self.transformer.ln_f(h))


def nanogpt_num_params(
    vocab_size: int = 65,
    block_size: int = 256,
    n_layer: int = 6,
    n_embd: int = 384,
    bias: bool = False,
) -> int:
    """Closed-form parameter count of :class:`NanoGPT` (tied read-out counted once).

    ``V d + T d + n_layer (12 d^2 + 2 d [+ 11 d biases]) + d [+ d]``:
    10,745,088 at the paper's size with ``V = 65``, ``bias=False``.
    """
    d = n_embd
    per_layer = 12 * d * d + 2 * d + (11 * d if bias else 0)
    return vocab_size * d + block_size * d + n_layer * per_layer + d + (d if bias else 0)


def create_nanogpt_model(
    device: str | torch.device = "cpu",
    *,
    vocab_size: int = 65,
    block_size: int = 256,
    n_layer: int = 6,
    n_head: int = 6,
    n_embd: int = 384,
    dropout: float = 0.2,
    bias: bool = False,
) -> NanoGPT:
    """Create a nanoGPT (defaults: the ``shakespeare_char`` configuration of nanoGPT).

    Args:
        device: where to put it.
        vocab_size: characters (65 for Tiny Shakespeare; use ``len(train.vocab)``).
        block_size, n_layer, n_head, n_embd: sizes (paper: 256, 6, 6, 384).
        dropout: dropout rate (nanoGPT's shakespeare_char config: 0.2).
        bias: biases in Linear / LayerNorm (nanoGPT's default: False).

    Returns:
        The model, in training mode.

    Raises:
        DattriValueError: a size is not a positive int, ``n_embd % n_head != 0``
            or ``dropout`` is outside ``[0, 1)``.
    """
    sizes = {"vocab_size": vocab_size, "block_size": block_size, "n_layer": n_layer,
             "n_head": n_head, "n_embd": n_embd}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            msg = f"{name}: expected a positive int, got {value!r}."
            raise DattriValueError(msg)
    if n_embd % n_head:
        msg = f"n_embd / n_head: n_embd={n_embd} is not divisible by n_head={n_head}."
        raise DattriValueError(msg)
    if not 0.0 <= float(dropout) < 1.0:
        msg = f"dropout: expected a rate in [0, 1), got {dropout!r}."
        raise DattriValueError(msg)
    return NanoGPT(vocab_size, block_size, n_layer, n_head, n_embd, dropout, bias).to(device)


def nanogpt_from_state_dict(
    state: Mapping[str, torch.Tensor], n_head: int | None = None,
) -> NanoGPT:
    """A :class:`NanoGPT` whose sizes are read off a state dict (weights not loaded).

    ``vocab_size, n_embd`` from ``transformer.wte.weight``, ``block_size`` from
    ``transformer.wpe.weight``, ``n_layer`` from the ``transformer.h.<i>`` keys,
    ``bias`` from ``transformer.ln_f.bias``. The head count is not in the
    weights: default ``n_embd / 64`` (GPT-2's 64-dimensional heads; 6 at the
    paper's n_embd 384).

    Raises:
        CheckpointError: not a nanoGPT state dict, or ``n_embd`` not a multiple
            of 64 without ``n_head``.
    """
    try:
        vocab_size, n_embd = state["transformer.wte.weight"].shape
        block_size = state["transformer.wpe.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        msg = f"checkpoint: not a nanoGPT state dict (missing or odd {exc}); pass model=."
        raise CheckpointError(msg) from exc
    if n_head is None:
        if n_embd % 64:
            msg = (
                f"checkpoint: cannot infer n_head for n_embd={n_embd} (not a multiple of 64); "
                "pass model= the nanoGPT the checkpoint belongs to."
            )
            raise CheckpointError(msg)
        n_head = int(n_embd) // 64
    layers = {int(k.split(".")[2]) for k in state if k.startswith("transformer.h.")}
    return create_nanogpt_model(
        vocab_size=int(vocab_size), block_size=int(block_size), n_layer=len(layers),
        n_head=n_head, n_embd=int(n_embd), bias="transformer.ln_f.bias" in state,
    )
