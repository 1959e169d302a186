"""TracInCP (Pruthi et al. 2020), Grad-Dot and Grad-Cos (Charpiat et al. 2019).

    tau(i, j) = sum_c eta_c * <g_loss^c(z_i), g_target^c(z_j)>

over checkpoints c with weights ``eta_c`` (the learning rates). Grad-Dot is one
checkpoint with weight 1; Grad-Cos additionally normalises both gradients to unit
length, so its self-influence is 1 when target = loss. Gradients may be randomly
projected first (``proj_params``); without projection the inner products are exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from dattri.algorithm._engine import score_stream
from dattri.algorithm.base import BaseAttributor, make_projection, projector_kwargs
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

__all__ = ["TracInAttributor"]


def _unit_rows(g: torch.Tensor) -> torch.Tensor:
    return g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)


class TracInAttributor(BaseAttributor):
    """TracInCP / Grad-Dot / Grad-Cos.

    Args:
        task: attribution task; its checkpoints are the TracIn checkpoints.
        weight_list: one weight per checkpoint (learning rates), tensor or list.
        normalized_grad: normalise gradients (Grad-Cos).
        proj_params: projection settings (``TracInProjectionParams`` or dict) or
            ``None`` for exact inner products.
        layer_name: restrict to these parameters.
        device: computation device.
    """

    def __init__(
        self,
        task: AttributionTask,
        weight_list: torch.Tensor | Sequence[float],
        normalized_grad: bool,
        proj_params: Any = None,
        layer_name: str | Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(task, layer_name, device)
        w = torch.as_tensor(weight_list, dtype=torch.float64).reshape(-1)
        if w.numel() != self.num_checkpoints:
            msg = (
                f"weight_list has {w.numel()} weight(s) but the task has "
                f"{self.num_checkpoints} checkpoint(s); pass one weight (learning rate) "
                "per checkpoint, e.g. torch.ones(len(checkpoints)) for Grad-Dot."
            )
            raise DattriValueError(msg)
        self.weight_list = w
        self.normalized_grad = bool(normalized_grad)
        self.proj_params = proj_params
        transform = make_projection(projector_kwargs(proj_params), self.device)
        post = _unit_rows if self.normalized_grad else None

        def feature(g: torch.Tensor, c: int) -> torch.Tensor:
            if transform is not None:
                g = transform(g, c)
            return post(g) if post is not None else g

        self.train_features.transform = feature
        self.test_features.transform = feature

    def attribute(self, train_loader: Iterable, test_loader: Iterable) -> torch.Tensor:
        """Scores ``(n_train, n_test)`` = weighted sum over checkpoints."""
        self._check_pair(train_loader, test_loader)
        total = None
        for c in range(self.num_checkpoints):
            ft = self.test_features.all(test_loader, c, "test grads")
            s = score_stream(self.train_features.iterate(train_loader, c), ft)
            s = s * self.weight_list[c].to(s.dtype)
            total = s if total is None else total + s
        return total

    def self_attribute(self, train_loader: Iterable) -> torch.Tensor:
        """``sum_c eta_c <g_loss^c(z_i), g_target^c(z_i)>`` as ``(n_train,)``."""
        same = self.task.original_target_func is self.task.original_loss_func
        total = None
        for c in range(self.num_checkpoints):
            targets = None if same else self.test_features.iterate(train_loader, c)
            parts = []
            for g in self.train_features.iterate(train_loader, c, "self-influence"):
                gt = g if targets is None else next(targets)
                parts.append((g * gt).sum(dim=1))
            s = torch.cat(parts) * self.weight_list[c]
            total = s if total is None else total + s.to(total.dtype)
        return total
