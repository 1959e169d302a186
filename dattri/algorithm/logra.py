r"""LoGra (Choe et al. 2024, "What is Your Data Worth to GPT?").

For every selected ``nn.Linear`` layer ``l`` the per-example gradient is
:math:`G = \sum_t s_t a_t^\top` (``(d_out, d_a)``, ``a`` extended by 1 for the bias,
see :mod:`dattri.algorithm.ekfac` for how ``a`` and ``s`` are captured). LoGra
projects the two factors separately, :math:`\tilde a = P_{in}^\top a`,
:math:`\tilde s = P_{out}^\top s`, so the projected gradient

.. math:: \hat G = \sum_t \tilde s_t \tilde a_t^\top = P_{out}^\top G P_{in},
   \qquad \mathrm{vec}(\hat G) = (P_{out} \otimes P_{in})^\top \mathrm{vec}(G)

(row-major ``vec``) is a Kronecker-factored projection of the gradient that is
never formed in full. ``proj_dim_per_layer = k`` must be a perfect square; each
factor is projected to ``sqrt(k)`` dimensions (a factor already that small is
kept as it is: no projection upwards). The influence is

.. math:: \tau(i, j) = \sum_l \hat g_{il}^\top (\hat F_l + \lambda_l I)^{-1} \hat g_{jl},
   \qquad \hat F_l = \frac1n \sum_i \hat g_{il} \hat g_{il}^\top

over the cached training set (``hessian="eFIM"``; block-diagonal over layers), or
plain inner products of the projected gradients (``hessian="Identity"``, Grad-Dot
style). ``damping`` is *relative*, as in the published package: the damping of
layer ``l`` is its mean eigenvalue times ``damping``,

.. math:: \lambda_l = \mathrm{damping} \cdot \mathrm{trace}(\hat F_l) / k_l,

with ``damping=None`` meaning 0.1 (the published package's ``None`` is ``1e-5``:
pass ``damping=1e-5`` for it).

The projected training features are computed once in ``cache`` and kept
(``offload="none"`` on the device, ``"cpu"`` in host memory, ``"disk"`` memory-mapped
in ``cache_dir``, read back in blocks of ``chunk_size`` batches); ``attribute`` on the
cached training loader scores from them. The task's loss may also be written in
the published block-projected style ``loss_func(model, batch, device)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dattri._convention import model_style_task
from dattri.algorithm._hooks import HookFeaturizer, LinearCapture, layer_dims, resolve_linear_modules
from dattri.algorithm._offload import FeatureStore, check_offload
from dattri.algorithm.influence_function import _check_choice, _IFBase
from dattri.algorithm._scored import fill_stores
from dattri.distributed import all_reduce, row_range
from dattri.errors import DattriValueError
from dattri.func.projection import Projector, get_projector
from dattri.linalg.solvers import factorize
from dattri.params.projection import LoGraProjectionParams
from dattri.linalg.operators import BlockDiagonalPreconditioner
from dattri.task import AttributionTask

__all__ = ["LoGraAttributor", "published_names", "published_proj_dim"]

_HESSIANS = ("eFIM", "Identity")


def parse_params(proj_params: Any, cls: type, name: str = "proj_params") -> Any:
    """A validated ``cls`` instance from ``None``, a dict or a params object."""
    if proj_params is None:
        return cls()
    if isinstance(proj_params, dict):
        return cls(**proj_params)
    if dataclasses.is_dataclass(proj_params) and not isinstance(proj_params, type):
        d = dataclasses.asdict(proj_params)
        d.pop("device", None)
        return cls(**{k: v for k, v in d.items()
                      if k in {f.name for f in dataclasses.fields(cls)}})
    msg = (f"{name} must be None, a dict or a {cls.__name__}, got "
           f"{type(proj_params).__name__}.")
    raise DattriValueError(msg)


def published_names(module_name: Any, layer_names: Any) -> Any:
    """``module_name`` or its published name ``layer_names`` (not both)."""
    if layer_names is None:
        return module_name
    if module_name is not None:
        msg = "module_name and layer_names (its published name) were both given; pass one."
        raise DattriValueError(msg)
    return layer_names


def published_proj_dim(proj_params: Any, proj_dim: Any) -> Any:
    """Projection settings from ``proj_params`` and the published ``proj_dim=`` (an
    int ``proj_params``, from the published positional order, is a ``proj_dim``)."""
    if isinstance(proj_params, int) and not isinstance(proj_params, bool):
        proj_params, proj_dim = None, proj_params if proj_dim is None else proj_dim
    if proj_dim is None:
        return proj_params
    if proj_params is not None:
        msg = "proj_params and proj_dim were both given; pass proj_params={'proj_dim': k} only."
        raise DattriValueError(msg)
    return {"proj_dim": proj_dim}


def square_root(k: int, what: str) -> int:
    """``sqrt(k)`` for a perfect square ``k``, else a typed error."""
    r = math.isqrt(k)
    if r * r != k:
        msg = (f"{what}={k} must be a perfect square (each of the two factors is "
               f"projected to sqrt({k}) dimensions); e.g. {r * r} or {(r + 1) ** 2}.")
        raise DattriValueError(msg)
    return r


class _DiskRows:
    """A finished :class:`dattri.store.FeatureStore` read as ``_offload.FeatureStore``
    is (``n``, ``blocks()`` of rows on the device, ``close()``: the files stay, so a
    later run reuses them)."""

    def __init__(self, store: Any, device: torch.device, chunk_size: int) -> None:
        self.store, self.device, self.chunk_size = store, device, chunk_size

    @property
    def n(self) -> int:
        return self.store.n

    def blocks(self):
        rows = max(1, self.chunk_size * max(1, self.store.n // max(1, self.store.num_batches)))
        for _, b in self.store.blocks(rows=rows, device=self.device):
            yield b

    def close(self) -> None:
        """Nothing to free: the store is on disk and is kept for a rerun."""


class _BlockProjectedIF(_IFBase):
    """Shared logic of LoGra / FactGraSS: factor projections, optional second stage,
    per-layer damped projected empirical Fisher. Subclasses implement
    ``_make_projectors(d_out, d_a) -> (P_out | None, P_in | None, P2 | None)``.
    """

    def __init__(self, task: AttributionTask, module_name: str | Sequence[str] | None,
                 hessian: str, damping: float | None, device: Any, offload: str = "none",
                 cache_dir: str | None = None, chunk_size: int = 16) -> None:
        if not isinstance(task, AttributionTask):
            super().__init__(task, None, device)  # raises the typed error
        check_offload(offload, cache_dir, chunk_size)
        self.offload, self.cache_dir, self.chunk_size = offload, cache_dir, chunk_size
        task = model_style_task(task, device)
        names, bias, params = resolve_linear_modules(task, module_name)
        super().__init__(task, params, device)
        _check_choice("hessian", hessian, _HESSIANS)
        if damping is not None and (isinstance(damping, bool) or not isinstance(
                damping, (int, float)) or damping < 0):
            msg = (f"damping={damping!r} must be None (0.1) or a number >= 0 (relative: "
                   "lambda_l = damping * trace(F_l) / k_l).")
            raise DattriValueError(msg)
        self.module_name, self.bias = names, bias
        self.hessian, self.damping = hessian, None if damping is None else float(damping)
        mods = dict(task.model.named_modules())
        self._dims = {n: (layer_dims(mods[n])[0], layer_dims(mods[n])[1] + int(bias[n]))
                      for n in names}
        self.capture = LinearCapture(task, names, self.device)
        self.train_features = HookFeaturizer(self.capture, "loss", self._features)
        self.test_features = HookFeaturizer(self.capture, "target", self._features)
        self._projectors: dict[str, tuple] = {}

    def _make_projectors(self, d_out: int, d_a: int) -> tuple:
        raise NotImplementedError

    def _layer_projectors(self, name: str) -> tuple:
        if name not in self._projectors:
            self._projectors[name] = self._make_projectors(*self._dims[name])
        return self._projectors[name]

    def _eid(self, ckpt: int, layer: int, stage: int) -> int:
        return (ckpt * len(self.module_name) + layer) * 3 + stage

    def _features(self, cap: dict, ckpt: int) -> torch.Tensor:
        parts = []
        for layer, name in enumerate(self.module_name):
            a, s = cap[name]
            if self.bias[name]:
                a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
            p_out, p_in, p2 = self._layer_projectors(name)
            a = _apply(p_in, a, self._eid(ckpt, layer, 0))
            s = _apply(p_out, s, self._eid(ckpt, layer, 1))
            g = torch.einsum("bto,bti->boi", s, a).flatten(1)
            if p2 is not None:
                g = p2.project(g, self._eid(ckpt, layer, 2))
            parts.append(g)
        return torch.cat(parts, dim=1)

    def _slices(self) -> list[slice]:
        sizes = [self.projected_dim(n) for n in self.module_name]
        bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
        return [slice(bounds[i], bounds[i + 1]) for i in range(len(sizes))]

    def _cache(self, train_loader: Any) -> None:
        """Projected training features into a store, and each layer's damped Fisher
        factor, in one pass per checkpoint. With ``offload="disk"`` the store is a
        :mod:`dattri.store` under ``cache_dir`` (one per checkpoint and rank): a killed
        run resumes, recomputing only the batches without a file."""
        for store in getattr(self, "_stores", {}).values():
            store.close()
        self._state, self._stores = {}, {}
        slices = self._slices()
        disk = None
        if self.offload == "disk":
            settings = {"method": type(self).__name__, "proj": repr(getattr(self, "proj_params", None)),
                        "projector_kwargs": repr(getattr(self, "projector_kwargs", None)),
                        "modules": list(self.module_name)}
            disk = fill_stores(self, self.train_features, train_loader, settings)
        fitted = self.ensemble.each(lambda c: self._fit_checkpoint(train_loader, c, slices, disk))
        self._stores = dict(enumerate(store for store, _ in fitted))
        self._state = dict(enumerate(state for _, state in fitted))
        self._preconditioners = dict(enumerate(self.ensemble.each(self._precondition)))

    def _fit_checkpoint(self, train_loader: Any, c: int, slices: list[slice],
                        disk: list[Any] | None) -> tuple[Any, list]:
        """Checkpoint ``c``'s feature store (filled here unless ``disk`` holds it) and
        its per-layer ``(slice, damped Fisher solver or None)``."""
        if disk is not None:
            store = _DiskRows(disk[c], self.device, self.chunk_size)
            rows = store.blocks()
        else:
            store = FeatureStore(self.offload, self.device, self.cache_dir, self.chunk_size,
                                 f"{type(self).__name__}-ckpt{c}")
            rows = self.train_features.iterate(train_loader, c, "train features")
        fisher: list[torch.Tensor] | None = None
        for g in rows:
            if disk is None:
                store.append(g)
            if self.hessian == "Identity":
                continue
            if fisher is None:
                fisher = [g.new_zeros(sl.stop - sl.start, sl.stop - sl.start) for sl in slices]
            for f, sl in zip(fisher, slices):
                f.addmm_(g[:, sl].T, g[:, sl])
        if store.n == 0:
            msg = "train_loader yielded no batches; pass a non-empty loader."
            raise DattriValueError(msg)
        # torch.distributed: the Fisher blocks and counts of every rank's part
        shard = self._shard()
        n = row_range(store.n, shard)[2]
        state = ([(sl, None) for sl in slices] if fisher is None
                 else [(sl, self._damped(all_reduce(f, shard) / n)) for f, sl in zip(fisher, slices)])
        return store, state

    def _damped(self, f: torch.Tensor) -> Callable:
        """Solver of ``F_l + lambda_l I`` with ``lambda_l = damping * trace(F_l) / k_l``."""
        rel = 0.1 if self.damping is None else self.damping
        return factorize(f, rel * float(torch.diagonal(f).mean()))

    def _same_as_cached(self, train_loader: Any) -> bool:
        from dattri._loader import loader_fingerprint

        return loader_fingerprint(train_loader) == getattr(self, "_train_fingerprint", None)

    def _kept_blocks(self, train_loader: Any) -> Any:
        """On the cached training loader, the stored features of every checkpoint,
        read in blocks (``attribute`` and its ``top_k`` score them block by block);
        ``None`` for another loader (its features are computed)."""
        if not self._same_as_cached(train_loader):
            return None
        return (list(parts) for parts in zip(*self.ensemble.each(lambda c: self._stores[c].blocks())))

    def _precondition(self, ckpt: int) -> BlockDiagonalPreconditioner:
        """Each layer's damped projected Fisher (the identity for ``hessian="Identity"``)."""
        return BlockDiagonalPreconditioner(self._state[ckpt], f"{self.hessian}, per layer")

    def projected_dim(self, name: str) -> int:
        """Feature dimension of layer ``name`` after projection."""
        d_out, d_a = self._dims[name]
        p_out, p_in, p2 = self._layer_projectors(name)
        if p2 is not None:
            return p2.proj_dim
        return (d_out if p_out is None else p_out.proj_dim) * (d_a if p_in is None else p_in.proj_dim)

    def projection_matrices(self, ckpt: int = 0) -> dict[str, tuple]:
        """``{module: (P_out, P_in, P2 or None)}`` as dense float64 matrices (tests, small layers).

        ``P_out (d_out, k_out)``, ``P_in (d_a, k_in)`` (identity where a factor is not
        projected) and the second stage ``P2 (k_out * k_in, k)``, so that the
        features are ``vec(G) @ kron(P_out, P_in) [@ P2]``.
        """
        out = {}
        for layer, name in enumerate(self.module_name):
            d_out, d_a = self._dims[name]
            p_out, p_in, p2 = self._layer_projectors(name)
            eye_o = torch.eye(d_out, dtype=torch.float64, device=self.device)
            eye_a = torch.eye(d_a, dtype=torch.float64, device=self.device)
            mo = _apply(p_out, eye_o[:, None], self._eid(ckpt, layer, 1))[:, 0]
            ma = _apply(p_in, eye_a[:, None], self._eid(ckpt, layer, 0))[:, 0]
            m2 = None
            if p2 is not None:
                eye2 = torch.eye(p2.feature_dim, dtype=torch.float64, device=self.device)
                m2 = p2.project(eye2, self._eid(ckpt, layer, 2))
            out[name] = (mo, ma, m2)
        return out


