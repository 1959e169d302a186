"""Model-level utilities: dropout ensembles, hooks, retraining.

Submodules (imported on first access, so importing this package is cheap):
:mod:`dattri.model_util.dropout`, :mod:`dattri.model_util.hook`,
:mod:`dattri.model_util.retrain`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["dropout", "hook", "retrain"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
