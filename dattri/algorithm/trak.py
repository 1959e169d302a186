"""TRAK (Park et al. 2023): attribution with the randomly projected after-kernel.

With ``Phi_c`` the projected per-example gradients ``(n, k)`` of the model-output
function (the task's ``loss_func``, e.g. the margin log(p / (1 - p))) on the
training set at checkpoint c, ``phi_c`` those of the target on the test set and
``Q_c = diag(1 - p_i)`` the training residuals,

    tau = (1/C sum_c Q_c) . (1/C sum_c Phi_c (Phi_c^T Phi_c + lambda I)^{-1} phi_c^T)

an ``(n_train, n_test)`` matrix; positive = proponent. When the feature dimension
k exceeds n the identity ``Phi (Phi^T Phi + lambda I)^{-1} = (Phi Phi^T + lambda I)^{-1} Phi``
is used, so an identity projection gives the exact (pseudo-inverse) closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.func import vmap

from dattri._convention import as_batched, is_unbatched
from dattri._loader import batch_size_of
from dattri.algorithm._batched import _same_mask_dropout
from dattri.algorithm._compat import projector_settings
from dattri.algorithm._engine import ensemble_rng, replayable
from dattri.algorithm._loop import LoaderFeatures
from dattri.algorithm._score import score_blocks
from dattri.algorithm.base import DEFAULT_PROJECTOR_KWARGS, BaseAttributor, make_projection
from dattri.algorithm.base import projector_kwargs as projection_settings
from dattri.algorithm._scored import (
    aligned_blocks,
    block_rows,
    check_store_args,
    check_top_k,
    fill,
)
from dattri.distributed import all_gather_rows, all_reduce, row_range
from dattri.topk import TopK
from dattri.errors import DattriValueError, NotCachedError
from dattri.linalg import gram
from dattri.linalg.gram import GramCholesky
from dattri.linalg.operators import GramPreconditioner
from dattri.task import AttributionTask, batch_of_one

__all__ = ["DEFAULT_PROJECTOR_KWARGS", "TRAKAttributor", "kernel_factor", "kernel_scores"]


def kernel_factor(phi: torch.Tensor, regularization: float) -> tuple[str, GramCholesky]:
    """Factor the Gram matrix (float64) in the cheaper of the primal (k x k) or dual
    (n x n) form: ``Phi (Phi^T Phi + lambda I)^{-1} = (Phi Phi^T + lambda I)^{-1} Phi``.

    Returns ``(form, factor)``: ``factor.solve(B)`` maps rows ``b_r`` to
    ``(K + lambda I)^{-1} b_r`` through a Cholesky factor in packed storage
    (:class:`dattri.linalg.GramCholesky`; no explicit inverse, which would cost three
    times the factorisation), or through the eigen pseudo-inverse, with a warning,
    when ``K + lambda I`` is singular. Float64, because in float32 the rounding of
    an ill-conditioned Gram matrix (MNIST MLP: condition number 4e9) makes it look
    indefinite.
    """
    n, k = phi.shape
    form = "primal" if k <= n else "dual"
    return form, GramCholesky(phi, regularization, transpose=form == "dual")


def kernel_scores(phi: torch.Tensor, form: str, factor: GramCholesky, test: torch.Tensor) -> torch.Tensor:
    """``Phi (Phi^T Phi + lambda I)^{-1} test^T`` as ``(n, m)`` (float64 inside,
    smallest products first), returned in ``phi``'s dtype.

    The product with ``Phi`` stays in float64: in float32 it would add a relative
    error of ~5e-4 on the MNIST MLP (the ill-conditioned solve amplifies it), a
    thousand times the scores' sensitivity to rounding ``Phi`` itself.
    """
    t = test.to(torch.float64)
    if form == "dual":
        return factor.solve((phi.to(torch.float64) @ t.T).T).T.to(phi.dtype)
    x = factor.solve(t).T.to(phi.device)  # (k, m)
    out = phi.new_empty(phi.shape[0], t.shape[0])
    step = max(1, gram.BLOCK_ELEMENTS // max(1, phi.shape[1]))  # float64 row blocks
    for start in range(0, phi.shape[0], step):
        out[start:start + step] = phi[start:start + step].to(torch.float64) @ x
    return out


class _Residuals(LoaderFeatures):
    """The featurizer of TRAK's residuals ``1 - p`` ``(B, 1)`` (for a feature store)."""

    which = "loss"

    def __init__(self, att: TRAKAttributor) -> None:
        self.att, self.device, self.show_progress = att, att.device, att.show_progress

    def batch(self, batch: Any, ckpt: int) -> torch.Tensor:
        return (1 - self.att._probabilities(batch, ckpt))[:, None]


