"""Write TinyStories as the published nanoGPT files: ``train.bin`` / ``val.bin``
(``uint16`` character ids, first 90% / rest of the text) and ``meta.pkl``
(``{"vocab_size", "itos", "stoi"}``).

``python -m dattri.benchmark.datasets.tinystories.prepare --data_file FILE
--out_dir DIR`` (the published script wrote next to itself, inside the installed
package; here ``--out_dir``, default the current folder). Importing this module
runs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from dattri.benchmark.datasets.shakespeare_char.prepare import prepare_cli, write_char_bins
from dattri.benchmark.datasets.tinystories.data import TINYSTORIES_FILE, find_tinystories_file

__all__ = ["main", "prepare"]


def prepare(data_file: str | os.PathLike | None, out_dir: str | os.PathLike = ".",
            train_fraction: float = 0.9) -> dict[str, int]:
    """Encode the text and write the three files into ``out_dir``
    (:func:`~dattri.benchmark.datasets.shakespeare_char.prepare.write_char_bins`).

    Returns:
        ``{"vocab_size", "train_tokens", "val_tokens"}``.

    Raises:
        TinyStoriesNotFoundError: ``data_file`` is not there.
    """
    text = find_tinystories_file(data_file).read_text(encoding="utf-8")
    return write_char_bins(text, out_dir, train_fraction)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--data_file`` (default ``TinyStoriesV2-GPT4-train.txt``), ``--out_dir``."""
    return prepare_cli(argv, prepare, TINYSTORIES_FILE, __doc__.splitlines()[0])


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
