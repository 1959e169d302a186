"""Evaluation metrics for data attribution: LDS, LOO correlation, noisy-label AUC.

Conventions (see API.md): a score matrix is ``(n_train, n_test)``; a positive
score means that training example ``i`` is a proponent of test example ``j``
(training on ``i`` lowers the test loss). Ground truth is a pair
``(values, indices)`` as returned by :func:`calculate_lds_ground_truth` and
:func:`calculate_loo_ground_truth`; their signs are chosen so that a good
attribution method correlates *positively* with the ground truth.

References:
    Koh & Liang, "Understanding Black-box Predictions via Influence Functions",
    ICML 2017 (LOO correlation, noisy-label detection).
    Park et al., "TRAK: Attributing Model Behavior at Scale", ICML 2023 (LDS).
    Deng et al., "dattri: A Library for Efficient Data Attribution", NeurIPS 2024,
    Section 3.3 and Appendix B.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dattri.errors import DattriValueError, GroundTruthError, NonFiniteError
from dattri.metric._correlation import columnwise_pearson, columnwise_spearman

__all__ = ["lds", "loo_corr", "mislabel_detection_auc"]

_MIN_MODELS = 3


def _as_tensor(x: object, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        msg = f"{name} must be a tensor (or array-like), got {type(x).__name__}."
        raise DattriValueError(msg) from e


def _check_score(score: object, name: str = "score") -> torch.Tensor:
    score = _as_tensor(score, name)
    if score.dim() == 1:
        score = score.unsqueeze(1)
    if score.dim() != 2 or score.is_complex():
        msg = (
            f"{name} must be a (n_train, n_test) matrix, got shape "
            f"{tuple(score.shape)}."
        )
        raise DattriValueError(msg)
    if not bool(torch.isfinite(score).all()):
        bad = torch.nonzero(~torch.isfinite(score))[:5].tolist()
        msg = (
            f"{name} contains NaN or inf (first (train, test) positions {bad}); "
            "the attribution diverged or the loss was not finite. Fix the scores "
            "before evaluating them."
        )
        raise NonFiniteError(msg)
    return score


def _unpack_ground_truth(ground_truth: object, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(ground_truth, Sequence) or len(ground_truth) != 2:
        msg = (
            f"ground_truth must be the pair (values, indices) returned by "
            f"calculate_{kind}_ground_truth, got {type(ground_truth).__name__}."
        )
        raise GroundTruthError(msg)
    values = _as_tensor(ground_truth[0], "ground_truth[0]")
    indices = _as_tensor(ground_truth[1], "ground_truth[1]")
    if values.dim() == 1:
        values = values.unsqueeze(1)
    if values.dim() != 2:
        msg = (
            "ground_truth[0] (the target values) must be (n_models, n_test), got "
            f"shape {tuple(values.shape)}."
        )
        raise GroundTruthError(msg)
    if not bool(torch.isfinite(values).all()):
        rows = torch.nonzero(~torch.isfinite(values).all(dim=1)).flatten()[:10].tolist()
        msg = (
            f"ground_truth[0] contains NaN or inf (model rows {rows}); a retrained "
            "model diverged or its target is not finite. Retrain those models or "
            "drop their rows (and the matching rows of ground_truth[1])."
        )
        raise GroundTruthError(msg)
    if values.shape[0] < _MIN_MODELS:
        msg = (
            f"ground_truth has {values.shape[0]} model(s); a correlation needs at "
            f"least {_MIN_MODELS}. Retrain more models."
        )
        raise GroundTruthError(msg)
    if indices.is_floating_point():
        if not bool((indices == indices.round()).all()):
            msg = "ground_truth[1] (training indices) must hold integers."
            raise GroundTruthError(msg)
        indices = indices.round()
    return values, indices.to(torch.int64)


def _check_test_count(score: torch.Tensor, values: torch.Tensor) -> None:
    if score.shape[1] != values.shape[1]:
        msg = (
            f"score has {score.shape[1]} test column(s) (shape "
            f"{tuple(score.shape)}) but the ground truth values have "
            f"{values.shape[1]} (shape {tuple(values.shape)}); compute both on the "
            "same test loader, in the same order."
        )
        raise GroundTruthError(msg)


def _check_index_range(indices: torch.Tensor, n_train: int) -> None:
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_train):
        msg = (
            f"ground_truth[1] holds training indices in [{int(indices.min())}, "
            f"{int(indices.max())}] but score has only {n_train} training rows; the "
            "ground truth was computed on a different training set."
        )
        raise GroundTruthError(msg)


def check_distinct_subsets(indices: torch.Tensor, where: str) -> None:
    """Raise :class:`GroundTruthError` if a row of ``indices`` (one LDS subset)
    lists a training index twice."""
    srt = indices.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(dim=1)
    if bool(dup.any()):
        row = int(dup.nonzero()[0, 0])
        value = int(srt[row, 1:][srt[row, 1:] == srt[row, :-1]][0])
        msg = (f"{where}: subset {row} lists training index {value} more than once; an "
               "LDS subset is a set of distinct indices (it would be counted twice).")
        raise GroundTruthError(msg)


def lds(
    score: torch.Tensor,
    ground_truth: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear datamodeling score of an attribution, one value per test example.

    For test example ``j`` and retrained models ``m = 1..M`` (each trained on a
    subset ``S_m`` of the training set)::

        g_m(j) = sum_{i in S_m} score[i, j]          (attribution-based prediction)
        LDS(j) = spearman_m( g_m(j), values[m, j] )

    where ``values[m, j] = -target(theta_{S_m}, z_j)`` is the *negated* target
    (loss) of model ``m`` (Park et al. 2023; dattri paper Appendix B). With that
    sign a proponent-positive score has a positive LDS. Ties get average ranks;
    a test column that is constant over the models gets NaN and a warning.

    Args:
        score: ``(n_train, n_test)`` attribution scores (a ``(n_train,)`` vector is
            one test example).
        ground_truth: ``(values, indices)`` from :func:`calculate_lds_ground_truth`:
            ``values`` ``(M, n_test)`` and ``indices`` ``(M, subset_size)``, the
            training rows (positions in the training loader, i.e. rows of
            ``score``) of each subset.

    Returns:
        ``(correlations, p_values)``, each ``(n_test,)`` in ``score``'s dtype.

    Raises:
        NonFiniteError: ``score`` has NaN or inf.
        GroundTruthError: malformed ground truth, NaN values, fewer than 3 models,
            a test count that differs from ``score``, indices out of range, or a
            subset listing an index twice.
    """
    score = _check_score(score)
    values, indices = _unpack_ground_truth(ground_truth, "lds")
    _check_test_count(score, values)
    if indices.dim() == 1:
        indices = indices.unsqueeze(1)
    if indices.dim() != 2 or indices.shape[0] != values.shape[0]:
        msg = (
            f"ground_truth[1] must be (n_models, subset_size) with n_models = "
            f"{values.shape[0]} (rows of ground_truth[0]), got shape "
            f"{tuple(indices.shape)}."
        )
        raise GroundTruthError(msg)
    n_train = score.shape[0]
    _check_index_range(indices, n_train)
    check_distinct_subsets(indices, "ground_truth[1]")
    dtype = score.dtype if score.is_floating_point() else torch.float64
    # Membership matrix (M, n_train) times scores: sum over each subset at once.
    member = torch.zeros(indices.shape[0], n_train, dtype=torch.float64, device=score.device)
    idx = indices.to(score.device)
    member.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    predicted = member @ score.to(torch.float64)
    corr, pval = columnwise_spearman(predicted, values.to(score.device), what="LDS")
    return corr.to(dtype), pval.to(dtype)


