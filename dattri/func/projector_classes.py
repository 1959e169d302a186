"""The published projector classes, on dattri's projections.

``BasicProjector`` and ``CudaProjector`` are one class here (no compiled CUDA
kernel is needed: every projection type is plain PyTorch on any device);
``ChunkedCudaProjector`` projects a gradient given in column chunks as the sum of
the chunks' projections (the projection of the whole by the stacked matrix);
``ArnoldiProjector`` is :func:`dattri.func.projection.arnoldi_project` as an object;
``make_random_projector`` builds a ``BasicProjector`` for features of the given
parameter sizes. Same ``seed`` and ``ensemble_id`` give the same projection on any
batch split.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import Enum

import torch

from dattri.errors import DattriValueError

__all__ = [
    "AbstractProjector",
    "ArnoldiProjector",
    "BasicProjector",
    "ChunkedCudaProjector",
    "CudaProjector",
    "ProjectionType",
    "make_random_projector",
]


class ProjectionType(str, Enum):
    """Projection types (the values are dattri's ``proj_type`` strings)."""

    identity = "identity"
    normal = "normal"
    rademacher = "rademacher"
    sjlt = "sjlt"
    random_mask = "random_mask"
    grass = "grass"


def _matrix(features: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(features, Mapping):
        parts = list(features.values())
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)
    return features.reshape(features.shape[0], -1) if features.dim() != 2 else features


class AbstractProjector(ABC):
    """Base class: ``project(features, ensemble_id) -> (B, proj_dim)``.

    Args:
        feature_dim: ``P``, the size of one feature vector.
        proj_dim: ``k``.
        seed: seed of the projection.
        proj_type: a :class:`ProjectionType` or its string.
        device: where the projection is computed.
    """

    @abstractmethod
    def __init__(self, feature_dim: int, proj_dim: int, seed: int,
                 proj_type: ProjectionType | str, device: torch.device | str) -> None:
        self.feature_dim, self.proj_dim, self.seed = int(feature_dim), int(proj_dim), int(seed)
        self.proj_type = ProjectionType(proj_type)
        self.device = torch.device(device)

    @abstractmethod
    def project(self, features: torch.Tensor | Mapping[str, torch.Tensor], ensemble_id: int) -> torch.Tensor:
        """Projected features ``(B, proj_dim)``."""

    def free_memory(self) -> None:  # noqa: B027 - optional hook
        """Release cached random blocks."""


class BasicProjector(AbstractProjector):
    """A random projection of any type (see :func:`dattri.func.projection.get_projector`).

    Args:
        feature_dim, proj_dim, seed, proj_type, device: as :class:`AbstractProjector`.
        block_size: rows projected at once.
        dtype: dtype the features are cast to.
        ensemble_id: default ensemble id of :meth:`project`.
        grass_multiplier: ``"grass"``: intermediate mask size ``grass_multiplier * k``.
    """

    def __init__(self, feature_dim: int, proj_dim: int, seed: int,
                 proj_type: ProjectionType | str, device: torch.device | str,
                 block_size: int = 100, dtype: torch.dtype = torch.float32,
                 ensemble_id: int = 0, grass_multiplier: int = 4) -> None:
        super().__init__(feature_dim, proj_dim, seed, proj_type, device)
        from dattri.func.projection import get_projector

        self.dtype, self.ensemble_id = dtype, int(ensemble_id)
        extra = {}
        if self.proj_type is ProjectionType.grass:
            extra["grass_dim"] = min(self.feature_dim, int(grass_multiplier) * self.proj_dim)
        self._projector = get_projector(self.proj_type.value, self.feature_dim, self.proj_dim,
                                        self.seed, self.device, dtype,
                                        max_batch_size=int(block_size), **extra)

    def project(self, features: torch.Tensor | Mapping[str, torch.Tensor],
                ensemble_id: int | None = None) -> torch.Tensor:
        """Projected features ``(B, proj_dim)`` (ensemble ``ensemble_id``)."""
        x = _matrix(features).to(self.device)
        if x.shape[1] != self.feature_dim:
            msg = (f"features have {x.shape[1]} columns but the projector was built for "
                   f"feature_dim={self.feature_dim}.")
            raise DattriValueError(msg)
        eid = self.ensemble_id if ensemble_id is None else int(ensemble_id)
        return self._projector.project(x, eid)

    def free_memory(self) -> None:
        """Release cached random blocks."""
        self._projector.clear_cache()


class CudaProjector(BasicProjector):
    """The published CUDA projector's interface; plain PyTorch on any device here.

    Args:
        feature_dim, proj_dim, seed, proj_type, device, dtype, grass_multiplier:
            as :class:`BasicProjector`.
        max_batch_size: rows projected at once.
    """

    def __init__(self, feature_dim: int, proj_dim: int, seed: int,
                 proj_type: ProjectionType | str, device: torch.device | str,
                 dtype: torch.dtype = torch.float32, grass_multiplier: int = 4,
                 max_batch_size: int = 32) -> None:
        super().__init__(feature_dim, proj_dim, seed, proj_type, device, block_size=max_batch_size,
                         dtype=dtype, grass_multiplier=grass_multiplier)


class ChunkedCudaProjector:
    """A projection of features given in column chunks: ``sum_c P_c(x_c)``.

    Args:
        projector_per_chunk: one projector (``project(x, ensemble_id)``) per chunk,
            all to the same ``proj_dim``.
        max_chunk_size: the largest chunk (kept for the published signature).
        dim_per_chunk: the number of columns of each chunk.
        feature_batch_size: rows of a batch.
        device: where the result is.
        dtype: dtype of the result.
    """

    def __init__(self, projector_per_chunk: Sequence, max_chunk_size: int,
                 dim_per_chunk: Sequence[int], feature_batch_size: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        if len(projector_per_chunk) != len(dim_per_chunk):
            msg = (f"projector_per_chunk has {len(projector_per_chunk)} projectors but "
                   f"dim_per_chunk has {len(dim_per_chunk)} sizes; pass one per chunk.")
            raise DattriValueError(msg)
        self.projector_per_chunk, self.dim_per_chunk = list(projector_per_chunk), list(dim_per_chunk)
        self.max_chunk_size, self.feature_batch_size = max_chunk_size, feature_batch_size
        self.device, self.dtype = torch.device(device), dtype

    def project(self, features: torch.Tensor | Mapping[str, torch.Tensor], ensemble_id: int) -> torch.Tensor:
        """``sum_c P_c(features[:, chunk c])`` as ``(B, proj_dim)``."""
        x = _matrix(features)
        if x.shape[1] != sum(self.dim_per_chunk):
            msg = (f"features have {x.shape[1]} columns but the chunks sum to "
                   f"{sum(self.dim_per_chunk)}.")
            raise DattriValueError(msg)
        out, start = None, 0
        for proj, d in zip(self.projector_per_chunk, self.dim_per_chunk):
            part = proj.project(x[:, start:start + d], ensemble_id).to(self.device, self.dtype)
            out = part if out is None else out + part
            start += d
        return out

    dict_project = project

    def free_memory(self) -> None:
        """Release every chunk projector's cache."""
        for p in self.projector_per_chunk:
            getattr(p, "free_memory", lambda: None)()


class ArnoldiProjector(AbstractProjector):
    """Projection on the top Hessian eigenspace scaled by ``lambda^(-1/2)`` (the
    object form of :func:`dattri.func.projection.arnoldi_project`)."""

    def __init__(self, feature_dim: int, proj_dim: int, func: Callable, x: tuple,
                 argnums: int = 0, max_iter: int = 100, norm_constant: float = 1.0,
                 tol: float = 1e-7, mode: str = "rev-fwd", regularization: float = 0.0,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        super().__init__(feature_dim, proj_dim, seed, "identity", device)
        self.func, self.x, self.argnums = func, x, argnums
        self.max_iter, self.norm_constant, self.tol = max_iter, norm_constant, tol
        self.mode, self.regularization = mode, regularization
        self._project: Callable | None = None

    def get_eigenspace(self) -> None:
        """Run the Arnoldi iteration (once)."""
        from dattri.func.projection import arnoldi_project

        self._project = arnoldi_project(
            self.feature_dim, self.func, self.x, argnums=self.argnums, proj_dim=self.proj_dim,
            tol=self.tol, max_iter=self.max_iter, norm_constant=self.norm_constant,
            device=self.device, regularization=self.regularization, mode=self.mode,
            seed=self.seed)

    def project(self, features: torch.Tensor | Mapping[str, torch.Tensor],
                ensemble_id: int = 0) -> torch.Tensor:  # noqa: ARG002 - deterministic
        """Projected features ``(B, r)``."""
        if self._project is None:
            self.get_eigenspace()
        return self._project(_matrix(features).to(self.device))

    def free_memory(self) -> None:
        """Forget the eigenspace."""
        self._project = None


def make_random_projector(param_shape_list: Sequence[int], feature_batch_size: int, proj_dim: int,
                          proj_max_batch_size: int, device: torch.device | str, proj_seed: int = 0,
                          proj_type: ProjectionType | str = ProjectionType.sjlt, *,
                          dtype: torch.dtype = torch.float32, grass_multiplier: int = 4,
                          ) -> BasicProjector:
    """A projector for features made of parameters of the given sizes (their sum is
    ``P``); ``feature_batch_size`` is kept for the published signature."""
    del feature_batch_size
    p = int(sum(int(s) for s in param_shape_list))
    return BasicProjector(p, proj_dim, proj_seed, proj_type, device, block_size=proj_max_batch_size,
                          dtype=dtype, grass_multiplier=grass_multiplier)
