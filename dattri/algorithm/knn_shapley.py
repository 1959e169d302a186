r"""Exact KNN-Shapley (Jia et al., VLDB 2019, "Efficient Task-Specific Data
Valuation for Nearest Neighbor Algorithms").

For a test point with label ``y`` and an unweighted K-nearest-neighbour classifier,
the utility of a training subset ``S`` is
:math:`U(S) = \frac1K \sum_{k=1}^{\min(K, |S|)} 1[y_{\alpha_k(S)} = y]` (``alpha_k(S)``
the k-th nearest point of ``S``, ``U(\emptyset) = 0``). Sorting the ``N`` training
points by distance, nearest first (``alpha_1, ..., alpha_N``; ties by index), its
Shapley values are exactly

.. math::
    s_{\alpha_N} = \frac{1[y_{\alpha_N} = y]}{N}, \qquad
    s_{\alpha_i} = s_{\alpha_{i+1}} + \frac{1[y_{\alpha_i} = y] - 1[y_{\alpha_{i+1}} = y]}{K}
                   \cdot \frac{\min(K, i)}{i},

computed for all test points at once in ``O(N log N)`` each. Scores are
``(n_train, n_test)`` (deliberately; older releases returned ``(n_test, n_train)``).
Features are a user ``feature_func(batch) -> (B, d)`` (e.g. embeddings) or the raw
inputs flattened; distances ``distance_func(train (n, d), test (m, d)) -> (n, m)``
(default Euclidean).

Under ``torch.distributed`` each rank reads the features of its share of the
training loader and the ranks' features are gathered (``(n, d)``, small); each
rank then runs the exact recursion over all ``n`` training points for its block
of test points, and the columns are gathered: the values of one process. A
``distance_func`` must then treat test points independently (each column of its
result depends only on its own test point), as any pairwise distance does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from dattri._loader import batch_size_of, check_loader
from dattri.algorithm._engine import resolve_device
from dattri.algorithm._loop import LoaderFeatures, map_batches
from dattri.algorithm._scored import check_store_args, check_top_k, fill
from dattri.algorithm.base import BaseAttributor
from dattri.distributed import all_gather_rows, split
from dattri.errors import DattriValueError, NonFiniteError
from dattri.func.utils import all_finite
from dattri.task import AttributionTask
from dattri.topk import TopK, concat_topk, topk_from_blocks

__all__ = ["KNNShapleyAttributor", "knn_shapley"]

_LABEL_KEYS = ("label", "labels", "y", "target")


#: bytes of one block of test columns in ``attribute(..., top_k=k)`` (distances,
#: their order and the values, float64, for every training point)
TOPK_BYTES = 64 << 20


def knn_shapley(dist: torch.Tensor, train_labels: torch.Tensor, test_labels: torch.Tensor,
                k_neighbors: int) -> torch.Tensor:
    """Exact KNN-Shapley values ``(n, m)`` from distances ``(n, m)`` (module docstring)."""
    n, _ = dist.shape
    order = torch.sort(dist, dim=0, stable=True).indices  # (n, m): nearest first
    match = (train_labels[order] == test_labels[None, :]).to(torch.float64)
    s = torch.empty_like(match)
    s[-1] = match[-1] / n
    if n > 1:
        i = torch.arange(1, n, dtype=torch.float64, device=dist.device)[:, None]  # 1..N-1
        step = (match[:-1] - match[1:]) * torch.clamp(i, max=k_neighbors) / (k_neighbors * i)
        s[:-1] = s[-1] + step.flip(0).cumsum(0).flip(0)
    out = torch.empty_like(s)
    out.scatter_(0, order, s)
    return out


class KNNShapleyAttributor(BaseAttributor):
    """KNN-Shapley data values.

    Args:
        k_neighbors: ``K`` of the KNN classifier, ``>= 1``.
        task: optional; unused by the computation (kept for API symmetry).
        distance_func: ``f(train (n, d), test (m, d)) -> (n, m)``; default ``torch.cdist``.
        feature_func: ``f(batch) -> (B, d)``; default: the batch inputs (first
            element of a tuple/list batch, or the tensor itself) flattened.
        label_func: ``f(batch) -> (B,)``; default: the second element of a
            tuple/list batch, or a ``"label(s)"``/``"y"``/``"target"`` dict key.
        device: where distances are computed.
        transpose: return ``(n_test, n_train)`` as the 0.3.0 release did
            (default False: ``(n_train, n_test)`` like every attributor).
        offload: where the training features live: ``"none"`` (gathered on the
            device), ``"cpu"`` (this rank's rows in host memory) or ``"disk"`` (this
            rank's rows in a resumable :mod:`dattri.store` under ``cache_dir``, keyed
            by the loader and ``feature_func``'s name). Kept rows are read in blocks:
            each rank computes its rows' distances to every test point and the
            distance rows are gathered (the size of the result).
        cache_dir: the folder of ``offload="disk"``.
    """

    _shardable = True

    def __init__(
        self, k_neighbors: int, task: AttributionTask | None = None,
        distance_func: Callable | None = None, feature_func: Callable | None = None,
        label_func: Callable | None = None, device: str | torch.device = "cpu",
        transpose: bool = False, offload: str = "none", cache_dir: str | None = None,
    ) -> None:
        if isinstance(k_neighbors, bool) or not isinstance(k_neighbors, int) or k_neighbors < 1:
            msg = f"k_neighbors={k_neighbors!r} must be an int >= 1 (the K of the KNN classifier)."
            raise DattriValueError(msg)
        if task is not None and not isinstance(task, AttributionTask):
            msg = f"task must be None or an AttributionTask, got {type(task).__name__}."
            raise DattriValueError(msg)
        for name, f in (("distance_func", distance_func), ("feature_func", feature_func),
                        ("label_func", label_func)):
            if f is not None and not callable(f):
                msg = f"{name} must be None or callable, got {type(f).__name__}."
                raise DattriValueError(msg)
        self.k_neighbors, self.task = k_neighbors, task
        self.distance_func = distance_func or torch.cdist
        self.feature_func, self.label_func = feature_func, label_func
        self.device = resolve_device(device)
        self.transpose = bool(transpose)
        check_store_args("KNNShapleyAttributor", offload, cache_dir)
        self.offload, self.cache_dir = offload, cache_dir
        self._kept: Any = None
        self.show_progress: bool | None = None
        self._cached = False
        self._train: tuple[torch.Tensor, torch.Tensor] | None = None

    def _features_labels(self, loader: Iterable, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        check_loader(loader, name)
        parts = map_batches(loader, lambda b: (self._feature(b).reshape(batch_size_of(b), -1),
                                               self._label(b).reshape(-1)),
                            name, self.device, f"{name} features", self.show_progress)
        return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])

    def _feature(self, batch: Any) -> torch.Tensor:
        if self.feature_func is not None:
            with torch.no_grad():
                return _finite_features(self.feature_func(batch), "feature_func(batch)")
        if isinstance(batch, torch.Tensor):
            return _finite_features(batch, "a batch")
        if isinstance(batch, (tuple, list)) and batch:
            return _finite_features(batch[0], "a batch's inputs")
        msg = (f"cannot take features from a {type(batch).__name__} batch; pass "
               "feature_func=lambda batch: ... returning (B, d).")
        raise DattriValueError(msg)

    def _label(self, batch: Any) -> torch.Tensor:
        if self.label_func is not None:
            return self.label_func(batch)
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:  # noqa: PLR2004
            return batch[1]
        if isinstance(batch, dict):
            for k in _LABEL_KEYS:
                if k in batch:
                    return batch[k]
        msg = (f"cannot find labels in a {type(batch).__name__} batch; yield (x, y) "
               "batches or pass label_func=lambda batch: ... returning (B,).")
        raise DattriValueError(msg)

    def cache(self, train_loader: Iterable | None = None) -> KNNShapleyAttributor:
        """Read the training features once; ``cache()`` without a loader (0.3.0)
        does nothing and ``attribute`` reads them."""
        if train_loader is None:
            self._read_at_attribute = True
            return self
        return super().cache(train_loader)

    def _cache(self, train_loader: Iterable) -> None:
        shard = self._shard()
        if self.offload == "none":
            x, y = self._features_labels(train_loader, "train_loader")  # this rank's share
            self._train = all_gather_rows(x, shard), all_gather_rows(y, shard)
            return
        name = getattr(self.feature_func, "__qualname__", repr(self.feature_func))
        settings = {"method": "KNN-Shapley", "feature_func": name}
        self._kept = fill(self, _Inputs(self), train_loader, settings, desc="train features",
                          keys=["features"])[0]
        y = torch.cat(map_batches(train_loader, lambda b: self._label(b).reshape(-1),
                                  "train_loader", None)).to(self.device)
        self._train = None, all_gather_rows(y, shard)

    def _distances(self, x_te: torch.Tensor, lo: int, hi: int, shared: bool = False) -> torch.Tensor:
        """Distances ``(n_train, hi - lo)`` of every training point to test points
        ``lo:hi``; from kept rows: this rank's rows to every test point (``shared``:
        to ``lo:hi``, the same columns on every rank), gathered."""
        x_tr = self._train[0]
        if self._kept is None:
            if hi <= lo:  # more ranks than test points
                return x_te.new_zeros(len(x_tr), 0)
            return self._checked(self.distance_func(x_tr.to(x_te.dtype), x_te[lo:hi]),
                                 len(x_tr), hi - lo)
        x = x_te[lo:hi] if shared else x_te
        parts = [self._checked(self.distance_func(b.to(x_te.dtype), x), b.shape[0], len(x))
                 for _, b in self._kept.blocks(device=self.device)]
        gathered = all_gather_rows(torch.cat(parts), self._shard())
        return gathered if shared else gathered[:, lo:hi]

    @staticmethod
    def _checked(dist: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        if tuple(dist.shape) != (rows, cols):
            msg = (f"distance_func returned shape {tuple(dist.shape)}; it must return "
                   f"(n_train, n_test) = {(rows, cols)}.")
            raise DattriValueError(msg)
        return dist

    @staticmethod
    def _given_labels(labels: Any, n: int, name: str) -> torch.Tensor:
        t = torch.as_tensor(labels).reshape(-1)
        if t.numel() != n:
            msg = (f"{name} has {t.numel()} labels but the loader has {n} examples; pass "
                   "one label per example, in loader order.")
            raise DattriValueError(msg)
        return t

    def attribute(self, train_loader: Iterable, test_loader: Iterable,
                  train_labels: Any = None, test_labels: Any = None,
                  top_k: int | None = None) -> torch.Tensor | TopK:
        """KNN-Shapley values ``(n_train, n_test)``: the value of training point i for
        test point j (``transpose=True``: ``(n_test, n_train)``).

        Args:
            train_loader: training data, fixed order.
            test_loader: test data, fixed order.
            train_labels: labels of the training examples in loader order (default:
                read from the batches).
            test_labels: likewise for the test examples.
            top_k: return the :class:`~dattri.topk.TopK` of each test example
                instead, from blocks of test columns (the values of a test point
                need all its distances; no ``n_train x n_test`` matrix is formed).
        """
        k = check_top_k(top_k)
        self._check_pair(train_loader, test_loader)
        if not self._cached and getattr(self, "_read_at_attribute", False):
            self.cache(train_loader)  # 0.3.0's cache() without a loader was called
        self._ensure_cached(train_loader)
        y_tr = self._train[1]
        x_te, y_te = self._features_labels(test_loader, "test_loader")
        if train_labels is not None:
            y_tr = self._given_labels(train_labels, len(y_tr), "train_labels").to(y_tr.device)
        if test_labels is not None:
            y_te = self._given_labels(test_labels, len(x_te), "test_labels").to(y_te.device)
        shard = self._shard()
        lo, hi = (0, len(x_te)) if shard is None else split(len(x_te), shard.world)[shard.rank]
        if k is not None:
            return self._ranked(x_te, y_tr, y_te, lo, hi, k)
        dist = self._distances(x_te, lo, hi)  # every rank: a collective with kept rows
        if hi > lo:  # this rank's test columns
            values = knn_shapley(dist, y_tr, y_te[lo:hi], self.k_neighbors)
        else:  # more ranks than test points
            values = torch.zeros(len(y_tr), 0, dtype=torch.float64, device=x_te.device)
        if shard is not None:
            values = all_gather_rows(values.T.contiguous(), shard).T
        return values.T if self.transpose else values

    def _ranked(self, x_te: torch.Tensor, y_tr: torch.Tensor, y_te: torch.Tensor, lo: int,
                hi: int, k: int) -> TopK:
        """Top-k of the values, test columns ``cols`` at a time (this rank's ``lo:hi``;
        with kept rows every rank takes part in every block's gather)."""
        n, m = len(y_tr), len(x_te)
        cols = max(1, TOPK_BYTES // (8 * 4 * max(1, n)))  # distances, order, values
        shard = self._shard()
        spans = range(lo, hi, cols) if self._kept is None else range(0, max(m, 1), cols)
        parts = []
        for a in spans:
            e = min(a + cols, m)
            dist = self._distances(x_te, a, e, shared=True)
            a2, e2 = max(a, lo), min(e, hi)  # the block's columns this rank values
            if e2 > a2:
                vals = knn_shapley(dist[:, a2 - a:e2 - a], y_tr, y_te[a2:e2], self.k_neighbors)
                parts.append(topk_from_blocks([(0, vals)], k, torch.arange(a2, e2)))
        if shard is not None:
            import torch.distributed as dist_

            every: list[Any] = [None] * shard.world
            dist_.all_gather_object(every, parts, group=shard.group)
            parts = [p for ps in every for p in ps]
        return concat_topk(parts)

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """Not defined for KNN-Shapley (a point is its own nearest neighbour)."""
        msg = ("KNNShapleyAttributor has no self-attribution; use attribute(train_loader, "
               "test_loader) with a held-out loader.")
        raise NotImplementedError(msg)



def _finite_features(x: Any, what: str) -> Any:
    """``x``, refused with a typed error if a floating feature is NaN or inf (a NaN
    point has no neighbours: its values would be plausible and wrong)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not all_finite(x):
        rows = int((~torch.isfinite(x.reshape(x.shape[0], -1))).any(1).sum()) if x.dim() else 1
        msg = (f"KNN-Shapley: {what} contain NaN or inf ({rows} example(s)); the distances "
               "to such a point are undefined. Remove or repair those examples.")
        raise NonFiniteError(msg)
    return x


class _Inputs(LoaderFeatures):
    """KNN-Shapley's training features ``(B, d)`` (for :func:`dattri.algorithm._scored.fill`)."""

    which = "loss"

    def __init__(self, att: KNNShapleyAttributor) -> None:
        self.att, self.device, self.show_progress = att, att.device, att.show_progress

    def batch(self, batch: Any, ckpt: int) -> torch.Tensor:  # noqa: ARG002 - no checkpoints
        return self.att._feature(batch).reshape(batch_size_of(batch), -1)
