"""Forward-hook capture of ``nn.Linear`` inputs and output gradients (private).

Shared by the hook-based attributors (EK-FAC, LoGra, FactGraSS) and the factored
fast path of TracIn / Grad-Dot / Grad-Cos.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from dattri._convention import batch_scale, capture_per_example, is_unbatched
from dattri._loader import batch_size_of
from dattri._warn import warn_user
from dattri.algorithm._batched import (
    ModelSizes,
    RootCalls,
    _rows_agree,
    _same_mask_dropout,
    coupled_message,
    example_alone,
    head_agrees,
    lifted,
)
from dattri.algorithm._loop import LoaderFeatures, _check_finite, ensemble_rng
from dattri.errors import DattriValueError, InvalidLossError, LayerNameError
from dattri.func.per_example import _is_hf_conv1d
from dattri.task import AttributionTask

__all__ = ["HookFeaturizer", "LinearCapture", "layer_dims", "resolve_linear_modules"]


def _param_names(module_name: str, bias: bool) -> list[str]:
    pre = f"{module_name}." if module_name else ""
    return [f"{pre}weight"] + ([f"{pre}bias"] if bias else [])


def _is_layer(m: nn.Module, conv: bool) -> bool:
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        return True
    return conv and isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups == 1


def layer_dims(m: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of the linear map a captured layer applies at each position:
    ``nn.Linear``; Hugging Face ``Conv1D`` (GPT-2, weight ``(d_in, d_out)``); a
    convolution on its ``C_in * K`` input patches."""
    if _is_hf_conv1d(m):
        return m.nf, m.weight.shape[0]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        return m.out_channels, m.weight[0].numel()
    return m.out_features, m.in_features


def resolve_linear_modules(
    task: AttributionTask, module_name: str | Sequence[str] | None, conv: bool = False,
) -> tuple[list[str], dict[str, bool], list[str]]:
    """Selected Linear modules (and, with ``conv``, ungrouped ``nn.Conv1d`` /
    ``nn.Conv2d``: linear maps of their input patches), whether each has a trainable
    bias, their param names."""
    task._resolve_layer_name(None)  # loads checkpoint 0 -> named_parameters
    modules = dict(task.model.named_modules())
    trainable = task.named_parameters
    kinds = ("nn.Linear (or transformers Conv1D) or ungrouped nn.Conv1d/Conv2d" if conv
             else "nn.Linear (or transformers Conv1D)")
    if module_name is None:
        names = [n for n, m in modules.items() if _is_layer(m, conv)
                 and _param_names(n, False)[0] in trainable]
        if not names:
            msg = (f"module_name=None: the model has no {kinds} module with a trainable "
                   "weight; K-FAC-style methods need such layers.")
            raise DattriValueError(msg)
    else:
        names = [module_name] if isinstance(module_name, str) else list(module_name)
        linear = [n for n, m in modules.items() if _is_layer(m, conv)]
        bad = [n for n in names if n not in linear or _param_names(n, False)[0] not in trainable]
        if bad or not names:
            msg = (f"module_name={module_name!r}: {bad} are not {kinds} modules with a "
                   f"trainable weight; use names of model.named_modules(), e.g. {linear[:8]}.")
            raise LayerNameError(msg)
    bias = {n: _param_names(n, True)[1] in trainable for n in names}
    params = [p for n in names for p in _param_names(n, bias[n])]
    return names, bias, [p for p in trainable if p in set(params)]


