"""Factored per-example gradients of ``nn.Linear`` layers (private fast path).

For a linear layer ``out = W a + b`` applied once per example, the per-example
gradient of the loss is the outer product ``dW_i = delta_i a_i^T`` (and
``db_i = delta_i``), with ``delta_i = d loss_i / d out_i``. Hence

    <g_i, g_j> = sum_l (delta_il . delta_jl) * (a~_il . a~_jl),

where ``a~`` is ``a`` (weight selected), ``1`` (bias selected) or ``[a, 1]``.
Inner products of n train and m test gradients then cost
``2 n m sum_l (d_in + d_out)`` instead of ``2 n m P``.

Factors come from :class:`dattri.algorithm._hooks.LinearCapture`. The path is
used only when every selected parameter belongs to an ``nn.Linear`` called once
per forward on 2-D inputs, and it is checked once per task against
dense per-example gradients (``Featurizer``); any mismatch (a loss that couples
examples, batch statistics, weight sharing...) falls back to dense gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dattri.algorithm._loop import BufferLender, LoaderFeatures, _head, close_per_example
from dattri.algorithm._hooks import LinearCapture
from dattri.errors import DattriValueError
from dattri.task import AttributionTask

__all__ = ["FactoredGrads", "FactoredLinearFeaturizer"]


class FactoredGrads:
    """Per-example gradients of a batch as per-layer factors ``[(A_l, D_l)]``.

    ``A_l``: ``(B, d_in~)`` inputs (with a ones column for a selected bias);
    ``D_l``: ``(B, d_out)`` output gradients of each example's own loss.
    """

    def __init__(self, factors: list[tuple[torch.Tensor, torch.Tensor]],
                 layout: list[tuple[bool, bool]] | None = None) -> None:
        self.factors = factors
        #: per layer (weight selected, bias selected); the bias column is last in A
        self.layout = layout or [(True, False)] * len(factors)

    def __len__(self) -> int:
        return self.factors[0][0].shape[0]

    def gram(self, other: FactoredGrads) -> torch.Tensor:
        """``(B, B')`` inner products of the two sets of gradients."""
        out = None
        for (a1, d1), (a2, d2) in zip(self.factors, other.factors):
            term = (d1 @ d2.T) * (a1 @ a2.T)
            out = term if out is None else out + term
        return out

    def rowdot(self, other: FactoredGrads) -> torch.Tensor:
        """``(B,)`` inner products of matching rows ``<g_i, g'_i>``."""
        return sum((d1 * d2).sum(1) * (a1 * a2).sum(1)
                   for (a1, d1), (a2, d2) in zip(self.factors, other.factors))

    def sq_norms(self) -> torch.Tensor:
        """``(B,)`` squared gradient norms."""
        return sum((d * d).sum(1) * (a * a).sum(1) for a, d in self.factors)

    def dense(self, lender: BufferLender | None = None) -> torch.Tensor:
        """``(B, P)`` flat gradients in the task's parameter order, written into a
        buffer from ``lender`` when given (a lent-back one saves its page faults)."""
        b = self.factors[0][1].shape[0]
        widths = [(a.shape[1] - (1 if bs else 0)) * d.shape[1] * ws + d.shape[1] * bs
                  for (a, d), (ws, bs) in zip(self.factors, self.layout)]
        d0 = self.factors[0][1]
        shape = (b, sum(widths))
        out = (torch.empty(shape, dtype=d0.dtype, device=d0.device) if lender is None
               else lender.take(shape, d0.dtype, d0.device))
        start = 0
        for (a, d), (w_sel, b_sel) in zip(self.factors, self.layout):
            o = d.shape[1]
            if w_sel:
                w_in = a[:, :-1] if b_sel else a
                i = w_in.shape[1]
                # outer products written in place: no per-layer copy, no concatenation
                torch.mul(d[:, :, None], w_in[:, None, :], out=out[:, start:start + o * i].view(b, o, i))
                start += o * i
            if b_sel:
                out[:, start:start + o] = d
                start += o
        return out

    @staticmethod
    def cat(parts: Sequence[FactoredGrads]) -> FactoredGrads:
        """Concatenate along the example axis."""
        return FactoredGrads([
            (torch.cat([p.factors[i][0] for p in parts]), torch.cat([p.factors[i][1] for p in parts]))
            for i in range(len(parts[0].factors))
        ], parts[0].layout)

    def scale_rows(self, s: torch.Tensor) -> FactoredGrads:
        """Multiply each example's gradient by ``s_i`` (applied to the output factor)."""
        return FactoredGrads([(a, d * s[:, None]) for a, d in self.factors], self.layout)


def _layers(task: AttributionTask, names: list[str]) -> list[tuple[str, bool, bool]] | None:
    """``[(module_name, weight_selected, bias_selected)]`` or None if unsupported."""
    modules = dict(task.get_model().named_modules())
    chosen: dict[str, list[bool]] = {}
    for n in names:
        mod_name, _, leaf = n.rpartition(".")
        mod = modules.get(mod_name)
        if not isinstance(mod, nn.Linear) or leaf not in ("weight", "bias"):
            return None
        chosen.setdefault(mod_name, [False, False])[0 if leaf == "weight" else 1] = True
    return [(m, w, b) for m, (w, b) in chosen.items()]


class FactoredLinearFeaturizer(LoaderFeatures):
    """Capture ``(A_l, D_l)`` per batch with module hooks on the task's model.

    Args:
        task: the attribution task (its loss must call ``task.model``).
        which: ``"loss"`` or ``"target"``.
        layer_name: selected parameters.
        device: computation device.
    """

    def __init__(self, task: AttributionTask, which: str, layer_name, device: torch.device,
                 show_progress: bool | None = None) -> None:
        self.task, self.which, self.layer_name, self.device = task, which, layer_name, device
        self.show_progress = show_progress
        self.layers = _layers(task, task._resolve_layer_name(layer_name))
        self._capture = LinearCapture(task, [m for m, _, _ in self.layers or []], device)
        self._verified: dict[int, bool] = {}

    @property
    def supported(self) -> bool:
        return self.layers is not None

    def layer_sizes(self) -> list[tuple[int, int, bool, bool]]:
        """``(d_in, d_out, weight_selected, bias_selected)`` of each captured layer."""
        mods = dict(self.task.get_model().named_modules())
        return [(mods[m].in_features, mods[m].out_features, w, b) for m, w, b in self.layers]

    def try_batch(self, batch: Any, ckpt_idx: int, one_by_one: bool = True) -> FactoredGrads | None:
        """Factors of one batch, or None if the structure is not as assumed (or, with
        ``one_by_one=False``, if the batch's examples are coupled)."""
        try:
            cap = self._capture.run(batch, ckpt_idx, self.which, one_by_one=one_by_one)
        except DattriValueError:  # shared weights, module not called...
            return None
        factors = []
        for m, w_sel, b_sel in self.layers:
            a, s = cap[m]
            if a.shape[1] != 1:  # sequence inputs: per-example grads are not rank one
                return None
            a, s = a[:, 0], s[:, 0]
            ones = torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)
            factors.append((torch.cat(([a] if w_sel else []) + ([ones] if b_sel else []), 1), s))
        return FactoredGrads(factors, [(w, b) for _, w, b in self.layers])

    def verify(self, batch: Any, ckpt_idx: int, dense: Callable[[Any, int], torch.Tensor]) -> bool:
        """Compare with ``dense(batch, ckpt)`` (raw per-example gradients) on up to 4
        examples of ``batch``, once per checkpoint."""
        if ckpt_idx in self._verified:
            return self._verified[ckpt_idx]
        small = _head(batch)
        ref = dense(small, ckpt_idx)  # also moves the model to the device
        # the batched capture itself (a coupled batch refused, not captured per example)
        fg = self.try_batch(small, ckpt_idx, one_by_one=False) if self.supported else None
        ok = fg is not None and close_per_example(fg.dense(), ref)
        self._verified[ckpt_idx] = ok
        return ok

    def batch(self, batch: Any, ckpt_idx: int) -> FactoredGrads:
        """Factors of one batch after validating the loss; for use once verified."""
        self.task.validate_batch(batch, self.which, ckpt_idx)
        fg = self.try_batch(batch, ckpt_idx)
        if fg is None:  # pragma: no cover - verified beforehand
            msg = "factored gradients became unavailable mid-run"
            raise RuntimeError(msg)
        return fg
