"""Typed settings objects (dataclasses validated on construction).

:mod:`dattri.params.projection` holds the projection settings of the attributors
and of :func:`dattri.func.projection.random_project`.
"""

from dattri.params.projection import (
    DVEmbProjectionParams,
    FactGrassProjectionParams,
    LoGraProjectionParams,
    RandomProjectionParams,
    TracInProjectionParams,
    TRAKProjectionParams,
)

__all__ = [
    "DVEmbProjectionParams",
    "FactGrassProjectionParams",
    "LoGraProjectionParams",
    "RandomProjectionParams",
    "TRAKProjectionParams",
    "TracInProjectionParams",
]
