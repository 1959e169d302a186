"""TracInCP (Pruthi et al. 2020), Grad-Dot and Grad-Cos (Charpiat et al. 2019).

    tau(i, j) = sum_c eta_c * <g_loss^c(z_i), g_target^c(z_j)>

over checkpoints c with weights ``eta_c`` (the learning rates). Grad-Dot is one
checkpoint with weight 1; Grad-Cos additionally normalises both gradients to unit
length, so its self-influence is 1 when target = loss. Gradients may be randomly
projected first (``proj_params``); without projection the inner products are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from dattri._loader import check_loader, count_examples, head, to_device
from dattri.algorithm._compat import projector_settings
from dattri.algorithm._engine import replayable, score_rows, score_stream
from dattri.algorithm._loop import each_batch
from dattri.algorithm._factored import FactoredGrads
from dattri.algorithm._score import diagonal, score_blocks
from dattri.algorithm._scored import aligned_blocks, block_rows, check_store_args, check_top_k, fill
from dattri.algorithm.base import DEFAULT_PROJECTOR_KWARGS, BaseAttributor, make_projection
from dattri.algorithm.base import projector_kwargs as projection_settings
from dattri.distributed import row_range
from dattri.errors import DattriValueError
from dattri.task import AttributionTask
from dattri.topk import TopK

__all__ = ["DEFAULT_PROJECTOR_KWARGS", "TracInAttributor"]


def _nonzero(n: torch.Tensor) -> torch.Tensor:
    # a zero row stays zero; any other norm, however small, divides (scale-free)
    return torch.where(n > 0, n, torch.ones_like(n))


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows of ``g`` scaled to unit length, in place (``g`` is the featurizer's own
    gradients of one batch: no copy of its size; a zero row stays zero), by the
    norms of :func:`_row_norms` (no underflow or overflow)."""
    return g.div_(_nonzero(_row_norms(g))[:, None])


def _row_norms(g: torch.Tensor) -> torch.Tensor:
    """Euclidean norms ``(B,)`` of the rows of ``g``, which is left as it is: one pass
    for every row, and a second, scaled by the row's largest entry, for the rows whose
    squares may have underflowed (norm below ``2^32 sqrt(tiny)``) or overflowed."""
    n = torch.linalg.vector_norm(g, dim=1)
    small = 2.0 ** 32 * torch.finfo(g.dtype).tiny ** 0.5
    bad = ((n < small) | ~torch.isfinite(n)).nonzero().flatten()
    if bad.numel():
        rows = g[bad]
        top = _nonzero(torch.linalg.vector_norm(rows, float("inf"), dim=1))
        n[bad] = torch.linalg.vector_norm(rows / top[:, None], dim=1) * top
    return n


def _cosine_stream(grads: Iterable[torch.Tensor], unit_test: torch.Tensor) -> torch.Tensor:
    """``cat_b((G_b @ U^T) / ||G_b rows||)``: Grad-Cos scores of raw training gradient
    blocks against unit test rows ``U``, the norms dividing the ``(B, m)`` scores
    instead of the ``(B, P)`` gradients (four passes over each block saved)."""
    out = [(g @ unit_test.T.to(g.dtype)).div_(_nonzero(_row_norms(g))[:, None]) for g in grads]
    return torch.cat(out) if out else unit_test.new_zeros((0, unit_test.shape[0]))


