"""Evaluation metrics for data attribution (dattri paper, Section 3.3, Appendix B).

* :func:`lds`: linear datamodeling score (Spearman, per test example).
* :func:`loo_corr`: leave-one-out correlation (Pearson, per test example).
* :func:`mislabel_detection_auc`: ROC AUC of noisy-label detection.
* :func:`brittleness`: smallest top-attributed set whose removal flips a prediction.
* :func:`calculate_lds_ground_truth`, :func:`calculate_loo_ground_truth`: ground
  truth from a folder written by :mod:`dattri.model_util.retrain`.

Signs: scores are ``(n_train, n_test)``, positive = proponent. LDS ground truth is
the negated target of each subset model; LOO ground truth is
``target(without i) - target(full)``. Both make a good score correlate positively.
"""

from dattri.metric.brittleness import brittleness
from dattri.metric.ground_truth import calculate_lds_ground_truth, calculate_loo_ground_truth
from dattri.metric.metrics import lds, loo_corr, mislabel_detection_auc

__all__ = [
    "brittleness",
    "calculate_lds_ground_truth",
    "calculate_loo_ground_truth",
    "lds",
    "loo_corr",
    "mislabel_detection_auc",
]
