"""GPT-2 for the WikiText-2 setting, at its published module path.

Built from a ``transformers.GPT2Config`` (no download): the published package
downloaded the pretrained ``openai-community/gpt2`` weights, which cannot be
reached offline; pass ``pretrained=`` a local folder (``from_pretrained``) for them.
Needs the optional extra ``pip install "dattri[hf]"``.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from dattri.errors import DattriValueError

__all__ = ["create_gpt2_model", "require_transformers"]

#: GPT-2 small (124M parameters), the published setting's model
GPT2_SMALL = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": 50257}


def require_transformers() -> Any:
    """The ``transformers`` module, or a typed error that says how to install it."""
    try:
        import transformers
    except ImportError as e:
        msg = ("the GPT-2 / WikiText-2 setting needs the transformers package: "
               'pip install "dattri[hf]" (or pip install "transformers>=4.40").')
        raise DattriValueError(msg) from e
    return transformers


def create_gpt2_model(pretrained: str | os.PathLike | None = None, **config: Any) -> nn.Module:
    """A ``GPT2LMHeadModel``: from a local ``pretrained`` folder, else newly
    initialised from ``GPT2Config(**{**GPT2_SMALL, **config})`` (e.g.
    ``n_layer=2, n_embd=64`` for a small one)."""
    tf = require_transformers()
    if pretrained is not None:
        if not os.path.isdir(pretrained):
            msg = (f"pretrained={os.fspath(pretrained)!r} is not a folder; pass a local "
                   "save_pretrained() folder of GPT-2, or None for a new model.")
            raise DattriValueError(msg)
        return tf.GPT2LMHeadModel.from_pretrained(os.fspath(pretrained))
    return tf.GPT2LMHeadModel(tf.GPT2Config(**{**GPT2_SMALL, **config}))
