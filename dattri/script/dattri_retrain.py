"""``dattri_retrain``, at its published module path (``python -m dattri.script.dattri_retrain``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dattri.benchmark.cli import _key_value as key_value_pair
from dattri.benchmark.cli import _partition as partition_type
from dattri.benchmark.cli import retrain_main

__all__ = ["key_value_pair", "main", "partition_type"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the retraining command (the published ``dattri_retrain`` arguments)."""
    return retrain_main(argv)


if __name__ == "__main__":
    sys.exit(main())
