"""Random projections of per-example features, and the Arnoldi projection.

A projector maps a batch of features ``X`` of shape ``(B, P)`` to ``X @ M`` of shape
``(B, k)``, where ``M`` is a random ``(P, k)`` matrix fixed by ``(seed, ensemble_id)``
and scaled so that ``E[<x M, y M>] = <x, y>`` (Johnson-Lindenstrauss; Achlioptas
2003; TRAK, Park et al. 2023). Features may be a ``(B, P)`` tensor (more dimensions
are flattened from dim 1) or a dict ``name -> (B, ...)`` tensors, flattened and
concatenated in dict order.

Projection types (``proj_type``):

- ``"identity"``: ``M = I``; ``proj_dim`` is ignored and the output is ``(B, P)``.
- ``"normal"``: ``M_ij ~ N(0, 1) / sqrt(k)``.
- ``"rademacher"``: ``M_ij = +-1 / sqrt(k)`` with equal probability.
- ``"sjlt"``: sparse JL transform (Kane and Nelson 2014): every input coordinate is
  sent to ``c`` distinct output coordinates (one in each of ``c`` contiguous blocks of
  the output) with independent random signs, scaled by ``1 / sqrt(c)``.
- ``"random_mask"``: keep ``k`` distinct random coordinates, scaled by
  ``sqrt(P / k)``.
- ``"grass"``: GraSS (Hu et al. 2025): a random mask to ``m`` coordinates (default
  ``min(P, 4 k)``) followed by an SJLT from ``m`` to ``k``.

Memory and reproducibility: dense matrices are never stored whole. ``M`` is cut
into row blocks of ``rows = max(1, block_bytes // (4 k))`` rows; block ``b`` is drawn
in float32 from a ``torch.Generator`` on ``device`` (the *generator* device, CPU by
default) seeded by a hash of ``(seed, ensemble_id, b)``, moved to the features'
device and cast to their dtype, and ``X[:, block] @ M_block`` is accumulated. Blocks
are cached (on the features' device) while the cache stays under ``cache_bytes``, so
repeated calls do not regenerate them. The projection therefore depends only on
``(proj_type, P, k, seed, ensemble_id, block_bytes, device)``: not on the batch size,
the batch split, the call, the features' device or their dtype (float64 features see
the same float32-valued matrix). Sparse projections draw their indices and signs the
same way. Everything runs as plain PyTorch on CPU or CUDA; no compiled extension.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from dattri._warn import warn_user
from dattri.errors import DattriValueError

__all__ = [
    "DenseProjector",
    "GraSSProjector",
    "IdentityProjector",
    "ProjType",
    "Projector",
    "RandomMaskProjector",
    "SJLTProjector",
    "arnoldi_project",
    "clear_projector_cache",
    "get_projector",
    "random_project",
]

ProjType = Literal["identity", "normal", "rademacher", "sjlt", "random_mask", "grass"]
PROJ_TYPES: tuple[str, ...] = get_args(ProjType)

_DEFAULT_BLOCK_BYTES = 16 * 2**20
_DEFAULT_CACHE_BYTES = 256 * 2**20
_SEED_MASK = (1 << 63) - 1


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every platform and run."""
    text = ",".join(str(int(p)) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8).digest()
    return int.from_bytes(digest, "little") & _SEED_MASK


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_derive_seed(*parts))
    return gen


def _check_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        msg = f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {name}={max(minimum, 1)}"
        raise DattriValueError(msg)
    return value


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        msg = f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}"
        raise DattriValueError(msg) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        msg = f"device={device!r} but CUDA is not available here; pass device='cpu'"
        raise DattriValueError(msg)
    return dev


