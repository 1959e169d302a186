r"""FactGraSS (Hu et al. 2025, "GraSS: Scalable Data Attribution with Gradient
Sparsification and Sparse Projection").

Like :class:`~dattri.algorithm.logra.LoGraAttributor`, per Linear layer, but the
factor projections are sparse: each factor is reduced by a uniformly random
coordinate mask (scaled by ``sqrt(d / r)``, unbiased) to ``r = sqrt(k * blowup)``
coordinates, the (implicit) Kronecker product of the masked factors
:math:`M_{out}^\top G M_{in}` (``r^2 = k * blowup`` entries) is formed per example,
and a second-stage sparse JL transform (SJLT; by default) maps it to ``k``:

.. math:: \hat g = \mathrm{vec}(M_{out}^\top G M_{in})\, P_2,
   \qquad \mathrm{vec}(M_{out}^\top G M_{in}) = (M_{out}\otimes M_{in})^\top \mathrm{vec}(G).

A factor already at most ``r`` wide is not masked; if ``r_out * r_in <= k`` the
second stage is skipped. The influence is the damped projected empirical Fisher
IF of LoGra (``hessian="eFIM"``) or inner products (``hessian="Identity"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dattri.algorithm.logra import (
    _BlockProjectedIF,
    parse_params,
    published_names,
    published_proj_dim,
    square_root,
)
from dattri.errors import DattriValueError
from dattri.func.projection import Projector, get_projector
from dattri.params.projection import FactGrassProjectionParams
from dattri.task import AttributionTask

__all__ = ["FactGraSSAttributor"]


class FactGraSSAttributor(_BlockProjectedIF):
    """FactGraSS: factored random masks + second-stage projection + projected-Fisher IF.

    Args:
        task: the attribution task (its loss a batch mean).
        module_name: Linear module names; ``None`` = every Linear module.
        hessian: ``"eFIM"`` or ``"Identity"``.
        damping: relative damping ``>= 0``, ``None`` = 0.1 (see LoGra).
        device: computation device.
        proj_params: :class:`~dattri.params.projection.FactGrassProjectionParams` or a
            dict: ``proj_dim_per_layer = k`` (final size per layer), ``proj_type`` of
            the second stage (``None`` params = ``"sjlt"``; ``"identity"`` = none),
            ``proj_seed``, ``proj_max_batch_size``.
        blowup_factor: ``k * blowup_factor`` must be a perfect square ``r^2``.
        offload, cache_dir, chunk_size, layer_names, proj_dim: as for
            :class:`~dattri.algorithm.logra.LoGraAttributor` (``damping`` is relative
            there too: ``lambda_l = damping * trace(F_l) / k_l``).
    """

    def __init__(
        self, task: AttributionTask, module_name: str | Sequence[str] | None = None,
        hessian: str = "eFIM", damping: float | None = None, device="cpu",
        proj_params: Any = None, blowup_factor: int = 4, offload: str = "none",
        cache_dir: str | None = None, chunk_size: int = 16, *,
        layer_names: str | Sequence[str] | None = None, proj_dim: int | None = None,
    ) -> None:
        module_name = published_names(module_name, layer_names)
        proj_params = published_proj_dim(proj_params, proj_dim)
        default = proj_params is None or (isinstance(proj_params, dict)
                                          and "proj_type" not in proj_params)
        self.proj_params = parse_params(proj_params, FactGrassProjectionParams)
        if default:
            self.proj_params.proj_type = "sjlt"
        if isinstance(blowup_factor, bool) or not isinstance(blowup_factor, int) or blowup_factor < 1:
            msg = f"blowup_factor={blowup_factor!r} must be an int >= 1."
            raise DattriValueError(msg)
        self.blowup_factor = blowup_factor
        k = self.proj_params.proj_dim_per_layer
        self._factor = square_root(k * blowup_factor, "proj_dim_per_layer * blowup_factor")
        super().__init__(task, module_name, hessian, damping, device, offload, cache_dir,
                         chunk_size)

    def _make_projectors(self, d_out: int, d_a: int) -> tuple:
        pp, r = self.proj_params, self._factor

        def mask(d: int) -> Projector | None:
            if r >= d:
                return None
            return get_projector("random_mask", d, r, seed=pp.proj_seed,
                                 max_batch_size=pp.proj_max_batch_size)

        p_out, p_in = mask(d_out), mask(d_a)
        m = min(r, d_out) * min(r, d_a)
        k = pp.proj_dim_per_layer
        p2 = None
        if pp.proj_type != "identity" and m > k:
            p2 = get_projector(pp.proj_type, m, k, seed=pp.proj_seed,
                               max_batch_size=pp.proj_max_batch_size)
        return p_out, p_in, p2
