"""``dattri_retrain``, at its published module path (``python -m dattri.script.dattri_retrain``).

The published tables are kept as the names of what this command supports: its
``--model`` / ``--dataset`` values, the setting -> train function, dataset and
batch-size maps, and the two retraining modes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from dattri.benchmark.cli import _key_value as key_value_pair
from dattri.benchmark.cli import _partition as partition_type
from dattri.benchmark.cli import retrain_main
from dattri.benchmark.load import SUPPORTED_DATASETS, TRAIN_FUNC_MAP, _LazyMap
from dattri.benchmark.settings import PUBLISHED_SETTINGS, SETTINGS

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "SUPPORTED_DATASETS",
    "SUPPORTED_MODELS",
    "SUPPORTED_RETRAINING_MODE",
    "SUPPORTED_SETTINGS",
    "key_value_pair",
    "main",
    "partition_type",
]

_ALL = {**SETTINGS, **PUBLISHED_SETTINGS}
#: ``--model`` values
SUPPORTED_MODELS = sorted({s.model for s in _ALL.values()})
#: setting -> its published train function ``train(dataloader, seed=, device=)``
SUPPORTED_SETTINGS = TRAIN_FUNC_MAP
#: ``--mode`` -> retraining function
SUPPORTED_RETRAINING_MODE = _LazyMap({"loo": ("dattri.model_util.retrain:retrain_loo",),
                                      "lds": ("dattri.model_util.retrain:retrain_lds",)})
#: setting -> training batch size (the paper's Appendix C)
DEFAULT_BATCH_SIZE = {name: s.batch_size for name, s in _ALL.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the retraining command (the published ``dattri_retrain`` arguments)."""
    return retrain_main(argv)


if __name__ == "__main__":
    sys.exit(main())
