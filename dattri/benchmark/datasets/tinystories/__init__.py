"""TinyStories (Eldan & Li 2023) for the published nanoGPT TinyStories configuration.

:func:`create_tinystories_dataset` reads ``TinyStoriesV2-GPT4-train.txt`` (from
``path=``, else ``$DATTRI_DATA/tinystories/``, else
``~/.cache/dattri/data/tinystories/``) and splits it into character blocks as the
Shakespeare setting does. No package ships TinyStories and nothing is downloaded:
without the file, a :class:`TinyStoriesNotFoundError` says where to put it.
:mod:`~dattri.benchmark.datasets.tinystories.prepare` writes the published
``train.bin`` / ``val.bin`` / ``meta.pkl``.
"""

from dattri.benchmark.datasets.tinystories.data import (
    TINYSTORIES_FILE,
    TinyStoriesNotFoundError,
    create_tinystories_dataset,
    find_tinystories_file,
)

__all__ = [
    "TINYSTORIES_FILE",
    "TinyStoriesNotFoundError",
    "create_tinystories_dataset",
    "find_tinystories_file",
]
