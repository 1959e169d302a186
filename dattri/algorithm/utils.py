r"""Helpers at the published ``dattri.algorithm.utils`` path.

- :func:`trak_margin`: TRAK's output function of a classifier in a stable form,

  .. math:: m(z, y) = \log\frac{p_y}{1 - p_y} = z_y - \operatorname{logsumexp}_{k \ne y} z_k,

  finite for every finite logit vector, where the published examples' form
  ``logp - log(1 - exp(logp))`` is ``inf`` once ``p_y`` rounds to 1.
- The published RPS helpers, written over dattri's pieces: ``rps_finetune_model``
  (pre-activation and squared Frobenius norm), ``backtracking_line_search`` (Armijo),
  ``rps_finetune_theta`` (L2-regularised fine-tuning of the last layer),
  ``get_rps_weight`` (the representer weights ``alpha``), ``rps_corr_check``.
- ``_check_shuffle``: the published name of dattri's loader-order check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from dattri._loader import check_loader

__all__ = [
    "backtracking_line_search",
    "get_rps_weight",
    "nonfinite_hint",
    "rps_corr_check",
    "rps_finetune_model",
    "rps_finetune_theta",
    "trak_margin",
]

#: the stable margin, as named in error messages
STABLE_MARGIN = ("z_y - logsumexp_{k != y} z_k (dattri.algorithm.utils.trak_margin(logits, "
                 "labels)), which equals logp - log(1 - exp(logp)) and stays finite")


def trak_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example margin ``z_y - logsumexp_{k != y} z_k`` of logits ``(B, C)`` (a
    single logit column is a binary model: the margin is ``+-z``)."""
    if logits.dim() == 2 and logits.shape[1] == 1:  # noqa: PLR2004
        z = logits[:, 0]
        return torch.where(labels.reshape(-1).bool(), z, -z)
    labels = labels.long().reshape(-1, *([1] * (logits.dim() - 1)))[..., :1]
    z_y = logits.gather(-1, labels).squeeze(-1)
    rest = logits.scatter(-1, labels, float("-inf")).logsumexp(-1)
    return z_y - rest


def nonfinite_hint(values: Tensor) -> str:
    """A sentence for a ``NonFiniteError``: which rows of a batch are not finite, and
    the stable margin that avoids the overflow of saturated examples."""
    bad = ~torch.isfinite(values)
    rows = bad.reshape(bad.shape[0], -1).any(dim=1).nonzero().flatten().tolist() if bad.dim() else []
    if not rows:
        return ""
    kind = "infinite" if not bool(torch.isnan(values).any()) else "NaN or infinite"
    return (f" Rows {rows[:10]}{' ...' if len(rows) > 10 else ''} of this batch are {kind}: "
            "if these are examples the model predicts with probability ~1 (saturated), "
            "the output function overflows there, e.g. the published margin "
            f"logp - log(1 - exp(logp)) is inf once p rounds to 1; use {STABLE_MARGIN}.")


def _check_shuffle(dataloader: Any) -> None:
    """Raise a typed error if ``dataloader`` shuffles (the published helper's name)."""
    check_loader(dataloader, "dataloader")


def rps_finetune_model(x: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(x @ theta^T, ||theta||_F^2)``: pre-activations and the L2 term."""
    return x @ theta.T, (theta * theta).sum()


def _objective(theta: Tensor, loss_func: Callable, x: Tensor, y: Tensor, lambda_l2: float) -> Tensor:
    phi, sq = rps_finetune_model(x, theta)
    return loss_func(phi, y) + lambda_l2 * sq


def backtracking_line_search(theta: Tensor, grad_theta: Tensor, loss_func: Callable, x: Tensor,
                             y: Tensor, val: float, lambda_l2: float) -> Tensor:
    """One gradient step with an Armijo backtracking step size (start 10, halve)."""
    t, g2 = 10.0, float((grad_theta * grad_theta).sum())
    while t >= 1e-10:
        cand = (theta - t * grad_theta).detach()
        with torch.no_grad():
            new = float(_objective(cand, loss_func, x, y, lambda_l2))
        if new <= float(val) - t * g2 / 2:
            return cand.requires_grad_(True)
        t /= 2
    return (theta - t * grad_theta).detach().requires_grad_(True)


def rps_finetune_theta(x: Tensor, y: Tensor, init_theta: Tensor, loss_func: Callable,
                       lambda_l2: float, num_epoch: int, device: str = "cpu") -> Tensor:
    """Minimise ``loss_func(x theta^T, y) + lambda ||theta||^2`` from ``init_theta``
    by ``num_epoch`` backtracking gradient steps; returns ``theta``."""
    x, y = x.to(device), y.to(device)
    theta = init_theta.detach().to(device).clone().requires_grad_(True)
    for _ in range(int(num_epoch)):
        val = _objective(theta, loss_func, x, y, lambda_l2)
        (g,) = torch.autograd.grad(val, theta)
        if float(g.norm()) < 1e-10:
            break
        theta = backtracking_line_search(theta, g, loss_func, x, y, float(val), lambda_l2)
    return theta.detach()


def get_rps_weight(finetuned_theta: Tensor, loss_func: Callable, x_train: Tensor,
                   y_pred_train: Tensor, y_test: Tensor, lambda_l2: float) -> Tensor:
    """Representer weights: ``alpha_i = -(1/(2 lambda n)) dL_i/dphi_i`` at the
    fine-tuned ``theta`` (``y_pred_train`` the targets the loss compares with), taken
    at each test label's class: ``(n_train, n_test)`` (binary models: ``(n_train, 1)``)."""
    pre = (x_train @ finetuned_theta.T).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_func(pre, y_pred_train), pre)
    alpha = -g / (2.0 * lambda_l2)  # the loss is a mean: g_i = (1/n) dl_i/dphi_i
    if finetuned_theta.shape[0] == 1:
        return alpha
    return alpha[:, torch.as_tensor(y_test).long().reshape(-1)]


def rps_corr_check(rps_weight: Tensor, x: Tensor, y: Tensor) -> list[float]:
    """Pearson correlation, per output column, between ``y`` and the representer
    reconstruction ``x x^T alpha`` (a sanity check of the fine-tuning); returned."""
    rec = x @ x.T @ rps_weight
    out = []
    for c in range(y.shape[1]):
        a, b = y[:, c] - y[:, c].mean(), rec[:, c] - rec[:, c].mean()
        out.append(float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30)))
    return out