def _as_matrix(features: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Features as a ``(B, P)`` matrix: dict values flattened and concatenated."""
    if isinstance(features, Mapping):
        if not features:
            msg = "features is an empty dict; pass name -> (B, ...) tensors"
            raise DattriValueError(msg)
        parts = [_as_matrix(v) for v in features.values()]
        sizes = {p.shape[0] for p in parts}
        if len(sizes) != 1:
            shapes = {k: tuple(v.shape) for k, v in features.items()}
            msg = f"features dict values have different batch sizes: {shapes}; all must share dim 0"
            raise DattriValueError(msg)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if not isinstance(features, torch.Tensor):
        msg = f"features must be a tensor or a dict of tensors, got {type(features).__name__}"
        raise DattriValueError(msg)
    if features.dim() == 0:
        msg = "features is a scalar tensor; pass a (B, P) tensor"
        raise DattriValueError(msg)
    if features.dim() == 1:
        return features.unsqueeze(0)
    return features.flatten(start_dim=1) if features.dim() > 2 else features


class Projector:
    """Common interface: ``project(features, ensemble_id=0) -> (B, proj_dim)``.

    Args:
        feature_dim: ``P``, the flattened feature dimension.
        proj_dim: ``k``, the output dimension.
        seed: base seed; with ``ensemble_id`` it fixes the random matrix.
        device: generator device (where random numbers are drawn). Computation
            happens on the features' device.
        dtype: if given, features are cast to it before projecting; by default the
            projection runs in the features' dtype.
        max_batch_size: rows of ``X`` multiplied at once (bounds temporaries);
            ``None`` means the whole batch.
        block_bytes: float32 bytes of one generated block of random numbers.
        cache_bytes: total bytes of generated blocks kept between calls.
        progress: show a tqdm bar over blocks.
    """

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int = 0,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int | None = None,
        block_bytes: int = _DEFAULT_BLOCK_BYTES,
        cache_bytes: int = _DEFAULT_CACHE_BYTES,
        *,
        progress: bool = False,
    ) -> None:
        self.feature_dim = _check_int("feature_dim", feature_dim)
        self.proj_dim = _check_int("proj_dim", proj_dim)
        self.seed = _check_int("seed", seed, minimum=0)
        self.device = _check_device(device)
        self.dtype = dtype
        if max_batch_size is not None:
            _check_int("max_batch_size", max_batch_size)
        self.max_batch_size = max_batch_size
        self.block_bytes = _check_int("block_bytes", block_bytes)
        self.cache_bytes = _check_int("cache_bytes", cache_bytes, minimum=0)
        self.progress = progress
        self._cache: dict[tuple, object] = {}
        self._cached_bytes = 0
        self.blocks_generated = 0  # counter: blocks drawn from a generator
        self.peak_block_bytes = 0  # largest generated block, in bytes

    def __call__(self, features, ensemble_id: int = 0) -> torch.Tensor:
        """Alias of :meth:`project`."""
        return self.project(features, ensemble_id)

    def project(
        self,
        features: torch.Tensor | Mapping[str, torch.Tensor],
        ensemble_id: int = 0,
    ) -> torch.Tensor:
        """Project a batch of features.

        Args:
            features: ``(B, P)`` tensor (or ``(B, ...)``, flattened), or a dict of
                ``(B, ...)`` tensors concatenated in dict order.
            ensemble_id: selects an independent random matrix for the same seed.

        Returns:
            ``(B, proj_dim)`` tensor on the features' device, in their dtype (or in
            ``dtype`` if the projector has one).
        """
        if isinstance(ensemble_id, torch.Tensor):
            ensemble_id = int(ensemble_id.item())
        _check_int("ensemble_id", ensemble_id, minimum=0)
        x = _as_matrix(features)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if not x.is_floating_point():
            msg = f"features must be floating point, got dtype {x.dtype}; cast them first"
            raise DattriValueError(msg)
        if x.shape[1] != self.feature_dim:
            msg = (
                f"features have {x.shape[1]} coordinates per example but the projector "
                f"was built for feature_dim={self.feature_dim}; build it from features "
                "of the same shape"
            )
            raise DattriValueError(msg)
        return self._project(x, ensemble_id)

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        raise NotImplementedError

    def _batch_slices(self, n: int):
        step = self.max_batch_size or max(n, 1)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    @staticmethod
    def _key(key: tuple, target: torch.device) -> tuple:
        """The cache's key of a block of ``key`` kept on ``target``."""
        return (*key, str(target))

    def _cached(self, key: tuple, target: torch.device, make: Callable) -> tuple:
        """Return ``make()`` (a tuple of tensors) on ``target``, cached within budget.

        ``key[0]`` is the ensemble id. Blocks of one matrix are never evicted for
        each other (a pass over the blocks is cyclic: keeping the first ones beats
        any eviction order), but a block of another ensemble id that does not fit
        evicts the blocks of the ids before it: an ensemble loop over checkpoints
        then regenerates each matrix once per checkpoint, not once per batch."""
        full_key = self._key(key, target)
        if full_key in self._cache:
            return self._cache[full_key]
        value = make()
        nbytes = sum(t.numel() * t.element_size() for t in value)
        self.blocks_generated += 1
        self.peak_block_bytes = max(self.peak_block_bytes, nbytes)
        value = tuple(t.to(target) for t in value)
        if self._cached_bytes + nbytes > self.cache_bytes:
            for old in [k for k in self._cache if k[0] != key[0]]:
                self._cached_bytes -= sum(t.numel() * t.element_size() for t in self._cache.pop(old))
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[full_key] = value
            self._cached_bytes += nbytes
        return value

    def clear_cache(self) -> None:
        """Drop the cached random blocks."""
        self._cache.clear()
        self._cached_bytes = 0


class IdentityProjector(Projector):
    """``M = I``: returns the flattened features, ``(B, P)``; ``proj_dim`` is ignored."""

    def __init__(self, feature_dim: int, proj_dim: int | None = None, **kwargs) -> None:
        del proj_dim
        super().__init__(feature_dim, feature_dim, **kwargs)

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        del ensemble_id
        return x


