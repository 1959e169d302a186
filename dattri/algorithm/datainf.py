r"""DataInf (Kwon et al., ICLR 2024): a closed-form inverse-curvature approximation.

The Hessian is replaced by the damped empirical Fisher, made block-diagonal over
parameter blocks ``l`` (here: one block per named parameter, e.g. ``fc1.weight``
and ``fc1.bias`` are two blocks), and the inverse of the average of rank-one
terms is replaced by the average of their inverses (Sherman-Morrison):

.. math::
    \Big(\frac1n\sum_i g_{il} g_{il}^\top + \lambda_l I\Big)^{-1} v
    \;\approx\; \frac1n \sum_i (g_{il} g_{il}^\top + \lambda_l I)^{-1} v
    = \frac{1}{\lambda_l}\Big(v - \frac1n \sum_i
      \frac{g_{il}\,(g_{il}^\top v)}{\lambda_l + \lVert g_{il}\rVert^2}\Big),

with ``g_il`` the block-``l`` part of the per-example training-loss gradient of
example ``i`` over the first ``fim_estimate_data_ratio`` of the cached training
examples (``n`` of them). The approximation is exact for ``n = 1`` and its error
vanishes as ``lambda_l`` grows. A zero ``regularization`` uses the paper's
heuristic ``lambda_l = 0.1 * mean_i ||g_il||^2 / d_l`` (``d_l`` the block size), so
nothing is divided by zero. Scores are
``tau(i, j) = sum_l g_loss,l(z_i)^T H_l^{-1} g_target,l(z_j)``; RelatIF works as for
every influence-function attributor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from dattri._loader import slice_batch
from dattri.algorithm._scored import (
    aligned_blocks,
    block_rows,
    check_store_args,
    fill,
    refuse_sharded_dropout,
)
from dattri.algorithm.influence_function import _check_nonneg, _IFBase
from dattri.errors import DattriValueError, NotCachedError
from dattri.task import AttributionTask

__all__ = ["IFAttributorDataInf", "datainf_ihvp"]


def datainf_ihvp(v: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    r"""Rows of ``(1/lam)(V - (1/n) sum_i g_i (g_i^T V) / (lam + ||g_i||^2))``.

    Args:
        v: ``(k, d)`` right-hand sides (rows).
        g: ``(n, d)`` per-example gradients of one block.
        lam: ``lambda_l > 0``.

    Returns:
        ``(k, d)``.
    """
    return (v - _fisher_sum(v, g, lam) / g.shape[0]) / lam


def _fisher_sum(v: torch.Tensor, g: torch.Tensor, lam: float) -> torch.Tensor:
    """``sum_i g_i (g_i^T V) / (lam + ||g_i||^2)`` as rows ``(k, d)`` (zeros for no ``g``)."""
    g = g.to(v.dtype)
    coef = (v @ g.T) / (lam + (g * g).sum(dim=1))  # (k, n)
    return coef @ g


class IFAttributorDataInf(_IFBase):
    """Influence function with the DataInf inverse (Kwon et al. 2024).

    Under ``torch.distributed`` each rank holds the per-example gradients of the
    Fisher examples (the first ones of the whole training order) in its share; the
    heuristic's mean of ``||g_il||^2`` and the sums of the inverse are summed over
    the ranks, so every rank applies the single-process inverse.

    Args:
        task: the attribution task.
        layer_name: restrict to these parameters (each is one block).
        device: computation device.
        regularization: ``lambda`` (the same for every block); ``0`` means the
            per-block heuristic ``0.1 * mean_i ||g_il||^2 / d_l``.
        fim_estimate_data_ratio: fraction in ``(0, 1]`` of the cached training
            examples (the first ones, in loader order) used for the Fisher terms.
        offload: where the cached per-example training gradients live: ``"none"``
            (the Fisher examples' on the device), ``"cpu"`` (every cached example's,
            host memory) or ``"disk"`` (a resumable :mod:`dattri.store` in
            ``cache_dir``, one per checkpoint and rank, keyed by the weights and the
            loader). Kept gradients serve the Fisher sums (read in blocks) and the
            training side of the scores on the cached loader, so a rerun on the same
            ``cache_dir`` computes no training gradient.
        cache_dir: the folder of ``offload="disk"``.
    """

    _ihvp_reads_data = True

    def __init__(
        self, task: AttributionTask, layer_name=None, device="cpu",
        regularization: float = 0.0, fim_estimate_data_ratio: float = 1.0,
        offload: str = "none", cache_dir: str | None = None,
    ) -> None:
        super().__init__(task, layer_name, device)
        _check_nonneg("regularization", regularization)
        check_store_args("IFAttributorDataInf", offload, cache_dir)
        self.offload, self.cache_dir = offload, cache_dir
        self._kept: list[Any] = []
        r = fim_estimate_data_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r <= 1:
            msg = (f"fim_estimate_data_ratio={r!r} must be a number in (0, 1], the "
                   "fraction of training examples used to estimate the Fisher.")
            raise DattriValueError(msg)
        self.regularization = float(regularization)
        self.fim_estimate_data_ratio = float(r)

    def _fisher_count(self) -> int:
        """``m = ceil(ratio * n)``: the Fisher examples, the first of the whole training set."""
        return max(1, math.ceil(self.fim_estimate_data_ratio * self.data.n - 1e-9))

    def _fisher_batches(self) -> Iterable[Any]:
        """This rank's cached examples among the first :meth:`_fisher_count` of the
        whole training order, as batches."""
        m = self._fisher_count() - self.data.row_start  # still to take from here on
        for batch, size in zip(self.data.batches, self.data.sizes):
            if m <= 0:
                return
            yield batch if size <= m else slice_batch(batch, slice(0, m))
            m -= size

    def _cache(self, train_loader: Iterable) -> None:
        refuse_sharded_dropout(self, "IFAttributorDataInf")
        self._fisher_g: dict[int, torch.Tensor] = {}  # offload="none": the Fisher rows
        if self.offload != "none":
            settings = {"method": "IF-DataInf", "layer_name": repr(self.layer_name)}
            self._kept = fill(self, self.train_features, train_loader, settings)
        super()._cache(train_loader)

    def _fisher_rows(self, ckpt: int) -> Iterator[torch.Tensor]:
        """This rank's per-example gradients of the Fisher examples, in row blocks
        (from the kept gradients: the rows whose global index is below the count)."""
        if not self._kept:
            yield self._fisher_g[ckpt]
            return
        m = self._fisher_count()
        for start, g in self._kept[ckpt].blocks(device=self.device):
            if start >= m:
                return
            yield g[:m - start]

    def _fit(self, ckpt: int) -> list[tuple[slice, float]]:
        if not self._kept:
            parts = [self.train_features.batch(b, ckpt) for b in self._fisher_batches()]
            # a rank past the Fisher rows holds none
            self._fisher_g[ckpt] = torch.cat(parts) if parts else self._rows(None)
        m = self._fisher_count()
        slices = list(self.task.param_spec(self.layer_name).slices().values())
        # the heuristic's mean_i ||g_il||^2 over all m Fisher examples, every block at once
        sq = torch.zeros(len(slices), dtype=torch.float64, device=self.device)
        for g in self._fisher_rows(ckpt):
            sq += torch.stack([(g[:, sl] * g[:, sl]).sum() for sl in slices]).to(sq)
        sq = self.data.reduce(sq)
        blocks = []
        for sl, sq_l in zip(slices, sq.tolist()):
            if self.regularization > 0:
                lam = self.regularization
            else:
                lam = 0.1 * (sq_l / m) / (sl.stop - sl.start)
                if lam <= 0:  # all-zero block: no curvature, any lambda gives 0 scores
                    lam = 1.0
            blocks.append((sl, lam))
        return blocks

    def _solve(self, v: torch.Tensor, ckpt: int) -> torch.Tensor:
        blocks = self._state[ckpt]
        # this rank's Fisher sums of every block, then summed over the ranks (one call)
        part = torch.zeros_like(v)
        for g in self._fisher_rows(ckpt):
            for sl, lam in blocks:
                part[:, sl] += _fisher_sum(v[:, sl], g[:, sl], lam)
        total = self.data.reduce(part) / self._fisher_count()
        out = torch.empty_like(v)
        for sl, lam in blocks:
            out[:, sl] = (v[:, sl] - total[:, sl]) / lam
        return out

    def _kept_blocks(self, train_loader: Iterable) -> Iterator[list[torch.Tensor] | None] | None:
        """The kept training gradients on the cached loader, read in blocks (lockstep
        over the ranks); ``None`` for any other loader."""
        from dattri._loader import loader_fingerprint

        if not self._kept or loader_fingerprint(train_loader) != self._train_fingerprint:
            return None
        rows = block_rows(self._kept[0].dim, 0, len(self._kept))
        steps = -(-self._kept[0].n // rows) if self._collective() else 0
        blocks = self._lockstep(aligned_blocks(self._kept, rows, self.device), steps)
        return (None if part is None else part[1] for part in blocks)

    def block_lambdas(self, ckpt: int = 0) -> list[float]:
        """The ``lambda_l`` used for each block at checkpoint ``ckpt`` (after ``cache``)."""
        if ckpt not in self._state:
            msg = "block_lambdas needs cache(train_loader) first (and a valid ckpt index)."
            raise NotCachedError(msg)
        return [lam for _, lam in self._state[ckpt]]
