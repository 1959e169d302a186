"""Tests of dattri.metric: correlations, AUC, brittleness, and the convex end-to-end check."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from dattri.errors import DattriValueError, GroundTruthError, NonFiniteError
from dattri.metric import (
    brittleness,
    calculate_lds_ground_truth,
    calculate_loo_ground_truth,
    lds,
    loo_corr,
    mislabel_detection_auc,
)
from dattri.metric._correlation import ConstantColumnWarning, rank_columns
from dattri.model_util.retrain import retrain_lds, retrain_loo

sklearn_metrics = pytest.importorskip("sklearn.metrics")


# ------------------------------------------------------------------ correlations
def test_rank_columns_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (40, 7), generator=g).to(torch.float64)  # many ties
    ref = np.stack([stats.rankdata(x[:, j].numpy()) for j in range(7)], axis=1)
    np.testing.assert_array_equal(rank_columns(x).numpy(), ref)


def _random_lds_case(seed: int, ties: bool):
    g = torch.Generator().manual_seed(seed)
    n_train, n_test, m, k = 30, 6, 12, 15
    score = torch.randn(n_train, n_test, generator=g, dtype=torch.float64)
    values = torch.randn(m, n_test, generator=g, dtype=torch.float64)
    if ties:
        score = score.round()
        values = (values * 2).round()
    idx = torch.stack([torch.randperm(n_train, generator=g)[:k] for _ in range(m)])
    return score, values, idx


@pytest.mark.parametrize("ties", [False, True])
def test_lds_matches_scipy_spearman(ties):
    score, values, idx = _random_lds_case(1, ties)
    corr, pval = lds(score, (values, idx))
    for j in range(score.shape[1]):
        pred = score[idx, j].sum(dim=1).numpy()
        ref = stats.spearmanr(pred, values[:, j].numpy())
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-8, abs=1e-14)


def test_loo_corr_matches_scipy_pearson_on_a_subset_of_rows():
    g = torch.Generator().manual_seed(2)
    score = torch.randn(25, 5, generator=g, dtype=torch.float64)
    left_out = torch.tensor([7, 3, 19, 0, 11, 24, 5, 16])  # not sorted, not all rows
    values = torch.randn(8, 5, generator=g, dtype=torch.float64) + 0.5 * score[left_out]
    corr, pval = loo_corr(score, (values, left_out))
    for j in range(5):
        ref = stats.pearsonr(score[left_out, j].numpy(), values[:, j].numpy())
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-8)


def test_float32_scores_give_float32_results():
    score, values, idx = _random_lds_case(3, False)
    corr, pval = lds(score.float(), (values, idx))
    assert corr.dtype == torch.float32 and pval.dtype == torch.float32


def test_constant_columns_are_nan_with_a_warning_others_exact():
    g = torch.Generator().manual_seed(4)
    score = torch.randn(10, 3, generator=g, dtype=torch.float64)
    values = torch.randn(10, 3, generator=g, dtype=torch.float64)
    values[:, 1] = 0.1  # constant ground-truth column
    score[:, 2] = 3.0  # constant score column
    with pytest.warns(ConstantColumnWarning, match=r"2 test column\(s\) \[1, 2\]"):
        corr, pval = loo_corr(score, (values, torch.arange(10)))
    assert torch.isnan(corr[1:]).all() and torch.isnan(pval[1:]).all()
    ref = stats.pearsonr(score[:, 0].numpy(), values[:, 0].numpy())
    assert corr[0].item() == pytest.approx(ref.statistic, abs=1e-12)


def test_lds_of_a_perfect_additive_datamodel_is_one_and_sign_is_right():
    g = torch.Generator().manual_seed(5)
    true = torch.randn(40, 4, generator=g, dtype=torch.float64)
    idx = torch.stack([torch.randperm(40, generator=g)[:20] for _ in range(25)])
    values = torch.stack([true[i].sum(0) for i in idx])  # -loss is additive in the subset
    assert torch.allclose(lds(true, (values, idx))[0], torch.ones(4, dtype=torch.float64))
    assert torch.allclose(lds(-true, (values, idx))[0], -torch.ones(4, dtype=torch.float64))


def test_nan_inputs_raise_named_errors():
    score, values, idx = _random_lds_case(6, False)
    bad = score.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"score contains NaN or inf \(first \(train, test\) positions \[\[3, 2\]\]"):
        lds(bad, (values, idx))
    badv = values.clone()
    badv[4, 0] = float("inf")
    with pytest.raises(GroundTruthError, match=r"ground_truth\[0\] contains NaN or inf \(model rows \[4\]\)"):
        lds(score, (badv, idx))


def test_mismatched_ground_truth_shapes_raise():
    score, values, idx = _random_lds_case(7, False)
    with pytest.raises(GroundTruthError, match=r"score has 6 test column\(s\) \(shape \(30, 6\)\) but the ground truth values have 5 \(shape \(12, 5\)\)"):
        lds(score, (values[:, :5], idx))
    with pytest.raises(GroundTruthError, match=r"training indices in \[1, 30\] but score has only 30"):
        lds(score, (values, torch.where(idx == 0, 30, idx)))
    with pytest.raises(GroundTruthError, match=r"must be \(n_models, subset_size\) with n_models = 12"):
        lds(score, (values, idx[:5]))
    with pytest.raises(GroundTruthError, match="at least 3"):
        loo_corr(score, (values[:2], torch.tensor([0, 1])))
    with pytest.raises(GroundTruthError, match="one left-out index per model"):
        loo_corr(score, (values, torch.arange(5)))
    with pytest.raises(GroundTruthError, match=r"pair \(values, indices\)"):
        lds(score, values)


# ------------------------------------------------------------------ AUC
@pytest.mark.parametrize("n,ties", [(50, False), (300, True), (100_000, True)])
def test_auc_matches_sklearn(n, ties):
    rng = np.random.default_rng(n)
    y = rng.random(n) < 0.1
    s = rng.normal(size=n) + 1.5 * y
    if ties:
        s = np.round(s, 1)
    auc, (fpr, tpr, thr) = mislabel_detection_auc(torch.tensor(s), torch.tensor(y))
    assert auc == pytest.approx(sklearn_metrics.roc_auc_score(y, s), abs=1e-12)
    rfpr, rtpr, rthr = sklearn_metrics.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), rfpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), rtpr, atol=1e-12)
    np.testing.assert_allclose(thr.numpy()[1:], rthr[1:])
    assert thr[0] == float("inf")


def test_auc_int_mask_and_perfect_ranking():
    y = torch.tensor([0, 1, 0, 0, 1, 0])
    s = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8, 0.0])
    assert mislabel_detection_auc(s, y)[0] == 1.0
    assert mislabel_detection_auc(-s, y)[0] == 0.0


def test_auc_bad_inputs():
    s = torch.randn(6)
    with pytest.raises(GroundTruthError, match="0/1 mask"):
        mislabel_detection_auc(s, torch.tensor([0, 2, 0, 0, 1, 0]))
    with pytest.raises(GroundTruthError, match="needs both classes"):
        mislabel_detection_auc(s, torch.zeros(6))
    with pytest.raises(GroundTruthError, match="ground_truth has 5 entries but score has 6"):
        mislabel_detection_auc(s, torch.zeros(5))
    with pytest.raises(NonFiniteError, match="score contains NaN"):
        mislabel_detection_auc(torch.tensor([0.0, float("nan"), 1.0]), torch.tensor([0, 1, 0]))
    with pytest.raises(DattriValueError, match=r"self-influence vector \(n_train,\)"):
        mislabel_detection_auc(torch.randn(3, 2), torch.tensor([0, 1, 0]))


# ------------------------------------------------------------------ brittleness
class _Majority(nn.Module):
    """Predicts the most frequent training label (ties: the smaller label)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label


