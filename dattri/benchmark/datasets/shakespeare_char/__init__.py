"""Shakespeare + nanoGPT benchmark setting (paper, Table 3 and Appendix C).

* :func:`create_shakespeare_dataset`: character blocks of Tiny Shakespeare
  (``path=``) or, offline, of eight plays from the ``shakespeare`` package
  (Project Gutenberg texts, Open Knowledge Foundation, CC BY 2.5).
* :func:`create_nanogpt_model`, :func:`train_shakespeare_nanogpt`,
  :func:`loss_shakespeare_nanogpt`.
"""

from dattri.benchmark.datasets.shakespeare_char.data import (
    CharBlockDataset,
    CharVocab,
    create_shakespeare_dataset,
    load_shakespeare_text,
)
from dattri.benchmark.datasets.shakespeare_char.model import (
    NanoGPT,
    create_nanogpt_model,
    nanogpt_from_state_dict,
    nanogpt_num_params,
)
from dattri.benchmark.datasets.shakespeare_char.shakespeare_nanogpt import (
    loss_shakespeare_nanogpt,
    train_shakespeare_nanogpt,
)

__all__ = [
    "CharBlockDataset",
    "CharVocab",
    "NanoGPT",
    "create_nanogpt_model",
    "create_shakespeare_dataset",
    "load_shakespeare_text",
    "loss_shakespeare_nanogpt",
    "nanogpt_from_state_dict",
    "nanogpt_num_params",
    "train_shakespeare_nanogpt",
]