class TRAKAttributor(BaseAttributor):
    """TRAK with projection, Q weighting and a checkpoint ensemble.

    Under ``torch.distributed`` (:mod:`dattri.distributed`) each rank featurizes its
    share of the training loader; the Gram matrix ``Phi^T Phi`` is summed over the
    ranks (or, when ``k`` exceeds the number of training examples, the features are
    gathered for the dual form) and the score rows are gathered.

    Args:
        task: its ``loss_func`` is the model-output function (margin); its
            checkpoints are the ensemble (TRAK-1/10/50 = 1/10/50 checkpoints).
        correct_probability_func: ``f(params, data) -> p`` the probability of the
            correct class (called per example on batches of one).
        proj_params: ``TRAKProjectionParams`` / dict / ``None`` (default: normal
            projection to 512 dims); ``proj_type="identity"`` for no projection.
        layer_name: restrict to these parameters.
        device: computation device.
        regularization: lambda added to the kernel's diagonal.
        projector_kwargs: 0.3.0's name for ``proj_params`` (a dict merged into the
            default projection; its ``device`` is ignored).
        offload: where the cached training features live: ``"none"`` (on the
            device), ``"cpu"`` (host memory, scored in blocks on the device) or
            ``"disk"`` (a :mod:`dattri.store` in ``cache_dir``, written batch by batch,
            resumed after a crash, read back in blocks).
        cache_dir: the folder of ``offload="disk"``.
    """

    _shardable = True
    _uses_preconditioner = True

    def __init__(
        self,
        task: AttributionTask,
        correct_probability_func: Callable,
        proj_params: Any = None,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
        regularization: float = 0.0,
        projector_kwargs: dict[str, Any] | None = None,
        offload: str = "none",
        cache_dir: str | None = None,
    ) -> None:
        proj_params = projector_settings(proj_params, projector_kwargs, "TRAKAttributor")
        super().__init__(task, layer_name, device)
        check_store_args("TRAKAttributor", offload, cache_dir)
        self.offload, self.cache_dir = offload, cache_dir
        if not callable(correct_probability_func):
            msg = "correct_probability_func must be callable f(params, data) -> probability."
            raise DattriValueError(msg)
        if regularization < 0:
            msg = f"regularization={regularization!r} must be >= 0."
            raise DattriValueError(msg)
        # either convention (batch or 0.3.0's single example), detected on first use
        self.correct_probability_func = as_batched(correct_probability_func,
                                                   "correct_probability_func")
        self.regularization = float(regularization)
        if proj_params is None:
            proj_params = {**{k: v for k, v in DEFAULT_PROJECTOR_KWARGS.items() if k != "device"},
                           "proj_type": "normal"}
        self.proj_params = proj_params
        transform = make_projection(projection_settings(proj_params), self.device)
        self.train_features.transform = transform
        self.test_features.transform = transform
        self._phi: list[torch.Tensor] = []
        self._preconditioners: dict[int, GramPreconditioner] = {}
        self._dual: list[tuple[torch.Tensor, int, int] | None] = []
        self._stores: list[Any] = []
        self._q: torch.Tensor | None = None

    def _factor(self, phi: torch.Tensor) -> tuple[GramPreconditioner, Any]:
        """The inverse kernel of the whole training set from this rank's rows ``phi``;
        with the gathered rows and this rank's ``(start, stop)`` in the dual form."""
        shard, k = self._shard(), phi.shape[1]
        if shard is None:
            form, factor = kernel_factor(phi, self.regularization)
            return GramPreconditioner(form, factor, k, phi if form == "dual" else None), None
        start, stop, n = row_range(phi.shape[0], shard)
        if k <= n:
            g = all_reduce(gram.gram64(phi), shard)
            return GramPreconditioner("primal", GramCholesky.from_gram(g, self.regularization), k), None
        full = all_gather_rows(phi, shard)
        factor = GramCholesky(full, self.regularization, transpose=True)
        return GramPreconditioner("dual", factor, k, full), (full, start, stop)

    def _kernel_scores(self, c: int, ft: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``Phi_c (Phi_c^T Phi_c + lambda I)^{-1} ft^T``."""
        p = self._preconditioners[c]
        if self._dual[c] is None:
            return kernel_scores(self._phi[c], p.form, p.factor, ft)
        full, start, stop = self._dual[c]
        return kernel_scores(full, p.form, p.factor, ft)[start:stop]

    def _probabilities(self, batch: Any, ckpt: int) -> torch.Tensor:
        task = self.task
        task._load_checkpoints(ckpt)
        params = dict(task.named_parameters)
        func = self.correct_probability_func
        with torch.no_grad(), ensemble_rng(ckpt, self.device):
            func.resolve(params, batch)
        if not is_unbatched(func):
            # a batched function giving (B,) probabilities: one call (dropout masks
            # shared by the examples, as in the per-example form below)
            with torch.no_grad(), ensemble_rng(ckpt, self.device), _same_mask_dropout(task.model):
                p = func(params, batch)
            if isinstance(p, torch.Tensor) and tuple(p.shape) == (batch_size_of(batch),):
                return p

        def one(example: Any) -> torch.Tensor:
            return self.correct_probability_func(params, batch_of_one(example)).reshape(())

        with torch.no_grad(), ensemble_rng(ckpt, self.device):
            return vmap(one, randomness="same")(batch)

    def _cache(self, train_loader: Iterable) -> None:
        if self.offload != "none":
            self._cache_kept(train_loader)
            return
        self._stores = []
        ens = self.ensemble
        train_loader = replayable(train_loader, self.device, len(ens))
        fitted = ens.each(lambda c: self._fit_checkpoint(train_loader, c))
        self._phi = [phi for phi, _, _, _ in fitted]
        self._preconditioners = dict(enumerate(factor for _, factor, _, _ in fitted))
        self._dual = [dual for _, _, dual, _ in fitted]
        self._q = ens.combine([q for _, _, _, q in fitted])

    def _fit_checkpoint(self, train_loader: Iterable, c: int) -> tuple:
        """``(Phi_c, its kernel factor, the dual form's rows or None, 1 - p_c)`` from
        one pass over the loader at checkpoint ``c``."""
        feats, qc = [], []
        for b, f in self.train_features.iterate(train_loader, c, "train grads", with_batch=True):
            feats.append(f)
            qc.append(1 - self._probabilities(b, c))
        if not feats:
            msg = "train_loader yielded no batches; pass a non-empty loader."
            raise DattriValueError(msg)
        phi = torch.cat(feats)
        del feats
        factor, dual = self._factor(phi)
        return phi, factor, dual, torch.cat(qc)

    def _cache_kept(self, train_loader: Iterable) -> None:
        """``offload="disk"``: the features of each checkpoint into a feature store
        (resumed where a killed run stopped), the Gram matrix summed over its
        blocks, the residuals ``Q`` from a forward pass; ``offload="cpu"``: the same
        with the features in host memory."""
        settings = {"method": "TRAK", "proj": repr(self.proj_params),
                    "layer_name": repr(self.layer_name)}
        self._stores = fill(self, self.train_features, train_loader, settings)
        shard = self._shard()
        n = row_range(self._stores[0].n, shard)[2]
        fitted = self.ensemble.each(lambda c: self._fit_store(self._stores[c], n))
        self._phi = [phi for phi, _, _ in fitted]
        self._preconditioners = dict(enumerate(factor for _, factor, _ in fitted))
        self._dual = [dual for _, _, dual in fitted]
        # the residuals 1 - p, in stores of their own (resumed like the features)
        q_stores = fill(self, _Residuals(self), train_loader, {**settings, "what": "1-p"},
                        desc="train residuals", subdir="residuals")
        self._q = self.ensemble.combine(
            [torch.cat([b for _, b in qs.blocks(device=self.device)])[:, 0] for qs in q_stores])

    def _fit_store(self, store: Any, n: int) -> tuple:
        """``(Phi or None, kernel factor, dual rows or None)`` of one checkpoint's store
        (``n``: training examples over every rank)."""
        if store.dim > n:  # the dual form needs every row: read them (n is small)
            phi = torch.cat([b for _, b in store.blocks(device=self.device)])
            factor, dual = self._factor(phi)
            return phi, factor, dual
        g = None
        for _, b in store.blocks(device=self.device):
            part = gram.gram64(b)
            g = part if g is None else g.add_(part)
        g = all_reduce(g, self._shard())
        factor = GramCholesky.from_gram(g, self.regularization)
        return None, GramPreconditioner("primal", factor, store.dim), None

    def _test_side(self, c: int, ft: torch.Tensor) -> torch.Tensor:
        """``(Phi_c^T Phi_c + lambda I)^{-1} ft^T`` as ``(k, m)`` float64 (primal form)."""
        return self._preconditioners[c].solve(ft).T.to(self.device)

    def _score_blocks(self, test_feats: list[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_row_start, scores (b, m))`` of this rank's training rows, one
        block at a time (from the stores, or from the features in memory)."""
        shard, ens = self._shard(), self.ensemble
        if any(p.form == "dual" for p in self._preconditioners.values()):
            # the dual form solves with every row: the block is the rank's whole part
            total = ens.combine(ens.each(lambda c: self._kernel_scores(c, test_feats[c])))
            start = row_range(total.shape[0], shard)[0]
            yield start, self._q[:, None].to(total.dtype) * total
            return
        xs = ens.each(lambda c: self._test_side(c, test_feats[c]))
        rows = block_rows(xs[0].shape[0], xs[0].shape[1], len(xs))
        if self._stores:
            blocks = aligned_blocks(self._stores, rows, self.device)
            first = self._stores[0].row_offset
        else:
            first = row_range(self._phi[0].shape[0], shard)[0]
            blocks = ((first + i, [p[i:i + rows] for p in self._phi])
                      for i in range(0, self._phi[0].shape[0], rows))
        dtype = test_feats[0].dtype
        for start, s in score_blocks(blocks, lambda b, c: b.to(torch.float64) @ xs[c], ens):
            q = self._q[start - first:start - first + s.shape[0], None].to(torch.float64)
            yield start, (q * s).to(dtype)

    def attribute(self, *loaders: Iterable, top_k: int | None = None) -> torch.Tensor | TopK:
        """``attribute(train_loader, test_loader)`` or, after ``cache``, ``attribute(test_loader)``.

        Args:
            top_k: instead of the score matrix, each test example's ``top_k``
                proponents and opponents (a :class:`dattri.topk.TopK`), from score
                blocks of the training rows: the ``n_train x n_test`` matrix is never
                formed (with ``offload="disk"``, the training features are read from
                the stores block by block).

        Returns:
            Scores ``(n_train, n_test)``, or a :class:`~dattri.topk.TopK` with ``top_k``.
        """
        top_k = check_top_k(top_k)
        if len(loaders) == 1:
            if not self._cached:
                msg = ("TRAKAttributor.attribute(test_loader) needs cache(train_loader) "
                       "first; or call attribute(train_loader, test_loader).")
                raise NotCachedError(msg)
            test_loader = loaders[0]
        elif len(loaders) == 2:
            train_loader, test_loader = loaders
            self._check_pair(train_loader, test_loader)
            self._ensure_cached(train_loader)
        else:
            msg = f"attribute takes (train_loader, test_loader) or (test_loader,), got {len(loaders)} loaders."
            raise DattriValueError(msg)
        test_loader = replayable(test_loader, self.device, self.num_checkpoints)
        test_feats = self.ensemble.each(lambda c: self.test_features.all(test_loader, c, "test grads"))
        blocks = self._score_blocks(test_feats)
        return self._finish(blocks, top_k)

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``Q_i * mean_c <[Phi_c K_c^{-1}]_i, phi_target^c(z_i)>`` as ``(n_train,)``."""
        train_loader = self._local(train_loader)
        self._ensure_cached(train_loader)
        train_loader = replayable(train_loader, self.device, self.num_checkpoints)
        total = self.ensemble.total(lambda c: self._self_scores(train_loader, c))
        return self._gather(self._q.to(total.dtype) * total)

    def _self_scores(self, train_loader: Iterable, c: int) -> torch.Tensor:
        """``<[Phi_c K_c^{-1}]_i, phi_target^c(z_i)>`` of this rank's rows, ``(n,)``."""
        ft = self.test_features.all(train_loader, c, "self grads").to(torch.float64)
        p = self._preconditioners[c]
        form, factor = p.form, p.factor
        if form == "primal":  # row i of Phi K^{-1} (K symmetric)
            phi = self._phi[c]
            if phi is None:  # offload="disk": this rank's rows from the store
                phi = torch.cat([b for _, b in self._stores[c].blocks(device=self.device)])
            f = phi.to(torch.float64)
            r = factor.solve(f).to(f.device)
        else:  # row i of K^{-1} Phi, this rank's rows of it
            full, start, stop = self._dual[c] or (self._phi[c], 0, self._phi[c].shape[0])
            f = full.to(torch.float64)
            r = factor.solve(f.T).T.to(f.device)[start:stop]
        dtype = self._stores[c].dtype if self._phi[c] is None else self._phi[c].dtype
        return (r * ft).sum(dim=1).to(dtype)