def _patches(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input as ``(B, L, C_in * K)`` patches (the linear map's inputs)."""
    from dattri.func.per_example import _conv_patches

    return _conv_patches(m, x)[0].transpose(1, 2)


def _as_seq(t: torch.Tensor) -> torch.Tensor:
    """``(B, d)`` -> ``(B, 1, d)``; ``(B, ..., d)`` -> ``(B, T, d)``."""
    return t[:, None] if t.dim() == 2 else t.reshape(t.shape[0], -1, t.shape[-1])  # noqa: PLR2004


class LinearCapture:
    """Inputs ``a (B, T, d_in)`` and per-example output gradients ``s (B, T, d_out)``.

    ``run`` calls the loss (or target) function on a batch with forward hooks on the
    selected Linear modules; each output ``y`` is replaced by ``y + 0`` with a zero
    leaf so that ``autograd.grad`` of ``B L`` (the loss is a mean) w.r.t. the leaf gives
    each example's own ``dL_b/dy_b`` (as :class:`dattri.algorithm._batched.BatchedGrads`
    takes them: the same rounding on both paths).
    """

    def __init__(self, task: AttributionTask, modules: list[str], device: torch.device) -> None:
        self.task, self.modules, self.device = task, modules, device
        self._ckpt: int | None = None
        self._runs = 0  # batches captured: batch r probes example r mod B
        self._warned_probe = False
        self._sizes = ModelSizes()  # the model's own sizes, per example shape

    def _prepare(self, ckpt: int) -> None:
        # once per capture and checkpoint, then only when the task switched checkpoints
        self.task.load_checkpoint(ckpt, self.device, force=self._ckpt != ckpt)
        self._ckpt = ckpt

    def run(self, batch: Any, ckpt: int, which: str = "loss",
            func: Callable | None = None, one_by_one: bool = True,
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Captured ``{module: (a, s)}`` for one batch already on the device. A batch
        whose probed example differs alone (:meth:`_probe`) is captured one example
        at a time, or with ``one_by_one=False`` refused (``InvalidLossError``)."""
        task = self.task
        self._prepare(ckpt)
        if func is None:
            task.validate_batch(batch, which, ckpt)
            func = task.original_loss_func if which == "loss" else task.original_target_func
        b = batch_size_of(batch)
        if is_unbatched(func) and b > 1:  # 0.3.0's single-example style
            return capture_per_example(lambda one: self.run(one, ckpt, which, func), batch)
        mods = dict(task.model.named_modules())
        sizes = frozenset() if b == 1 else self._sizes(
            task.model, [mods[n] for n in self.modules], func, dict(task.named_parameters),
            batch, self.device)
        if b in sizes:  # a shared input of the model's own size would pass for the batch
            return capture_per_example(lambda part: self.run(part, ckpt, which, func, one_by_one),
                                       batch, ModelSizes.part(b, sizes))
        store: dict[str, list] = {n: [] for n in self.modules}
        order: list[str] = []  # the modules in call order

        def make_hook(name: str) -> Callable:
            def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
                order.append(name)
                if store[name]:
                    msg = (f"module {name!r} is called more than once per forward pass "
                           "(shared weights); this is not supported, exclude it via module_name.")
                    raise DattriValueError(msg)
                x = inputs[0]
                if x.dim() == 0 or x.shape[0] != b:
                    # a call without the batch axis (features of the positions, shared
                    # by the batch and broadcast later): each example's own copy
                    x, output = lifted(x, b), lifted(output, b)
                # y + 0-leaf: d loss / d leaf = d loss / d y, and the graph to
                # earlier layers stays intact
                leaf = torch.zeros_like(output, requires_grad=True)
                store[name].append((x.detach(), leaf))
                return output + leaf
            return hook

        handles = [mods[n].register_forward_hook(make_hook(n)) for n in self.modules]
        root = RootCalls(task.model)
        handles.append(root.hook())
        try:
            # active nn.Dropout: one mask for the batch, as the per-example definition
            # (each example alone, seeded alike) draws it
            with ensemble_rng(ckpt, self.device), _same_mask_dropout(task.model), \
                    torch.enable_grad():
                loss = func(dict(task.named_parameters), batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    msg = "the loss/target function must return a scalar batch mean."
                    raise InvalidLossError(msg)
                missing = [n for n in self.modules if not store[n]]
                if missing:  # e.g. the loss calls another instance of the model
                    msg = (f"modules {missing} were not called by the loss function "
                           "(does it call task.model?); drop them from module_name.")
                    raise DattriValueError(msg)
                leaves = [store[n][0][1] for n in self.modules]
                grads = torch.autograd.grad(loss.reshape(()) * batch_scale(func, b), leaves,
                                            allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        if not self._probe(func, batch, ckpt, mods[order[-1]], store[order[-1]][0][0],
                           grads[self.modules.index(order[-1])], root):
            if not one_by_one:
                msg = (f"{which} layer captures: the loss couples the examples of a batch "
                       "(an example's output gradient differs from the one it has alone).")
                raise InvalidLossError(msg)
            if not self._warned_probe:
                self._warned_probe = True
                warn_user(coupled_message(f"{which} layer captures", "output gradient",
                                          "captured one example at a time"))
            return capture_per_example(lambda one: self.run(one, ckpt, which, func), batch)
        out, it = {}, iter(grads)
        for n in self.modules:
            a, leaf = store[n][0]
            g = next(it)
            g = torch.zeros_like(leaf) if g is None else g.detach()
            if isinstance(mods[n], (nn.Conv1d, nn.Conv2d)):  # positions = output pixels
                a, g = _patches(mods[n], a), g.reshape(b, g.shape[1], -1).transpose(1, 2)
            out[n] = (_as_seq(a), _check_finite(_as_seq(g), f"{which} output gradients"))
        return out

    def _probe(self, func: Callable, batch: Any, ckpt: int, module: nn.Module, x: torch.Tensor,
               g: torch.Tensor | None, root: RootCalls) -> bool:
        """Whether one example of the batch (the next in turn) gets from the loss what
        it gets alone: at the model's outputs (:func:`head_agrees`), or where that
        cannot be decided, the input and output gradient at the captured layer
        nearest the loss, with the same dropout masks (see ``BatchedGrads._probe``)."""
        b = batch_size_of(batch)
        self._runs += 1
        if b < 2:  # noqa: PLR2004
            return True
        i = (self._runs - 1) % b
        head = head_agrees(root, func, dict(self.task.named_parameters), batch, i, b)
        if head is not None:
            return head
        if g is None:
            return True
        with ensemble_rng(ckpt, self.device):
            alone = example_alone(self.task.model, module, func, dict(self.task.named_parameters),
                                  batch, i)
        if alone is None or alone[0] is None:
            return True
        x1, _, g1 = alone
        return _rows_agree(x[i:i + 1], x1) and _rows_agree(g[i:i + 1], g1)


class HookFeaturizer(LoaderFeatures):
    """Featurizer-compatible (``batch``/``iterate``/``all``) features from captures.

    Args:
        capture: the :class:`LinearCapture`.
        which: ``"loss"`` or ``"target"``.
        transform: ``f(captured dict, ckpt) -> (B, K)``.
        release: optional; called with a batch's features once a :meth:`stream`
            consumer asks for the next batch (the transform may then reuse them).
    """

    def __init__(self, capture: LinearCapture, which: str,
                 transform: Callable[[dict, int], torch.Tensor],
                 release: Callable[[torch.Tensor], None] | None = None) -> None:
        self.capture, self.which, self.transform = capture, which, transform
        self._release = release
        self.device = capture.device
        self.show_progress: bool | None = None

    def release(self, features: torch.Tensor) -> None:
        """Hand a batch's features to the ``release`` given (the transform may reuse
        their memory for a later batch)."""
        if self._release is not None:
            self._release(features)

    def batch(self, batch: Any, ckpt_idx: int) -> torch.Tensor:
        """Features ``(B, K)`` of one batch already on the device."""
        return self.transform(self.capture.run(batch, ckpt_idx, self.which), ckpt_idx)