def _apply(p: Projector | None, x: torch.Tensor, eid: int) -> torch.Tensor:
    """Project the last dim of ``x (B, T, d)`` (rows) or return it unchanged."""
    if p is None:
        return x
    b, t, d = x.shape
    return p.project(x.reshape(b * t, d), eid).reshape(b, t, -1)


class LoGraAttributor(_BlockProjectedIF):
    """LoGra: Kronecker-factored gradient projection + damped projected Fisher.

    Args:
        task: the attribution task (its loss a batch mean, or the published
            ``loss_func(model, batch, device)``).
        module_name: Linear module names; ``None`` = every Linear module.
        hessian: ``"eFIM"`` (damped projected empirical Fisher) or ``"Identity"``.
        damping: relative damping ``>= 0`` (``lambda_l = damping * trace(F_l) / k_l``);
            ``None`` = 0.1.
        device: computation device.
        proj_params: :class:`~dattri.params.projection.LoGraProjectionParams` or a
            dict (``proj_dim_per_layer`` a perfect square, default 4096 = 64 x 64;
            ``proj_type`` of the factor projections, ``"identity"`` for none); an
            int is taken as ``proj_dim`` (the published positional order).
        offload: where the cached training features live, ``"none"`` (device),
            ``"cpu"`` or ``"disk"`` (a resumable :mod:`dattri.store` in ``cache_dir``).
        cache_dir: folder for ``offload="disk"``.
        chunk_size: batches per block read back from the store.
        layer_names: the published name of ``module_name``.
        proj_dim: the published 0.3.0 keyword: ``proj_params={"proj_dim": k}``.
    """

    def __init__(
        self, task: AttributionTask, module_name: str | Sequence[str] | None = None,
        hessian: str = "eFIM", damping: float | None = None, device="cpu",
        proj_params: Any = None, offload: str = "none", cache_dir: str | None = None,
        chunk_size: int = 16, *, layer_names: str | Sequence[str] | None = None,
        proj_dim: int | None = None,
    ) -> None:
        module_name = published_names(module_name, layer_names)
        proj_params = published_proj_dim(proj_params, proj_dim)
        self.proj_params = parse_params(proj_params, LoGraProjectionParams)
        self._factor = square_root(self.proj_params.proj_dim_per_layer, "proj_dim_per_layer")
        super().__init__(task, module_name, hessian, damping, device, offload, cache_dir,
                         chunk_size)

    def _make_projectors(self, d_out: int, d_a: int) -> tuple:
        pp = self.proj_params

        def one(d: int) -> Projector | None:
            if pp.proj_type == "identity" or self._factor >= d:
                return None
            return get_projector(pp.proj_type, d, self._factor, seed=pp.proj_seed,
                                 max_batch_size=pp.proj_max_batch_size)

        return one(d_out), one(d_a), None
