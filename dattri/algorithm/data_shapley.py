"""``dattri.algorithm.data_shapley``: the published module of KNN-Shapley.

``KNNShapleyAttributor`` is :class:`dattri.algorithm.knn_shapley.KNNShapleyAttributor`
(scores ``(n_train, n_test)``; ``transpose=True`` gives 0.3.0's ``(n_test, n_train)``).
``default_dist_func`` is the published default distance on two batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dattri.algorithm.knn_shapley import KNNShapleyAttributor

__all__ = ["KNNShapleyAttributor", "default_dist_func"]


def default_dist_func(batch_x: Sequence[torch.Tensor], batch_y: Sequence[torch.Tensor]) -> torch.Tensor:
    """Euclidean distances ``(B_x, B_y)`` between the first elements (the features)
    of two batches."""
    return torch.cdist(batch_x[0].flatten(1).to(torch.float32), batch_y[0].flatten(1).to(torch.float32))
