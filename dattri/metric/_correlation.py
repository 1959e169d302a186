"""Column-wise Pearson / Spearman correlation with p-values (private).

All functions work on ``(m, T)`` matrices and correlate column ``t`` of ``x`` with
column ``t`` of ``y`` over the ``m`` rows, for all ``T`` columns at once (no Python
loop over columns). They follow ``scipy.stats.pearsonr`` / ``spearmanr``:

* ties get the average rank (``scipy.stats.rankdata(method="average")``);
* a column that is constant in ``x`` or in ``y`` has no correlation: its value
  and p-value are NaN and a ``ConstantColumnWarning`` names the columns;
* the two-sided p-value uses the t distribution with ``m - 2`` degrees of
  freedom, ``t = r sqrt((m - 2) / (1 - r^2))`` (exact for Pearson under
  normality, the usual approximation for Spearman, as scipy).
"""

from __future__ import annotations

import numpy as np
import torch

from scipy import special

from dattri._warn import warn_user

__all__ = [
    "ConstantColumnWarning",
    "columnwise_pearson",
    "columnwise_spearman",
    "rank_columns",
]


class ConstantColumnWarning(UserWarning):
    """Some columns are constant, so their correlation is undefined (NaN)."""


def rank_columns(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based) of every column of ``x``, ties sharing their mean rank.

    Args:
        x: ``(m, T)`` tensor without NaN.

    Returns:
        ``(m, T)`` float64 tensor; column ``t`` equals
        ``scipy.stats.rankdata(x[:, t], method="average")``.
    """
    m, t = x.shape
    sorted_x, order = torch.sort(x, dim=0, stable=True)
    starts = torch.ones_like(sorted_x, dtype=torch.bool)
    starts[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(starts.to(torch.int64), dim=0) - 1  # group id inside a column
    group = group + torch.arange(t, device=x.device) * m  # unique over columns
    flat = group.t().reshape(-1)
    pos = torch.arange(1, m + 1, device=x.device, dtype=torch.float64)
    pos = pos.unsqueeze(1).expand(m, t).t().reshape(-1)
    total = torch.zeros(m * t, dtype=torch.float64, device=x.device)
    count = torch.zeros_like(total)
    total.index_add_(0, flat, pos)
    count.index_add_(0, flat, torch.ones_like(pos))
    mean_rank = total[group] / count[group]  # (m, T) in sorted order
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(0, order, mean_rank)
    return ranks


def _constant_columns(x: torch.Tensor) -> torch.Tensor:
    return (x.max(dim=0).values == x.min(dim=0).values)


def _t_pvalue(r: np.ndarray, m: int) -> np.ndarray:
    df = m - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.clip(r, -1.0, 1.0)
        t = r * np.sqrt(df / ((1.0 - r) * (1.0 + r)))
        p = 2.0 * special.stdtr(df, -np.abs(t))
    p[np.abs(r) == 1.0] = 0.0
    return p


def columnwise_pearson(
    x: torch.Tensor,
    y: torch.Tensor,
    what: str = "correlation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pearson correlation of matching columns and the two-sided p-values.

    ``r_t = sum_i (x_it - mean x_t)(y_it - mean y_t) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2)``

    Args:
        x: ``(m, T)``, ``m >= 3``, finite.
        y: ``(m, T)``, finite.
        what: name used in the constant-column warning.

    Returns:
        ``(r, p)``, both float64 ``(T,)`` on ``x.device``; NaN for constant columns.
    """
    m = x.shape[0]
    x = x.to(torch.float64)
    y = y.to(device=x.device, dtype=torch.float64)
    const = _constant_columns(x) | _constant_columns(y)
    xc = x - x.mean(dim=0, keepdim=True)
    yc = y - y.mean(dim=0, keepdim=True)
    # Normalise first (as scipy does) so that the products cannot overflow.
    xn = xc / torch.linalg.vector_norm(xc, dim=0, keepdim=True)
    yn = yc / torch.linalg.vector_norm(yc, dim=0, keepdim=True)
    r = (xn * yn).sum(dim=0).clamp(-1.0, 1.0)
    r = torch.where(const, torch.full_like(r, float("nan")), r)
    p = torch.from_numpy(_t_pvalue(r.cpu().numpy(), m)).to(r.device)
    if bool(const.any()):
        bad = torch.nonzero(const).flatten().tolist()
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        warn_user(
            f"{len(bad)} test column(s) [{shown}] are constant in the scores or the "
            f"ground truth, so their {what} is undefined and set to NaN; average the "
            "others with torch.nanmean, or check the retrained models.",
            ConstantColumnWarning
        )
    return r, p


def columnwise_spearman(
    x: torch.Tensor,
    y: torch.Tensor,
    what: str = "Spearman correlation",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spearman rank correlation of matching columns (Pearson of average ranks).

    Args:
        x: ``(m, T)``, ``m >= 3``, finite.
        y: ``(m, T)``, finite.
        what: name used in the constant-column warning.

    Returns:
        ``(rho, p)``, float64 ``(T,)``; NaN for constant columns.
    """
    return columnwise_pearson(rank_columns(x), rank_columns(y), what=what)