class TracInAttributor(BaseAttributor):
    """TracInCP / Grad-Dot / Grad-Cos.

    Under ``torch.distributed`` (:mod:`dattri.distributed`) each rank scores its
    share of the training loader and the rows are gathered.

    Args:
        task: attribution task; its checkpoints are the TracIn checkpoints.
        weight_list: one weight per checkpoint (learning rates), tensor or list.
        normalized_grad: normalise gradients (Grad-Cos).
        proj_params: projection settings (``TracInProjectionParams`` or dict) or
            ``None`` for exact inner products.
        layer_name: restrict to these parameters.
        device: computation device.
        projector_kwargs: 0.3.0's name for ``proj_params`` (a dict; its ``device``
            is ignored). 0.3.0 projected to 512 dimensions by default; dattri's
            default is exact inner products (``projector_kwargs={}`` projects).
        offload: ``"none"`` (features computed in ``attribute``), ``"cpu"`` (host
            memory) or ``"disk"`` (a resumable :mod:`dattri.store` in ``cache_dir``):
            ``cache(train_loader)`` then keeps every checkpoint's training features
            and ``attribute`` on that loader scores from them in blocks.
        cache_dir: the folder of ``offload="disk"``.
    """

    _shardable = True

    def __init__(
        self,
        task: AttributionTask,
        weight_list: torch.Tensor | Sequence[float],
        normalized_grad: bool,
        proj_params: Any = None,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        fast_path: bool = True,
        projector_kwargs: dict[str, Any] | None = None,
        offload: str = "none",
        cache_dir: str | None = None,
    ) -> None:
        proj_params = projector_settings(proj_params, projector_kwargs, "TracInAttributor")
        super().__init__(task, layer_name, device)
        check_store_args("TracInAttributor", offload, cache_dir)
        self.offload, self.cache_dir = offload, cache_dir
        self._stores: list[Any] = []
        try:
            w = torch.as_tensor(weight_list, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            msg = (f"weight_list={weight_list!r} must be numbers (one learning rate per "
                   "checkpoint), e.g. [0.1, 0.1] or torch.ones(len(checkpoints)).")
            raise DattriValueError(msg) from e
        if not torch.isfinite(w).all():
            msg = (f"weight_list={w.tolist()} has NaN or inf entries; pass finite "
                   "weights (the learning rates of the checkpoints).")
            raise DattriValueError(msg)
        if w.numel() != self.num_checkpoints:
            msg = (
                f"weight_list has {w.numel()} weight(s) but the task has "
                f"{self.num_checkpoints} checkpoint(s); pass one weight (learning rate) "
                "per checkpoint, e.g. torch.ones(len(checkpoints)) for Grad-Dot."
            )
            raise DattriValueError(msg)
        self.weight_list = w
        self._checkpoint_weights = w  # the engine's sum over checkpoints (_score.Ensemble)
        self.normalized_grad = bool(normalized_grad)
        self.proj_params = proj_params
        transform = make_projection(projection_settings(proj_params), self.device)
        post = _unit_rows if self.normalized_grad else None
        self.fast_path = bool(fast_path) and transform is None
        self.train_features.use_factored = self.test_features.use_factored = bool(fast_path)

        def feature(g: torch.Tensor, c: int) -> torch.Tensor:
            if transform is not None:
                g = transform(g, c)
            return post(g) if post is not None and not self._raw_train else g

        #: set while the dense exact Grad-Cos scores stream raw training gradients
        self._raw_train = False
        if getattr(transform, "sketch", None) is not None:
            # proj_type="tensorsketch": the featurizer sketches (from the layer factors
            # or its layout), then applies the row normalisation of Grad-Cos
            feature.sketch = transform.sketch
            feature.project_factored = transform.project_factored
            feature.after = lambda f, c: post(f) if post is not None else f

        feature.blockable = getattr(transform, "blockable", False)  # rows apart: any blocks
        self.train_features.transform = feature
        self.test_features.transform = feature
        self._projection = transform

    def _use_factored(self, loader: Iterable, ckpt: int) -> bool:
        if not self.fast_path:
            return False
        first = to_device(head(loader, 4), self.device)  # loads 4 examples, not a batch
        return (self.train_features.factored_ok(first, ckpt)
                and self.test_features.factored_ok(first, ckpt))

    def _unit(self, fg: FactoredGrads) -> FactoredGrads:
        if not self.normalized_grad:
            return fg
        return fg.scale_rows(_nonzero(fg.sq_norms().sqrt()).reciprocal())

    def _adjoint_cheaper(self, train_loader: Iterable, test_loader: Iterable) -> bool:
        """Whether ``<g_i M, g_j M> = <g_i, M M^T g_j>`` costs less with the test side
        projected and mapped back (``4 k P m + 2 n P m`` FLOPs) than with both sides
        projected (``2 k P (n + m) + 2 n m k``): a dense random ``M`` and few tests."""
        proj = self._projection
        kw = projection_settings(self.proj_params)
        if (proj is None or self.normalized_grad or kw is None
                or kw.get("proj_type") not in ("normal", "rademacher")):
            return False
        n, m = count_examples(train_loader), count_examples(test_loader)
        p, k = self.task.param_spec(self.layer_name).numel, int(kw["proj_dim"])
        return 4 * k * p * m + 2 * n * p * m < 0.8 * (2 * k * p * (n + m) + 2 * n * m * k)

    def _grads(self, features, loader: Iterable, c: int, name: str) -> Iterable[torch.Tensor]:
        """Unprojected per-example gradients of ``loader``'s batches (the engine's loop)."""
        return each_batch(loader, lambda b: features.grads(b, c), name, self.device,
                          f"{features.which} grads", features.show_progress)

    def _scores_by_adjoint(self, train_loader: Iterable, test_loader: Iterable, c: int) -> torch.Tensor:
        """``G_train (M M^T G_test^T)``: the projected inner products of checkpoint ``c``."""
        gt = torch.cat(list(self._grads(self.test_features, test_loader, c, "test_loader")))
        proj = self._projection.projector(gt)
        back = proj.back_project(proj.project(gt, ensemble_id=c), ensemble_id=c)
        return score_stream(self._grads(self.train_features, train_loader, c, "train_loader"), back)

    def _cache(self, train_loader: Iterable) -> None:
        """``offload="disk"``: every checkpoint's training features (projected and
        normalised as configured) into a feature store, resumed where a killed run
        stopped; otherwise nothing is precomputed (``attribute`` featurizes)."""
        if self.offload == "none":
            return
        settings = {"method": "TracIn", "proj": repr(self.proj_params),
                    "normalized": self.normalized_grad, "layer_name": repr(self.layer_name)}
        self._stores = fill(self, self.train_features, train_loader, settings)

    def _stored(self, train_loader: Iterable) -> bool:
        from dattri._loader import loader_fingerprint

        return bool(self._stores) and self._cached and (
            loader_fingerprint(train_loader) == self._train_fingerprint)

    def attribute(self, train_loader: Iterable, test_loader: Iterable,
                  top_k: int | None = None) -> torch.Tensor | TopK:
        """Scores ``(n_train, n_test)`` = weighted sum over checkpoints.

        Args:
            train_loader, test_loader: the data (fixed order).
            top_k: instead of the score matrix, each test example's ``top_k``
                proponents and opponents (:class:`dattri.topk.TopK`) from blocks of
                training rows; with ``offload="disk"`` (after ``cache``) the blocks
                are read from the feature stores and no ``n_train x n_test`` matrix
                is formed.
        """
        self._check_pair(train_loader, test_loader)
        top_k = check_top_k(top_k)
        train_loader = self._local(train_loader)
        if self._stored(train_loader):
            blocks = self._stored_blocks(test_loader)
        else:
            total = self._scores(train_loader, test_loader)
            start = row_range(total.shape[0], self._shard())[0]
            blocks = iter([(start, total)])
        return self._finish(blocks, top_k)

    def _stored_blocks(self, test_loader: Iterable) -> Iterator[tuple[int, torch.Tensor]]:
        ens = self.ensemble
        test_loader = replayable(test_loader, self.device, len(ens))
        fts = ens.each(lambda c: self.test_features.all(test_loader, c, "test grads"))
        rows = block_rows(self._stores[0].dim, fts[0].shape[0], len(fts))
        return score_blocks(aligned_blocks(self._stores, rows, self.device),
                            lambda b, c: b @ fts[c].T.to(b.dtype), ens)

    def _scores(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        """This rank's rows of the score matrix."""
        ens = self.ensemble
        train_loader = replayable(train_loader, self.device, len(ens))
        test_loader = replayable(test_loader, self.device, len(ens))
        adjoint = self._adjoint_cheaper(train_loader, test_loader)
        return ens.total(lambda c: self._checkpoint_scores(train_loader, test_loader, c, adjoint))

    def _checkpoint_scores(self, train_loader: Iterable, test_loader: Iterable, c: int,
                           adjoint: bool) -> torch.Tensor:
        """``<f_c(z_i), f_c(z_j)>`` of checkpoint ``c``: from layer factors, by the
        adjoint of the projection, or from the streamed training features."""
        if self._use_factored(train_loader, c):
            fl, ft_ = self.train_features.factored, self.test_features.factored
            ft = self._unit(FactoredGrads.cat(list(ft_.iterate(test_loader, c, "test grads"))))
            return torch.cat([self._unit(fg).gram(ft) for fg in fl.iterate(train_loader, c)])
        if adjoint:
            return self._scores_by_adjoint(train_loader, test_loader, c)
        ft = self.test_features.all(test_loader, c, "test grads")
        train = self.train_features.stream_rows(train_loader, c, score_rows(ft))
        if not (self.normalized_grad and self._projection is None):
            return score_stream(train, ft)
        self._raw_train = True  # Grad-Cos: divide the scores by the norms instead
        try:
            return _cosine_stream(train, ft)
        finally:
            self._raw_train = False

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``sum_c eta_c <g_loss^c(z_i), g_target^c(z_i)>`` as ``(n_train,)``."""
        check_loader(train_loader, "train_loader")
        ens = self.ensemble
        train_loader = replayable(self._local(train_loader), self.device, len(ens))
        return self._gather(ens.total(lambda c: self._self_scores(train_loader, c)))

    def _self_scores(self, train_loader: Iterable, c: int) -> torch.Tensor:
        """``<f^loss_c(z_i), f^target_c(z_i)>`` of checkpoint ``c`` as ``(n,)``."""
        same = self.task.original_target_func is self.task.original_loss_func
        if self._use_factored(train_loader, c):
            fl, ft_ = self.train_features.factored, self.test_features.factored
            loss = (self._unit(fg) for fg in fl.iterate(train_loader, c, "self-influence"))
            if same:
                return torch.cat([fg.sq_norms() for fg in loss])
            tgt = (self._unit(fg) for fg in ft_.iterate(train_loader, c, "self-influence targets"))
            return torch.cat([fg.rowdot(t) for fg, t in zip(loss, tgt)])
        targets = None if same else self.test_features.iterate(train_loader, c, "self-influence targets")
        return diagonal(self.train_features.iterate(train_loader, c, "self-influence"), targets)
