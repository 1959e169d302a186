"""Representer point selection, RPS-L2 (Yeh et al. 2018).

The final linear layer ``Phi(x) = W~ h~(x)`` (``h~ = [h, 1]`` folds the bias in) is
fine-tuned to a stationary point of

    (1/n) sum_j L(W~ h~_j, y_j) + lambda ||W~||^2,

where ``W~ = sum_j alpha_j h~_j^T`` with ``alpha_j = -1/(2 lambda n) dL_j/dPhi_j``
(a vector over classes). The pre-activation of a test point decomposes as
``Phi(x_t) = sum_j alpha_j (h~_j . h~_t)`` and the score of training point j for
test point t is the term of the test label's class:

    tau(j, t) = alpha_j[y_t] * (h~_j . h~_t).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from dattri._loader import check_loader
from dattri.algorithm.base import BaseAttributor
from dattri.errors import DattriValueError, NotCachedError
from dattri.task import AttributionTask

__all__ = ["RPSAttributor"]


def _labels(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        for key in ("label", "labels", "y", "target", "targets"):
            if key in batch:
                return batch[key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    msg = ("RPSAttributor needs labels: batches must be (x, y) tuples/lists or dicts "
           "with a 'label'/'labels' key.")
    raise DattriValueError(msg)


class RPSAttributor(BaseAttributor):
    """RPS-L2.

    Args:
        task: its ``loss_func(pre_activation, label)`` is the loss of the final
            layer's output (e.g. ``nn.functional.cross_entropy``), mean over a batch.
        final_linear_layer_name: module name of the final ``nn.Linear``.
        normalize_preactivate: L2-normalise the intermediate features ``h``.
        l2_strength: lambda of the L2 penalty.
        epoch: maximum L-BFGS iterations of the fine-tuning.
        device: computation device.
    """

    def __init__(
        self,
        task: AttributionTask,
        final_linear_layer_name: str,
        normalize_preactivate: bool = False,
        l2_strength: float = 0.003,
        epoch: int = 3000,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(task, None, device)
        modules = dict(task.get_model().named_modules())
        layer = modules.get(final_linear_layer_name)
        if not isinstance(layer, nn.Linear):
            linears = [k for k, m in modules.items() if isinstance(m, nn.Linear)]
            msg = (f"final_linear_layer_name={final_linear_layer_name!r} is not an nn.Linear "
                   f"module of the model; linear modules: {linears}.")
            raise DattriValueError(msg)
        if l2_strength <= 0:
            msg = f"l2_strength={l2_strength!r} must be > 0 (the representer theorem needs it)."
            raise DattriValueError(msg)
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = bool(normalize_preactivate)
        self.l2_strength, self.epoch = float(l2_strength), int(epoch)
        self.alpha: torch.Tensor | None = None
        self.h_train: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None

    def _features(self, loader: Iterable) -> tuple[torch.Tensor, torch.Tensor]:
        from dattri.model_util.hook import get_final_layer_io

        self.task._load_checkpoints(0)
        model = self.task.get_model().to(self.device)
        was_training = model.training
        model.eval()
        try:
            h, _ = get_final_layer_io(model, self.final_linear_layer_name, loader, device=self.device)
        finally:
            model.train(was_training)
        h = h.to(self.device, torch.float64).flatten(1)
        if self.normalize_preactivate:
            h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1)
        y = torch.cat([_labels(b) for b in loader]).to(self.device)
        return h, y

    def _cache(self, train_loader: Iterable) -> None:
        h, y = self._features(train_loader)
        layer = dict(self.task.get_model().named_modules())[self.final_linear_layer_name]
        b = layer.bias if layer.bias is not None else torch.zeros(layer.out_features)
        w0 = torch.cat([layer.weight.detach(), b.detach().reshape(-1, 1)], 1)
        w = w0.to(self.device, torch.float64).clone().requires_grad_(True)
        lam, loss_fn = self.l2_strength, self.task.original_loss_func
        opt = torch.optim.LBFGS([w], lr=1, max_iter=self.epoch, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            obj = loss_fn(h @ w.T, y) + lam * (w * w).sum()
            obj.backward()
            return obj

        opt.step(closure)
        pre = (h @ w.detach().T).requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(pre, y), pre)  # = (1/n) dL_j/dPhi_j
        self.alpha = (-g / (2 * lam)).detach()
        self.h_train, self.weight = h, w.detach()
        self._dtype = layer.weight.dtype

    def attribute(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        """Representer values ``(n_train, n_test)`` for the test labels' classes."""
        self._check_pair(train_loader, test_loader)
        self._ensure_cached(train_loader)
        h_t, y_t = self._features(test_loader)
        kernel = self.h_train @ h_t.T
        return (self.alpha[:, y_t.long()] * kernel).to(self._dtype)

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``alpha_j[y_j] * ||h~_j||^2`` as ``(n_train,)``."""
        check_loader(train_loader, "train_loader")
        self._ensure_cached(train_loader)
        h, y = self._features(train_loader)
        a = self.alpha.gather(1, y.long().reshape(-1, 1)).squeeze(1)
        return (a * (h * h).sum(1)).to(self._dtype)

    def decompose(self, test_loader: Iterable) -> torch.Tensor:
        """Per-class representer decomposition ``(n_train, n_test, C)`` (small data only)."""
        if self.alpha is None:
            msg = "call cache(train_loader) before decompose()."
            raise NotCachedError(msg)
        h_t, _ = self._features(test_loader)
        return self.alpha[:, None, :] * (self.h_train @ h_t.T)[:, :, None]
