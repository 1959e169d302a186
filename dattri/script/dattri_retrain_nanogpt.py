"""``dattri_retrain_nanogpt``, at its published module path."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dattri.benchmark.cli import retrain_nanogpt_main

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the nanoGPT retraining command (the published arguments)."""
    return retrain_nanogpt_main(argv)


if __name__ == "__main__":
    sys.exit(main())