class DenseProjector(Projector):
    """Dense Gaussian or Rademacher projection, generated block by block.

    ``M_ij ~ N(0, 1) / sqrt(k)`` (``kind="normal"``) or ``+-1 / sqrt(k)``
    (``kind="rademacher"``), so ``E[M M^T] = I_P`` and ``E[<xM, yM>] = <x, y>``;
    ``Var[<xM, yM>] = (||x||^2 ||y||^2 + <x, y>^2) / k`` for the Gaussian.
    Cost: ``2 B P k`` flops per call plus drawing ``P k`` numbers when not cached.

    Args:
        kind: ``"normal"`` or ``"rademacher"``.
        **kwargs: see :class:`Projector`.
    """

    _TAGS = {"normal": 1, "rademacher": 2}

    def __init__(self, feature_dim: int, proj_dim: int, kind: str = "normal", **kwargs) -> None:
        super().__init__(feature_dim, proj_dim, **kwargs)
        if kind not in self._TAGS:
            msg = f"kind must be 'normal' or 'rademacher', got {kind!r}"
            raise DattriValueError(msg)
        self.kind = kind
        self.rows_per_block = max(1, self.block_bytes // (4 * self.proj_dim))

    def _draw(self, ensemble_id: int, block: int, rows: int) -> tuple[torch.Tensor]:
        gen = _generator(self.device, self._TAGS[self.kind], self.seed, ensemble_id, block)
        shape, scale = (rows, self.proj_dim), 1.0 / math.sqrt(self.proj_dim)
        opts = {"generator": gen, "device": self.device, "dtype": torch.float32}
        if self.kind == "normal":
            return (torch.randn(shape, **opts).mul_(scale),)
        bits = torch.randint(0, 2, shape, **opts)
        return (bits.mul_(2.0 * scale).sub_(scale),)

    def _blocks(self, ensemble_id: int, target: torch.device) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(r0, r1, M[r0:r1])`` for every row block of ``M`` on ``target``. Blocks that
        are not cached are drawn ahead on the CPU's threads (each block has its own
        generator, so the values do not depend on who draws them): drawing the numbers
        costs far more than multiplying by them (``P k`` Gaussians at ~3.5 ns each, one
        thread's generator, against ``2 B P k`` flops)."""
        rows, p = self.rows_per_block, self.feature_dim
        spans = [(b, b * rows, min(p, (b + 1) * rows)) for b in range(math.ceil(p / rows))]
        missing = deque(b for b, _, _ in spans if self._key((ensemble_id, b), target) not in self._cache)
        ahead = torch.get_num_threads() if self.device.type == "cpu" else 1
        pool = ThreadPoolExecutor(ahead) if ahead > 1 and len(missing) > 1 else None
        drawn: dict[int, Future] = {}
        try:
            for b, r0, r1 in spans:
                if pool is not None:  # `ahead` draws in flight, in block order (b among them)
                    while missing and len(drawn) < ahead:
                        nb = missing.popleft()
                        drawn[nb] = pool.submit(self._draw, ensemble_id, nb, spans[nb][2] - spans[nb][1])
                future = drawn.pop(b, None)
                make = (future.result if future is not None
                        else lambda b=b, n=r1 - r0: self._draw(ensemble_id, b, n))
                (m,) = self._cached((ensemble_id, b), target, make)
                yield r0, r1, m
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        out = x.new_zeros(x.shape[0], self.proj_dim)
        n = math.ceil(self.feature_dim / self.rows_per_block)
        for r0, r1, m in tqdm(self._blocks(ensemble_id, x.device), total=n,
                              disable=not self.progress, desc="projecting", leave=False):
            # one product for every row: the rows are accumulated in place into the
            # output, so splitting them (max_batch_size) would only shrink the GEMMs
            out.addmm_(x[:, r0:r1], m.to(x.dtype))
        return out

    def back_project(self, y: torch.Tensor, ensemble_id: int = 0) -> torch.Tensor:
        """``Y M^T`` ``(m, P)`` for ``Y`` ``(m, k)``: the adjoint of :meth:`project`, from
        the same blocks, so ``<x M, y> = <x, back_project(y)>``."""
        if y.ndim != 2 or y.shape[1] != self.proj_dim:
            msg = f"y must be (m, {self.proj_dim}), got shape {tuple(y.shape)}"
            raise DattriValueError(msg)
        out = y.new_empty(y.shape[0], self.feature_dim)
        for r0, r1, m in self._blocks(ensemble_id, y.device):
            out[:, r0:r1] = y @ m.to(y.dtype).T
        return out

    def matrix(self, ensemble_id: int = 0) -> torch.Tensor:
        """The dense ``(P, k)`` float32 matrix (for tests and small ``P`` only)."""
        rows, p = self.rows_per_block, self.feature_dim
        return torch.cat(
            [self._draw(ensemble_id, b, min(p, (b + 1) * rows) - b * rows)[0]
             for b in range(math.ceil(p / rows))]
        )


class SJLTProjector(Projector):
    """Sparse JL transform: each input coordinate hits ``c`` output coordinates.

    For coordinate ``j`` and repetition ``r < c``, ``h_r(j)`` is uniform in the
    ``r``-th of ``c`` contiguous output blocks and ``s_r(j) = +-1``;
    ``(xM)_i = c^(-1/2) sum_{j, r: h_r(j) = i} s_r(j) x_j``. Unbiased:
    ``E[<xM, yM>] = <x, y>``. Cost ``B P c`` additions (one ``index_add_`` into ``2k``
    columns, positive and negative signs apart, then a difference).

    Args:
        c: nonzeros per input coordinate (``1 <= c <= k``); 1 is CountSketch.
        **kwargs: see :class:`Projector`.
    """

    _TAG = 3

    def __init__(self, feature_dim: int, proj_dim: int, c: int = 1, **kwargs) -> None:
        super().__init__(feature_dim, proj_dim, **kwargs)
        self.c = _check_int("sjlt_c", c)
        if self.c > self.proj_dim:
            msg = f"sjlt_c={c} exceeds proj_dim={proj_dim}; pass sjlt_c <= proj_dim"
            raise DattriValueError(msg)
        self.rows_per_block = max(1, self.block_bytes // (12 * self.c))

    def _draw(self, ensemble_id: int, block: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = _generator(self.device, self._TAG, self.seed, ensemble_id, block)
        k, c = self.proj_dim, self.c
        bounds = torch.tensor([(r * k) // c for r in range(c + 1)], device=self.device)
        start, size = bounds[:-1], bounds[1:] - bounds[:-1]
        u = torch.rand((rows, c), generator=gen, device=self.device, dtype=torch.float64)
        idx = start + (u * size).long().clamp_max_(size - 1)
        signs = torch.randint(0, 2, (rows, c), generator=gen, device=self.device, dtype=torch.float32)
        scale = 1.0 / math.sqrt(c)
        return idx.reshape(-1), signs.mul_(2.0 * scale).sub_(scale)

    def _signed_buckets(self, ensemble_id: int, block: int, rows: int) -> tuple[torch.Tensor]:
        """``h_r(j) + k [s_r(j) < 0]`` ``(rows * c,)``: one ``index_add_`` into ``2k``
        columns, then the first ``k`` minus the last ``k``, applies the signs without a
        signed copy of the input (which cost as much as the additions)."""
        idx, signs = self._draw(ensemble_id, block, rows)
        return (idx.add_((signs.reshape(-1) < 0).long() * self.proj_dim),)

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        k, rows, p, c = self.proj_dim, self.rows_per_block, self.feature_dim, self.c
        out = x.new_zeros(x.shape[0], 2 * k)
        for b in range(math.ceil(p / rows)):
            r0, r1 = b * rows, min(p, (b + 1) * rows)
            (idx,) = self._cached(
                (ensemble_id, b), x.device,
                lambda b=b, n=r1 - r0: self._signed_buckets(ensemble_id, b, n),
            )
            for sl in self._batch_slices(x.shape[0]):
                bs = x[sl].shape[0]
                # columns at a time: bounds the (bs, step * c) copy when c > 1
                step = max(1, (2**20 if c == 1 else 2**22 // max(1, bs)) // c)
                for s0 in range(0, r1 - r0, step):
                    s1 = min(r1 - r0, s0 + step)
                    src = x[sl, r0 + s0 : r0 + s1]
                    if c > 1:
                        src = src.unsqueeze(-1).expand(-1, -1, c).reshape(bs, -1)
                    out[sl].index_add_(1, idx[s0 * c : s1 * c], src)
        res = out[:, :k] - out[:, k:]
        return res if c == 1 else res.mul_(1.0 / math.sqrt(c))


def _sample_subset(n: int, k: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """``k`` distinct uniform indices in ``[0, n)``, sorted; memory ``O(k)`` if ``k << n``."""
    if 2 * k >= n:
        return torch.randperm(n, generator=gen, device=device)[:k].sort().values
    chosen = torch.empty(0, dtype=torch.long, device=device)
    while chosen.numel() < k:
        draw = torch.randint(n, (2 * (k - chosen.numel()) + 16,), generator=gen, device=device)
        values = torch.cat([chosen, draw])
        uniq, inverse = torch.unique(values, return_inverse=True)
        order = torch.arange(values.numel(), device=device)
        first = torch.full((uniq.numel(),), values.numel(), dtype=torch.long, device=device)
        first.scatter_reduce_(0, inverse, order, reduce="amin")
        chosen = values[first.sort().values]  # distinct values in order of first draw
    return chosen[:k].sort().values


class RandomMaskProjector(Projector):
    """Keep ``k`` distinct uniformly random coordinates, scaled by ``sqrt(P / k)``.

    ``E[<xM, yM>] = (P / k) sum_j Pr[j kept] x_j y_j = <x, y>``. Requires ``k <= P``.
    """

    _TAG = 4

    def __init__(self, feature_dim: int, proj_dim: int, **kwargs) -> None:
        super().__init__(feature_dim, proj_dim, **kwargs)
        if self.proj_dim > self.feature_dim:
            msg = (
                f"random_mask keeps proj_dim={proj_dim} of feature_dim={feature_dim} "
                "coordinates; pass proj_dim <= feature_dim (or proj_type='normal')"
            )
            raise DattriValueError(msg)
        self.scale = math.sqrt(self.feature_dim / self.proj_dim)

    def indices(self, ensemble_id: int, target: torch.device | None = None) -> torch.Tensor:
        """The sorted kept coordinates ``(k,)`` for ``ensemble_id``."""
        def make() -> tuple[torch.Tensor]:
            gen = _generator(self.device, self._TAG, self.seed, ensemble_id)
            return (_sample_subset(self.feature_dim, self.proj_dim, gen, self.device),)

        return self._cached((ensemble_id,), target or self.device, make)[0]

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        return x[:, self.indices(ensemble_id, x.device)] * self.scale


class GraSSProjector(Projector):
    """GraSS (Hu et al. 2025): random mask ``P -> m`` then SJLT ``m -> k``.

    Both stages are unbiased and independent, so ``E[<xM, yM>] = <x, y>``.
    Cost ``B (m c + k)`` instead of ``2 B P k``.

    Args:
        grass_dim: intermediate size ``m`` (default ``min(P, 4 k)``); if ``m >= P``
            the mask stage is skipped.
        c: SJLT nonzeros per coordinate.
        **kwargs: see :class:`Projector`.
    """

    def __init__(
        self, feature_dim: int, proj_dim: int, grass_dim: int | None = None, c: int = 1, **kwargs
    ) -> None:
        super().__init__(feature_dim, proj_dim, **kwargs)
        m = 4 * self.proj_dim if grass_dim is None else _check_int("grass_dim", grass_dim)
        self.grass_dim = min(self.feature_dim, m)
        self.mask = (
            RandomMaskProjector(self.feature_dim, self.grass_dim, **kwargs)
            if self.grass_dim < self.feature_dim
            else None
        )
        self.sjlt = SJLTProjector(self.grass_dim, self.proj_dim, c=c, **kwargs)

    def _project(self, x: torch.Tensor, ensemble_id: int) -> torch.Tensor:
        if self.mask is not None:
            x = self.mask._project(x, ensemble_id)
        out = self.sjlt._project(x, ensemble_id)
        subs = [s for s in (self.mask, self.sjlt) if s is not None]
        self.blocks_generated = sum(s.blocks_generated for s in subs)
        self.peak_block_bytes = max(s.peak_block_bytes for s in subs)
        return out

    def clear_cache(self) -> None:
        """Drop the cached random blocks of both stages."""
        for s in (self.mask, self.sjlt):
            if s is not None:
                s.clear_cache()


_RANDOM_PROJECT_OPTIONS = ("sjlt_c", "grass_dim", "block_bytes", "cache_bytes", "progress")


def get_projector(
    proj_type: str,
    feature_dim: int,
    proj_dim: int,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    *,
    max_batch_size: int | None = None,
    sjlt_c: int = 1,
    grass_dim: int | None = None,
    block_bytes: int = _DEFAULT_BLOCK_BYTES,
    cache_bytes: int = _DEFAULT_CACHE_BYTES,
    progress: bool = False,
) -> Projector:
    """Build a projector of the given type (see the module docstring for the maths).

    Args:
        proj_type: one of ``"identity", "normal", "rademacher", "sjlt",
            "random_mask", "grass"``.
        feature_dim: ``P``.
        proj_dim: ``k`` (ignored by ``"identity"``).
        seed: base seed.
        device: generator device (random numbers are drawn there; CPU gives the
            same projection on every machine).
        dtype: cast features to this dtype first (default: keep theirs).
        max_batch_size: rows multiplied at once.
        sjlt_c: nonzeros per coordinate for ``"sjlt"`` and ``"grass"``.
        grass_dim: intermediate mask size for ``"grass"`` (default ``min(P, 4k)``).
        block_bytes: float32 bytes of one generated random block.
        cache_bytes: bytes of random blocks kept between calls.
        progress: tqdm bar over blocks.

    Returns:
        A :class:`Projector`.
    """
    common = {
        "seed": seed, "device": device, "dtype": dtype, "max_batch_size": max_batch_size,
        "block_bytes": block_bytes, "cache_bytes": cache_bytes, "progress": progress,
    }
    if proj_type == "identity":
        return IdentityProjector(feature_dim, proj_dim, **common)
    if proj_type in {"normal", "rademacher"}:
        return DenseProjector(feature_dim, proj_dim, kind=proj_type, **common)
    if proj_type == "sjlt":
        return SJLTProjector(feature_dim, proj_dim, c=sjlt_c, **common)
    if proj_type == "random_mask":
        return RandomMaskProjector(feature_dim, proj_dim, **common)
    if proj_type == "grass":
        return GraSSProjector(feature_dim, proj_dim, grass_dim=grass_dim, c=sjlt_c, **common)
    msg = f"proj_type must be one of {list(PROJ_TYPES)}, got {proj_type!r}"
    raise DattriValueError(msg)


_PROJECTOR_CACHE: OrderedDict[tuple, Projector] = OrderedDict()
_PROJECTOR_CACHE_SIZE = 2


def clear_projector_cache() -> None:
    """Forget the projectors (and their random blocks) kept by :func:`random_project`."""
    _PROJECTOR_CACHE.clear()


def _feature_dim_of(feature, feature_batch_size: int) -> int:
    tensors = list(feature.values()) if isinstance(feature, Mapping) else [feature]
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        msg = f"feature must be a tensor or a non-empty dict of tensors, got {type(feature).__name__}"
        raise DattriValueError(msg)
    total = 0
    for t in tensors:
        if t.numel() % feature_batch_size:
            msg = (
                f"a feature tensor of shape {tuple(t.shape)} does not split into "
                f"feature_batch_size={feature_batch_size} examples; pass the batch size "
                "(the leading dimension) of feature"
            )
            raise DattriValueError(msg)
        total += t.numel() // feature_batch_size
    return total


def random_project(
    feature: torch.Tensor | Mapping[str, torch.Tensor],
    feature_batch_size: int | None = None,
    proj_dim: int | None = None,
    proj_max_batch_size: int | None = None,
    proj_seed: int = 0,
    proj_type: str = "normal",
    *,
    device: str | torch.device = "cpu",
    use_half_precision: bool = False,
    proj_params: object = None,
    **projector_kwargs,
) -> Callable[..., torch.Tensor]:
    """Build ``project(features, ensemble_id=0) -> (B, proj_dim)`` for features like ``feature``.

    ``feature`` fixes ``P`` (its per-example size, ``numel / feature_batch_size``,
    summed over dict values) and the dtype. The projection is ``X @ M`` with ``M``
    from :func:`get_projector`; same ``proj_seed`` and ``ensemble_id`` give the same
    ``M`` on every call and for any batch split. Projectors are kept between calls
    (the last two configurations), so calling this once per batch, as TRAK does
    (the paper's Demo 3), does not redraw the random matrix when it fits the cache.

    Args:
        feature: a ``(B, ...)`` tensor or dict of ``(B, ...)`` tensors.
        feature_batch_size: ``B``, the batch size of ``feature``.
        proj_dim: ``k``.
        proj_max_batch_size: rows of the batch projected at once.
        proj_seed: seed of the projection.
        proj_type: see the module docstring.
        device: generator device (keyword-only; older releases took it
            positionally before ``proj_seed``).
        use_half_precision: project in float16 (older releases defaulted to True;
            here the default keeps the features' dtype, deliberately).
        **projector_kwargs: ``sjlt_c``, ``grass_dim``, ``block_bytes``,
            ``cache_bytes``, ``progress`` (see :func:`get_projector`).

    Returns:
        ``project(features, ensemble_id=0)``; its ``.projector`` attribute is the
        :class:`Projector`.
    """
    if proj_params is not None:  # main's random_project(feature, proj_params=...)
        proj_dim, proj_max_batch_size, proj_seed, proj_type, device = _from_params(
            proj_params, (proj_dim, proj_max_batch_size), device)
    if feature_batch_size is None:
        first_ = next(iter(feature.values())) if isinstance(feature, Mapping) else feature
        feature_batch_size = int(first_.shape[0])
    if proj_dim is None:
        msg = "random_project needs proj_dim= (or proj_params=RandomProjectionParams(...))."
        raise DattriValueError(msg)
    if proj_max_batch_size is None:
        proj_max_batch_size = 32
    if isinstance(proj_seed, str):
        msg = (
            f"proj_seed must be an int, got {proj_seed!r}; device is keyword-only here: "
            f"pass device={proj_seed!r}"
        )
        raise DattriValueError(msg)
    unknown = sorted(set(projector_kwargs) - set(_RANDOM_PROJECT_OPTIONS))
    if unknown:
        msg = (
            f"random_project got unknown keyword(s) {unknown}; valid: feature, "
            "feature_batch_size, proj_dim, proj_max_batch_size, proj_seed, proj_type, "
            f"device, use_half_precision, {', '.join(_RANDOM_PROJECT_OPTIONS)}"
        )
        raise DattriValueError(msg)
    feature_batch_size = _check_int("feature_batch_size", feature_batch_size)
    p = _feature_dim_of(feature, feature_batch_size)
    first = next(iter(feature.values())) if isinstance(feature, Mapping) else feature
    dtype = torch.float16 if use_half_precision else first.dtype
    key = (proj_type, p, proj_dim, proj_seed, str(device), dtype, proj_max_batch_size,
           tuple(sorted(projector_kwargs.items())))
    projector = _PROJECTOR_CACHE.get(key)
    if projector is None:
        projector = get_projector(
            proj_type, p, proj_dim, proj_seed, device, dtype,
            max_batch_size=proj_max_batch_size, **projector_kwargs,
        )
        _PROJECTOR_CACHE[key] = projector
        while len(_PROJECTOR_CACHE) > _PROJECTOR_CACHE_SIZE:
            _PROJECTOR_CACHE.popitem(last=False)
    _PROJECTOR_CACHE.move_to_end(key)

    def project(features, ensemble_id: int = 0) -> torch.Tensor:
        return projector.project(features, ensemble_id)

    project.projector = projector
    return project


def _from_params(proj_params: object, explicit: tuple, device: str | torch.device) -> tuple:
    """``(proj_dim, proj_max_batch_size, proj_seed, proj_type, device)`` of a settings
    object or dict; explicit ``proj_dim`` / ``proj_max_batch_size`` beside it are errors."""
    if any(v is not None for v in explicit):
        msg = "random_project: pass proj_params= or proj_dim/proj_max_batch_size, not both."
        raise DattriValueError(msg)
    if isinstance(proj_params, Mapping):
        from dattri.params.projection import RandomProjectionParams

        proj_params = RandomProjectionParams(**proj_params)
    as_kwargs = getattr(proj_params, "as_kwargs", None)
    if as_kwargs is None:
        msg = (f"proj_params must be a dattri.params.projection settings object or a dict, "
               f"got {type(proj_params).__name__}.")
        raise DattriValueError(msg)
    kw = as_kwargs()
    return (kw["proj_dim"], kw["proj_max_batch_size"], kw["proj_seed"], kw["proj_type"],
            kw.get("device", device))


def _dim_from(feature_dim) -> int:
    """``feature_dim`` may be an int, a ``(..., P)`` tensor or a dict of ``(B, ...)``."""
    if isinstance(feature_dim, torch.Tensor):
        return feature_dim.shape[-1] if feature_dim.dim() <= 2 else feature_dim[0].numel()
    if isinstance(feature_dim, Mapping):
        return _as_matrix(feature_dim).shape[1]
    return _check_int("feature_dim", feature_dim)


def _flat_hvp(func: Callable, x, argnums: int, mode: str):
    """``(theta0 (P,), hvp(v))`` for ``func`` at ``x`` w.r.t. argument ``argnums``."""
    args = list(x) if isinstance(x, (tuple, list)) else [x]
    if isinstance(argnums, bool) or not isinstance(argnums, int) or not 0 <= argnums < len(args):
        msg = f"argnums={argnums!r} does not index the {len(args)} argument(s) in x"
        raise DattriValueError(msg)
    target = args[argnums]
    if isinstance(target, Mapping):
        names = list(target)
        shapes = [target[n].shape for n in names]
        theta0 = torch.cat([target[n].detach().reshape(-1) for n in names])

        def unflat(theta: torch.Tensor):
            parts = torch.split(theta, [math.prod(s) for s in shapes])
            return {n: p.reshape(s) for n, p, s in zip(names, parts, shapes)}
    elif isinstance(target, torch.Tensor):
        shape = target.shape
        theta0 = target.detach().reshape(-1)

        def unflat(theta: torch.Tensor):
            return theta.reshape(shape)
    else:
        msg = f"x[{argnums}] must be a tensor or a dict of tensors, got {type(target).__name__}"
        raise DattriValueError(msg)

    def f(theta: torch.Tensor) -> torch.Tensor:
        call = list(args)
        call[argnums] = unflat(theta)
        return func(*call)

    value = f(theta0)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        msg = "func must return a single-element tensor (a scalar loss) at x"
        raise DattriValueError(msg)
    grad_f = torch.func.grad(lambda t: f(t).reshape(()))
    if mode == "rev-rev":
        _, vjp_fn = torch.func.vjp(grad_f, theta0)
        return theta0, lambda v: vjp_fn(v)[0]
    if mode == "rev-fwd":
        return theta0, lambda v: torch.func.jvp(grad_f, (theta0,), (v,))[1]
    msg = f"mode must be 'rev-rev' or 'rev-fwd', got {mode!r}"
    raise DattriValueError(msg)


def arnoldi_project(
    feature_dim: int | torch.Tensor,
    func: Callable,
    x,
    argnums: int = 0,
    proj_dim: int = 100,
    max_iter: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-5,
    mode: str = "rev-rev",
    regularization: float = 0.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    progress: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Project features onto the top Hessian eigenspace, scaled by ``Lambda^(-1/2)``.

    Arnoldi iteration (Schioppa et al. 2022, "Scaling up influence functions") on the
    Hessian ``H`` of ``func`` at ``x`` w.r.t. argument ``argnums`` gives the top
    ``r <= proj_dim`` eigenpairs ``(lambda_i, v_i)`` (largest ``|lambda|``). The
    returned function maps ``G (B, P)`` to

        ``project(G) = norm_constant * (G @ V^T) * (lambda + regularization)^(-1/2)``

    of shape ``(B, r)``, so ``<project(g1), project(g2)> = norm_constant^2 *
    g1^T V^T (Lambda + regularization I)^(-1) V g2``: the inverse-Hessian inner
    product ``g1^T (H + regularization I)^(-1) g2`` restricted to the top eigenspace
    (exact when ``max_iter = proj_dim = P``). Eigenpairs with
    ``lambda + regularization <= tol^2`` are dropped with a warning. Adding the
    regularization to the Ritz values is the same as running Arnoldi on
    ``H + regularization I`` (same Krylov space). This is the paper's Demo 4.

    Args:
        feature_dim: ``P``, or a feature tensor ``(B, P)`` / dict whose size gives it.
        func: scalar function; the Hessian is taken w.r.t. ``x[argnums]``.
        x: the arguments of ``func``: a tuple/list of them, or one tensor / dict of
            tensors (a single argument).
        argnums: which argument to differentiate (tensor or name -> tensor dict,
            flattened in dict order to match the features).
        proj_dim: eigenpairs kept (output dimension ``r``).
        max_iter: Krylov dimension (number of Hessian-vector products).
        norm_constant: output scale (see the formula).
        tol: Arnoldi breakdown tolerance; also ``tol^2`` is the eigenvalue floor.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: ``lambda`` added to the Hessian (``>= 0``).
        seed: seed of the Arnoldi start vector.
        device: device of the Arnoldi basis (the positional order is the published
            one: ``proj_dim, max_iter, norm_constant, tol, mode, regularization,
            seed, device``).
        progress: tqdm bar over Arnoldi iterations.

    Returns:
        ``project(features) -> (B, r)``, with ``.eigvals`` ``(r,)`` (including the
        regularization) and ``.eigvecs`` ``(r, P)`` attributes.
    """
    from dattri.linalg.solvers import arnoldi  # noqa: PLC0415 (lazy: func stays importable alone)

    dim = _dim_from(feature_dim)
    _check_int("proj_dim", proj_dim)
    _check_int("max_iter", max_iter)
    for name, value in (("norm_constant", norm_constant), ("regularization", regularization)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            msg = f"{name} must be a number >= 0, got {value!r}"
            raise DattriValueError(msg)
    dev = _check_device(device)
    theta0, hvp = _flat_hvp(func, x, argnums, mode)
    if theta0.numel() != dim:
        msg = f"feature_dim={dim} but x[{argnums}] has {theta0.numel()} entries; they must match"
        raise DattriValueError(msg)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return hvp(v.to(theta0.device, theta0.dtype)).to(dev)

    eigvals, eigvecs = arnoldi(
        matvec, dim, max_iter=max_iter, top_k=proj_dim, tol=tol, seed=seed,
        dtype=theta0.dtype, device=dev, progress=progress,
    )
    eigvals = eigvals + regularization
    keep = eigvals > tol**2
    if not bool(keep.all()):
        warn_user(
            f"arnoldi_project: {int((~keep).sum())} of {keep.numel()} eigenvalues of "
            f"H + {regularization} I are <= tol^2={tol**2:g} and were dropped; the output "
            "has fewer columns. Increase `regularization` to keep them.",
            RuntimeWarning,
        )
    eigvals, eigvecs = eigvals[keep], eigvecs[keep]
    scale = norm_constant / eigvals.sqrt()

    def project(features) -> torch.Tensor:
        g = _as_matrix(features)
        if g.shape[1] != dim:
            msg = f"features have {g.shape[1]} coordinates, arnoldi_project was built for {dim}"
            raise DattriValueError(msg)
        v = eigvecs.to(g.device, g.dtype)
        return (g @ v.T) * scale.to(g.device, g.dtype)

    project.eigvals, project.eigvecs = eigvals, eigvecs
    return project


# the published projector classes (dattri.func.projection.BasicProjector, ...)
from dattri.func import projector_classes as _published  # noqa: E402
from dattri.func.projector_classes import (  # noqa: E402
    AbstractProjector,
    ArnoldiProjector,
    BasicProjector,
    ChunkedCudaProjector,
    CudaProjector,
    ProjectionType,
    make_random_projector,
)

__all__ += _published.__all__
