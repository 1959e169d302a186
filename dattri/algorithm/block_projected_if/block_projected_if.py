r"""Block-projected influence functions: LoGra and FactGraSS with any two stages.

For every selected ``nn.Linear`` layer the per-example gradient ``G = s a^T`` is
compressed in two stages, never formed in full: a *sparsifier* projects each factor
(``a`` to ``k_in``, ``s`` to ``k_out`` dimensions, any ``proj_type``), then an optional
*projector* maps the ``k_out k_in`` product to ``k``. Scores are those of
:mod:`dattri.algorithm.logra` on the compressed features: block-diagonal damped
empirical Fisher per layer (``hessian="eFIM"``; relative damping
``lambda_l = damping * trace(F_l) / k_l``) or plain inner products
(``hessian="Identity"``). LoGra is a normal sparsifier with no projector, FactGraSS
a random-mask sparsifier with an SJLT projector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dattri.algorithm.logra import _BlockProjectedIF
from dattri.errors import DattriValueError
from dattri.func.projection import Projector, get_projector
from dattri.task import AttributionTask

__all__ = ["BlockProjectedIFAttributor"]

#: the published defaults of the two stages
DEFAULT_SPARSIFIER = {"proj_dim": 32, "proj_max_batch_size": 64, "proj_type": "normal", "proj_seed": 0}
DEFAULT_PROJECTOR = {"proj_dim": -1, "proj_max_batch_size": 64, "proj_type": "identity", "proj_seed": 0}
_KEYS = {"proj_dim", "proj_max_batch_size", "proj_type", "proj_seed", "device"}


def _stage(kwargs: dict[str, Any] | None, default: dict[str, Any], name: str) -> dict[str, Any]:
    if kwargs is None:
        return dict(default)
    if not isinstance(kwargs, dict):
        msg = f"{name} must be a dict of projection settings or None, got {type(kwargs).__name__}."
        raise DattriValueError(msg)
    unknown = sorted(set(kwargs) - _KEYS)
    if unknown:
        msg = f"{name} has unknown key(s) {unknown}; valid keys: {sorted(_KEYS)}."
        raise DattriValueError(msg)
    out = {**default, **kwargs}
    out.pop("device", None)
    return out


class BlockProjectedIFAttributor(_BlockProjectedIF):
    """Two-stage factored gradient compression + per-layer projected-Fisher IF.

    Args:
        task: the attribution task (batched loss, or ``loss_func(model, batch, device)``).
        layer_names: Linear module names; ``None`` = every Linear module.
        hessian: ``"eFIM"`` or ``"Identity"``.
        damping: relative damping (``None`` = 0.1).
        device: computation device.
        sparsifier_kwargs: first stage, per factor: ``proj_dim`` (each factor's size),
            ``proj_type``, ``proj_seed``, ``proj_max_batch_size`` (default normal, 32).
        projector_kwargs: second stage on the ``k_out k_in`` product: ``proj_dim``
            (``-1`` or ``proj_type="identity"`` = none, the default).
        offload: ``"none"``, ``"cpu"`` or ``"disk"`` (cached features, see LoGra).
        cache_dir: folder for ``offload="disk"``.
        chunk_size: batches per block read back.
    """

    def __init__(
        self, task: AttributionTask, layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM", damping: float | None = None, device: Any = "cpu",
        sparsifier_kwargs: dict[str, Any] | None = None,
        projector_kwargs: dict[str, Any] | None = None, offload: str = "none",
        cache_dir: str | None = None, chunk_size: int = 16,
    ) -> None:
        self.sparsifier_kwargs = _stage(sparsifier_kwargs, DEFAULT_SPARSIFIER, "sparsifier_kwargs")
        self.projector_kwargs = _stage(projector_kwargs, DEFAULT_PROJECTOR, "projector_kwargs")
        k = self.sparsifier_kwargs["proj_dim"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            msg = f"sparsifier_kwargs['proj_dim']={k!r} must be an int >= 1 (each factor's size)."
            raise DattriValueError(msg)
        super().__init__(task, layer_names, hessian, damping, device, offload, cache_dir, chunk_size)

    def _make_projectors(self, d_out: int, d_a: int) -> tuple:
        sp, pj = self.sparsifier_kwargs, self.projector_kwargs
        r = sp["proj_dim"]

        def first(d: int) -> Projector | None:
            if sp["proj_type"] == "identity" or r >= d:
                return None
            return get_projector(sp["proj_type"], d, r, seed=sp["proj_seed"],
                                 max_batch_size=sp["proj_max_batch_size"])

        m = min(r, d_out) * min(r, d_a)
        k = pj["proj_dim"]
        p2 = None
        if pj["proj_type"] != "identity" and k is not None and 0 < k < m:
            p2 = get_projector(pj["proj_type"], m, k, seed=pj["proj_seed"],
                               max_batch_size=pj["proj_max_batch_size"])
        return first(d_out), first(d_a), p2