def _train_majority(loader):
    labels = torch.cat([y for _, y in loader])
    counts = torch.bincount(labels, minlength=2)
    return _Majority(int(torch.argmax(counts)))


def _eval_majority(model, test_loader):
    return torch.cat([torch.full((len(y),), model.label) for _, y in test_loader])


def test_brittleness_majority_classifier_closed_form():
    # 30 examples of class 1 then 20 of class 0: removing k class-1 examples flips
    # the majority (ties go to class 0) exactly when 30 - k <= 20, i.e. k >= 10.
    y = torch.cat([torch.ones(30, dtype=torch.long), torch.zeros(20, dtype=torch.long)])
    train = DataLoader(TensorDataset(torch.zeros(50, 1), y), batch_size=7)
    test = DataLoader(TensorDataset(torch.zeros(2, 1), torch.tensor([1, 0])), batch_size=2)
    proponents_first = torch.stack([y.double(), y.double()], dim=1)  # class 1 ranked first
    proponents_first[:, 1] = 1 - proponents_first[:, 1]  # column 1 ranks class 0 first
    out = brittleness(train, test, proponents_first, _train_majority, _eval_majority,
                      search_space=range(1, 40))
    assert out == [10, None]
    assert brittleness(train, test, proponents_first, _train_majority, _eval_majority,
                       search_space=[5, 15, 25]) == [15, None]
    single = DataLoader(TensorDataset(torch.zeros(1, 1), torch.tensor([1])), batch_size=1)
    assert brittleness(train, single, y.double(), _train_majority, _eval_majority,
                       search_space=range(0, 40, 4)) == 12


def test_brittleness_bad_inputs():
    y = torch.ones(10, dtype=torch.long)
    train = DataLoader(TensorDataset(torch.zeros(10, 1), y), batch_size=4)
    test = DataLoader(TensorDataset(torch.zeros(1, 1), torch.tensor([1])), batch_size=1)
    with pytest.raises(DattriValueError, match=r"n_train = 10 .* got shape \(9, 1\)"):
        brittleness(train, test, torch.zeros(9, 1), _train_majority, _eval_majority, search_space=[1])
    with pytest.raises(DattriValueError, match=r"search_space must hold sizes in \[1, 10\)"):
        brittleness(train, test, torch.zeros(10), _train_majority, _eval_majority, search_space=[5, 10])
    with pytest.raises(NonFiniteError, match="NaN"):
        brittleness(train, test, torch.full((10,), float("nan")), _train_majority, _eval_majority, search_space=[1])


