"""Typed, validated projection settings for the attributors and ``random_project``.

Each class is a dataclass whose constructor rejects unknown fields (with the list of
valid ones) and bad values (a :class:`~dattri.errors.DattriValueError` naming the
field and the value). ``as_kwargs()`` gives the keyword arguments of
:func:`dattri.func.projection.random_project` (the ``projector_kwargs`` of the
paper's Demo 3); ``to_dict()`` gives every field.

Defaults follow the published dattri: TracIn and TRAK project to 512 dimensions
(``proj_max_batch_size=32``), LoGra and FactGraSS to 4096 per layer, all with a
Gaussian (``"normal"``) projection and seed 0.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import torch

from dattri.errors import DattriValueError

__all__ = [
    "DVEmbProjectionParams",
    "FactGrassProjectionParams",
    "LoGraProjectionParams",
    "ProjType",
    "RandomProjectionParams",
    "TRAKProjectionParams",
    "TracInProjectionParams",
]

ProjType = Literal["identity", "normal", "rademacher", "sjlt", "random_mask", "grass"]
#: ``tensorsketch``: a count sketch hashed per layer (dattri.func.sketch.SketchLayout),
#: linear and convolution layers sketched from their factors where cheaper
_PROJ_TYPES = (*get_args(ProjType), "tensorsketch")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _strict(cls: type) -> type:
    """Make ``cls`` a dataclass whose constructor names unknown fields in its error."""
    cls = dataclass(cls)
    init = cls.__init__
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    aliases: dict[str, str] = getattr(cls, "_aliases", {})

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        if len(args) > len(names):
            msg = f"{cls.__name__} takes at most {len(names)} positional values ({names}), got {len(args)}"
            raise DattriValueError(msg)
        for alias, target in aliases.items():
            if alias in kwargs:
                if target in kwargs:
                    msg = f"{cls.__name__}: pass {target} or its alias {alias}, not both"
                    raise DattriValueError(msg)
                kwargs[target] = kwargs.pop(alias)
        unknown = [k for k in kwargs if k not in names]
        if unknown:
            valid = names + list(aliases)
            msg = f"{cls.__name__} got unknown field(s) {unknown}; valid fields: {valid}"
            raise DattriValueError(msg)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


class _ProjectionParams:
    """Shared validation and conversion; subclasses are :func:`_strict` dataclasses."""

    _aliases: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        name = type(self).__name__
        present = {f.name for f in dataclasses.fields(self)}
        for key in ("proj_dim", "proj_dim_per_layer", "proj_max_batch_size", "feature_batch_size"):
            if key not in present:
                continue
            value = getattr(self, key)
            if value is None and key in self._optional():
                continue
            if not _is_int(value) or value < 1:
                msg = f"{name}.{key} must be a positive int, got {value!r}"
                raise DattriValueError(msg)
        if not _is_int(self.proj_seed) or self.proj_seed < 0:
            msg = f"{name}.proj_seed must be an int >= 0, got {self.proj_seed!r}"
            raise DattriValueError(msg)
        if self.proj_type not in _PROJ_TYPES:
            msg = f"{name}.proj_type must be one of {list(_PROJ_TYPES)}, got {self.proj_type!r}"
            raise DattriValueError(msg)
        if "device" in present:
            self.device = _device_str(name, self.device)

    @classmethod
    def _optional(cls) -> tuple[str, ...]:
        return ()

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a dict; unknown keys raise :class:`DattriValueError`."""
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        """Every field, by name."""
        return dataclasses.asdict(self)

    def as_kwargs(self, device: str | torch.device | None = None) -> dict[str, Any]:
        """Keyword arguments of ``random_project``: ``proj_dim``,
        ``proj_max_batch_size``, ``proj_seed``, ``proj_type`` (and ``device``: the
        argument if given, else this object's own ``device`` field if it has one).
        """
        out = {
            "proj_dim": self.proj_dim,
            "proj_max_batch_size": self.proj_max_batch_size,
            "proj_seed": self.proj_seed,
            "proj_type": self.proj_type,
        }
        dev = device if device is not None else getattr(self, "device", None)
        if dev is not None:
            out["device"] = _device_str(type(self).__name__, dev)
        return out


