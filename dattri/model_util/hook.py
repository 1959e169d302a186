"""Forward hooks: the input and output of a model's final (linear) layer.

Representer point selection (Yeh et al., NeurIPS 2018) writes the model as
``f(x) = W phi(x)``: ``phi(x)`` is the input of the final linear layer and
``f(x)`` its output. :func:`get_final_layer_io` records both for every example of
a loader in one pass, with ``torch.no_grad`` and the model in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from dattri._loader import batch_context, batches, check_loader, to_device
from dattri.errors import DattriValueError, LayerNameError

__all__ = ["get_final_layer_io"]


def _model_input(batch: Any) -> tuple[tuple, dict]:
    """Positional / keyword model inputs of a batch: ``x`` of ``(x, y)``, a tensor, or a dict."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, (tuple, list)) and batch:
        return (batch[0],), {}
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k not in ("label", "labels", "y", "target")}
    msg = (
        f"dataloader yields {type(batch).__name__} batches; expected (inputs, labels) "
        "tuples, input tensors, or dicts of keyword inputs."
    )
    raise DattriValueError(msg)


def get_final_layer_io(
    model: nn.Module,
    final_linear_layer_name: str,
    dataloader: Iterable,
    device: str | torch.device = "cpu",
    on_batch: Callable[[Any], None] | None = None,
    name: str = "dataloader",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and output of the layer ``final_linear_layer_name`` for every example.

    Args:
        model: the model; it is run in eval mode (its mode is restored after).
        final_linear_layer_name: module name (``model.named_modules()`` key, dotted
            for nested modules, e.g. ``"classifier.2"``).
        dataloader: loader in a fixed order; batches ``(x, y, ...)`` (``x`` is fed to
            the model), a tensor ``x``, or a dict of keyword inputs.
        device: where the batches are moved (the model must already be there) and
            where the results are returned.
        on_batch: called with every batch as the loader yields it (e.g. to collect
            the labels in the same pass: a second pass would collate every batch
            again).
        name: the loader's name in errors (a batch the model cannot take raises
            ``InvalidBatchError`` naming it and the batch index).

    Returns:
        ``(features, outputs)``: ``(n, d_in)`` inputs of the layer (``phi(x)``) and
        ``(n, d_out)`` its outputs, in loader order.

    Raises:
        LayerNameError: no module of that name (the message lists the names).
    """
    check_loader(dataloader, name)
    names = dict(model.named_modules())
    if not isinstance(final_linear_layer_name, str) or final_linear_layer_name not in names:
        shown = [n for n in names if n][:20]
        msg = (
            f"final_linear_layer_name={final_linear_layer_name!r} is not a module of the "
            f"model; available names: {shown}."
        )
        raise LayerNameError(msg)
    layer = names[final_linear_layer_name]
    feats: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        feats.append(inputs[0].detach().to(device))
        outs.append(output.detach().to(device))

    handle = layer.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches(dataloader)):
                if on_batch is not None:
                    on_batch(batch)
                with batch_context(name, i):
                    args, kwargs = _model_input(to_device(batch, device))
                    model(*args, **kwargs)
    finally:
        handle.remove()
        model.train(was_training)
    if not feats:
        msg = "dataloader is empty (or the layer was never called in the forward pass)."
        raise DattriValueError(msg)
    return torch.cat(feats), torch.cat(outs)