def loo_corr(
    score: torch.Tensor,
    ground_truth: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out correlation, one Pearson coefficient per test example.

    For the left-out training examples ``i_1..i_M``::

        values[m, j] = target(theta_{-i_m}, z_j) - target(theta, z_j)
        LOO(j)       = pearson_m( score[i_m, j], values[m, j] )

    With the loss as target, removing a proponent raises the test loss, so a
    proponent-positive score correlates positively (Koh & Liang 2017).

    Args:
        score: ``(n_train, n_test)`` attribution scores.
        ground_truth: ``(values, indices)`` from :func:`calculate_loo_ground_truth`:
            ``values`` ``(M, n_test)`` and ``indices`` ``(M,)``, the left-out
            training rows (rows of ``score``).

    Returns:
        ``(correlations, p_values)``, each ``(n_test,)`` in ``score``'s dtype.

    Raises:
        NonFiniteError: ``score`` has NaN or inf.
        GroundTruthError: malformed ground truth, NaN values, fewer than 3 models,
            a test count that differs from ``score``, or indices out of range.
    """
    score = _check_score(score)
    values, indices = _unpack_ground_truth(ground_truth, "loo")
    _check_test_count(score, values)
    indices = indices.reshape(-1)
    if indices.shape[0] != values.shape[0]:
        msg = (
            f"ground_truth[1] must hold one left-out index per model "
            f"({values.shape[0]}), got shape {tuple(ground_truth[1].shape)}."
        )
        raise GroundTruthError(msg)
    _check_index_range(indices, score.shape[0])
    dtype = score.dtype if score.is_floating_point() else torch.float64
    picked = score[indices.to(score.device)]
    corr, pval = columnwise_pearson(picked, values.to(score.device), what="LOO correlation")
    return corr.to(dtype), pval.to(dtype)


def mislabel_detection_auc(
    score: torch.Tensor,
    ground_truth: torch.Tensor,
) -> tuple[float, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """ROC AUC of ranking training examples by self-influence to find flipped labels.

    Examples are inspected from the highest ``score`` down. At each distinct
    threshold ``s``: ``tpr(s) = #{flipped, score >= s} / #flipped`` and
    ``fpr(s) = #{clean, score >= s} / #clean``; the AUC is the trapezoidal area
    under ``(fpr, tpr)``, which counts tied pairs as one half (equal to
    ``sklearn.metrics.roc_auc_score``). One sort: ``O(n log n)``.

    Args:
        score: ``(n_train,)`` self-influence (high = suspicious).
        ground_truth: ``(n_train,)`` 0/1 (or bool) mask of the flipped examples.

    Returns:
        ``(auc, (fpr, tpr, thresholds))``: ``auc`` a float; the curve as in
        ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` (float64
        tensors; ``thresholds[0] = inf``).

    Raises:
        NonFiniteError: ``score`` has NaN or inf.
        GroundTruthError: ``ground_truth`` is not a 0/1 mask of the same length,
            or has only one class.
    """
    score = _as_tensor(score, "score")
    if score.dim() == 2 and 1 in score.shape:
        score = score.reshape(-1)
    if score.dim() != 1:
        msg = f"score must be the self-influence vector (n_train,), got shape {tuple(score.shape)}."
        raise DattriValueError(msg)
    if not bool(torch.isfinite(score).all()):
        msg = "score contains NaN or inf; fix the self-influence scores before computing the AUC."
        raise NonFiniteError(msg)
    gt = _as_tensor(ground_truth, "ground_truth").reshape(-1)
    if gt.shape[0] != score.shape[0]:
        msg = (
            f"ground_truth has {gt.shape[0]} entries but score has {score.shape[0]}; "
            "both must cover the training set in loader order."
        )
        raise GroundTruthError(msg)
    if gt.dtype != torch.bool and not bool(((gt == 0) | (gt == 1)).all()):
        msg = (
            "ground_truth must be a 0/1 mask of the flipped examples; to build it "
            "from flipped indices use mask = torch.zeros(n_train); mask[idx] = 1."
        )
        raise GroundTruthError(msg)
    y = gt.to(torch.float64).cpu()
    n_pos = float(y.sum())
    n_neg = float(y.numel() - n_pos)
    if n_pos == 0 or n_neg == 0:
        msg = (
            f"ground_truth marks {int(n_pos)} flipped and {int(n_neg)} clean "
            "examples; the AUC needs both classes."
        )
        raise GroundTruthError(msg)
    s = score.detach().to(torch.float64).cpu()
    order = torch.argsort(s, descending=True, stable=True)
    s_sorted, y_sorted = s[order], y[order]
    last = torch.ones_like(s_sorted, dtype=torch.bool)  # last element of each tie group
    last[:-1] = s_sorted[1:] != s_sorted[:-1]
    ends = torch.nonzero(last).flatten()
    tps = torch.cumsum(y_sorted, 0)[ends]
    fps = (ends + 1).to(torch.float64) - tps
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, tps / n_pos])
    fpr = torch.cat([zero, fps / n_neg])
    thresholds = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64), s_sorted[ends]])
    auc = float(torch.trapezoid(tpr, fpr))
    return auc, (fpr, tpr, thresholds)
