"""Typed errors raised by dattri.

Every error names the argument, the bad value and the fix. They subclass the
builtin ``ValueError`` / ``RuntimeError`` so that ``except ValueError`` keeps
working for callers that do not know dattri's types.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "DattriError",
    "DattriRuntimeError",
    "DattriValueError",
    "DeviceError",
    "GroundTruthError",
    "InvalidBatchError",
    "InvalidLossError",
    "LayerNameError",
    "LoaderError",
    "LoaderMismatchError",
    "MemoryBudgetError",
    "NonFiniteError",
    "NotCachedError",
    "OnePassLoaderError",
    "ShuffledLoaderError",
    "StoreError",
]


class DattriError(Exception):
    """Base class of every error that dattri raises on purpose."""


class DattriValueError(DattriError, ValueError):
    """A user-supplied argument has a bad value."""


class DattriRuntimeError(DattriError, RuntimeError):
    """A computation cannot go on (memory, numerics, files)."""


class InvalidLossError(DattriValueError):
    """``loss_func`` / ``target_func`` does not return a scalar on a batch of one."""


class LoaderError(DattriValueError):
    """A data loader cannot be used as given (empty, one-pass, shuffled, ...)."""


class ShuffledLoaderError(LoaderError):
    """A data loader iterates in a random order."""


class OnePassLoaderError(LoaderError):
    """A loader is a one-pass iterable (a generator or iterator): dattri iterates
    its loaders more than once, so the first pass would consume it."""


class LoaderMismatchError(LoaderError):
    """A train loader given to ``attribute`` differs from the one given to ``cache``."""


class InvalidBatchError(DattriValueError):
    """A batch of a loader does not fit the model (feature size, label range, ...)."""


class DeviceError(DattriValueError):
    """The requested device is not available in this torch build or machine."""


class LayerNameError(DattriValueError):
    """``layer_name`` names parameters that the model does not have."""


class CheckpointError(DattriValueError):
    """A checkpoint cannot be loaded into the model."""


class NotCachedError(DattriRuntimeError):
    """An attributor method needs ``cache()`` to have run first."""


class MemoryBudgetError(DattriRuntimeError):
    """A dense object would not fit in the memory budget."""


class NonFiniteError(DattriRuntimeError):
    """Gradients, curvature or scores contain NaN or inf."""


class GroundTruthError(DattriValueError):
    """Ground truth or a retraining folder is missing, corrupt or mismatched."""


class StoreError(DattriValueError):
    """A feature store on disk (``dattri.store``) disagrees with the run that opens
    it (other data, settings, dimension or dtype) or is damaged."""