# ------------------------------------------------------------------ convex end to end
LAMBDA = 1e-2


def _features(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def train_logreg_newton(loader, seed=0):
    """L2-regularised binary logistic regression, Newton's method to machine precision.

    Objective: mean_k BCE(x_k . theta, y_k) + LAMBDA / 2 |theta|^2 (bias included).
    """
    batches = list(loader)  # one pass: a shuffling loader reorders on every pass
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches]).to(x.dtype)
    a = _features(x)
    theta = torch.zeros(a.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(a @ theta)
        g = a.T @ (p - y) / len(y) + LAMBDA * theta
        h = (a.T * (p * (1 - p))) @ a / len(y) + LAMBDA * torch.eye(a.shape[1], dtype=torch.float64)
        step = torch.linalg.solve(h, g)
        theta = theta - step
        if step.abs().max() < 1e-10:  # quadratic convergence: the error is now ~1e-20
            break
    model = nn.Linear(x.shape[1], 1).double()
    with torch.no_grad():
        model.weight.copy_(theta[:-1].unsqueeze(0))
        model.bias.copy_(theta[-1:])
    return model


_LR_MODEL = nn.Linear(5, 1).double()


def _bce_target(params, batch):
    x, y = batch
    logit = functional_call(_LR_MODEL, params, (x,)).squeeze(-1)
    return nn.functional.binary_cross_entropy_with_logits(logit, y.to(logit.dtype))


def _exact_if_scores(model, x_tr, y_tr, x_te, y_te):
    """score[i, j] = (1/n) g_j^T H^{-1} g_i with the exact (dense) Hessian."""
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    a_tr, a_te = _features(x_tr), _features(x_te)
    p_tr, p_te = torch.sigmoid(a_tr @ theta), torch.sigmoid(a_te @ theta)
    g_tr = (p_tr - y_tr)[:, None] * a_tr
    g_te = (p_te - y_te)[:, None] * a_te
    n = len(y_tr)
    h = (a_tr.T * (p_tr * (1 - p_tr))) @ a_tr / n + LAMBDA * torch.eye(a_tr.shape[1], dtype=torch.float64)
    return g_tr @ torch.linalg.solve(h, g_te.T) / n


def test_convex_end_to_end_loo_and_lds(tmp_path, capsys):
    torch.manual_seed(0)
    n, d = 80, 5
    w = torch.randn(d, dtype=torch.float64)
    x = torch.randn(n + 30, d, dtype=torch.float64)
    y = (torch.rand(n + 30, dtype=torch.float64) < torch.sigmoid(x @ w)).to(torch.float64)
    train = DataLoader(TensorDataset(x[:n], y[:n]), batch_size=16)
    test = DataLoader(TensorDataset(x[n:], y[n:]), batch_size=7)

    retrain_loo(train_logreg_newton, train, tmp_path / "loo", seed=0, num_workers=0, progress=False)
    gt_loo = calculate_loo_ground_truth(_bce_target, tmp_path / "loo", test)
    full = train_logreg_newton(train)
    score = _exact_if_scores(full, x[:n], y[:n], x[n:], y[n:])
    corr, _ = loo_corr(score, gt_loo)
    assert corr.mean() > 0.9

    retrain_lds(train_logreg_newton, train, tmp_path / "lds", num_subsets=40, seed=0,
                num_workers=0, progress=False)
    gt_lds = calculate_lds_ground_truth(_bce_target, tmp_path / "lds", test)
    rho, _ = lds(score, gt_lds)
    assert rho.mean() > 0.5
    with capsys.disabled():
        print(f"\n[convex LR, n={n}] LOO corr mean {corr.mean():.4f} (min {corr.min():.4f}); "
              f"LDS mean {rho.mean():.4f} (min {rho.min():.4f})")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lds(-score, gt_lds)[0].mean() < -0.5  # sign convention is not symmetric by accident


def test_lds_refuses_a_subset_listing_an_index_twice():
    from dattri.metric import lds

    g = torch.Generator().manual_seed(0)
    score = torch.randn(10, 3, generator=g, dtype=torch.float64)
    values = torch.randn(4, 3, generator=g, dtype=torch.float64)
    good = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 5]])
    corr, _ = lds(score, (values, good))
    assert corr.shape == (3,)
    bad = good.clone()
    bad[2, 2] = 6  # subset 2 = {6, 7, 6}: index 6 would be counted twice
    with pytest.raises(GroundTruthError, match="subset 2 lists training index 6 more than once"):
        lds(score, (values, bad))