def _device_str(owner: str, device: object) -> str:
    try:
        return str(torch.device(device))
    except (RuntimeError, TypeError) as exc:
        msg = f"{owner}.device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        raise DattriValueError(msg) from exc


@_strict
class TracInProjectionParams(_ProjectionParams):
    """Projection of TracIn / Grad-Dot / Grad-Cos gradients.

    Args:
        proj_dim: output dimension ``k``.
        proj_max_batch_size: rows projected at once.
        proj_seed: seed of the random matrix.
        proj_type: projection type (see :mod:`dattri.func.projection`).
    """

    proj_dim: int = 512
    proj_max_batch_size: int = 32
    proj_seed: int = 0
    proj_type: ProjType = "normal"


@_strict
class TRAKProjectionParams(_ProjectionParams):
    """Projection of TRAK gradients (Park et al. 2023 use ``k`` in 512..20480).

    Args:
        proj_dim: output dimension ``k``.
        proj_max_batch_size: rows projected at once.
        proj_seed: seed of the random matrix (checkpoint ``c`` uses ensemble id ``c``).
        proj_type: projection type.
    """

    proj_dim: int = 512
    proj_max_batch_size: int = 32
    proj_seed: int = 0
    proj_type: ProjType = "normal"


@_strict
class RandomProjectionParams(_ProjectionParams):
    """All arguments of ``random_project`` but the features.

    Args:
        proj_dim: output dimension ``k``.
        proj_max_batch_size: rows projected at once.
        proj_seed: seed.
        proj_type: projection type.
        device: generator device.
        feature_batch_size: batch size of the features (optional; not part of
            ``as_kwargs()``, pass it positionally to ``random_project``).
    """

    proj_dim: int = 512
    proj_max_batch_size: int = 32
    proj_seed: int = 0
    proj_type: ProjType = "normal"
    device: str = "cpu"
    feature_batch_size: int | None = None

    @classmethod
    def _optional(cls) -> tuple[str, ...]:
        return ("feature_batch_size",)


class _PerLayerParams(_ProjectionParams):
    """Per-layer projections; ``proj_dim`` is an alias of ``proj_dim_per_layer``."""

    _aliases: ClassVar[dict[str, str]] = {"proj_dim": "proj_dim_per_layer"}

    @property
    def proj_dim(self) -> int | None:
        """Alias of ``proj_dim_per_layer``."""
        return self.proj_dim_per_layer


@_strict
class LoGraProjectionParams(_PerLayerParams):
    """LoGra (Choe et al. 2024): per-layer factored projections.

    Args:
        proj_dim_per_layer: output dimension per layer (alias ``proj_dim``).
        proj_max_batch_size: rows projected at once.
        proj_seed: seed.
        proj_type: projection type of the factors.
    """

    proj_dim_per_layer: int = 4096
    proj_max_batch_size: int = 64
    proj_seed: int = 0
    proj_type: ProjType = "normal"


@_strict
class FactGrassProjectionParams(_PerLayerParams):
    """FactGraSS (Hu et al. 2025): factored sparse per-layer projections.

    Args:
        proj_dim_per_layer: output dimension per layer (alias ``proj_dim``).
        proj_max_batch_size: rows projected at once.
        proj_seed: seed.
        proj_type: projection type.
    """

    proj_dim_per_layer: int = 4096
    proj_max_batch_size: int = 64
    proj_seed: int = 0
    proj_type: ProjType = "normal"


@_strict
class DVEmbProjectionParams(_PerLayerParams):
    """DVEmb (Wang et al. 2024); ``proj_dim_per_layer=None`` means no projection.

    Args:
        proj_dim_per_layer: output dimension per layer or ``None``.
        proj_max_batch_size: rows projected at once.
        proj_seed: seed.
        proj_type: projection type (default ``"identity"``).
    """

    proj_dim_per_layer: int | None = None
    proj_max_batch_size: int = 64
    proj_seed: int = 0
    proj_type: ProjType = "identity"

    @classmethod
    def _optional(cls) -> tuple[str, ...]:
        return ("proj_dim_per_layer",)

