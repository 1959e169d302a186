"""Shared pieces of the two next-token settings (Music Transformer, nanoGPT).

Private. A batch is ``(x, y)`` with ``x, y`` int64 ``(B, L)`` and ``y[:, t]``
the token after ``x[:, t]``. The loss of a batch is the mean token
cross-entropy

    loss = 1 / (B L) * sum_{b, t} -log softmax(f(x_b))[t, y_{b t}],

or, with ``last_only``, the mean over ``b`` of the last position's term (the
"generate one event" target of the paper's MAESTRO setting).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from tqdm.auto import tqdm

from dattri.errors import CheckpointError, DattriValueError

__all__ = ["lm_loss", "train_language_model"]

_DEFAULT_MODELS: dict[Callable[..., nn.Module], nn.Module] = {}


def split_batch(data: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` from a tuple / list, or a dict with ``x``/``y`` or ``input_ids``/``labels``."""
    if isinstance(data, Mapping):
        for kx, ky in (("x", "y"), ("input_ids", "labels")):
            if kx in data and ky in data:
                return data[kx], data[ky]
    elif isinstance(data, (tuple, list)) and len(data) == 2:  # noqa: PLR2004
        return data[0], data[1]
    msg = (
        f"{name}: data must be a batch (x, y) of int64 (B, L) token tensors "
        f"(or a dict with x/y), got {type(data).__name__}."
    )
    raise DattriValueError(msg)


def is_batch(data: Any) -> bool:
    """A single batch (tuple / list / dict of tensors), as opposed to a loader."""
    if isinstance(data, Mapping):
        return True
    return isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data)


def _token_loss(
    logits: torch.Tensor, y: torch.Tensor, last_only: bool, reduction: str = "mean",
) -> torch.Tensor:
    if last_only:
        return F.cross_entropy(logits[:, -1], y[:, -1], reduction=reduction)
    if reduction == "none":
        ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        return ce.mean(dim=1)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def default_model(factory: Callable[..., nn.Module]) -> nn.Module:
    """The paper-size model of ``factory``, built once, in eval mode (a shape template)."""
    if factory not in _DEFAULT_MODELS:
        _DEFAULT_MODELS[factory] = factory().eval()
    return _DEFAULT_MODELS[factory]


def _check_full_params(params: Mapping[str, torch.Tensor], model: nn.Module, name: str) -> None:
    want = {k: tuple(p.shape) for k, p in model.named_parameters()}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) or [k for k in want if want[k] != got[k]]
        msg = (
            f"{name}: params do not match the paper-size model (first mismatch: "
            f"{bad[:1]}); for another size pass model= the module the params belong "
            "to, e.g. functools.partial(loss, model=model)."
        )
        raise DattriValueError(msg)


def lm_loss(
    params: Any,
    data: Any,
    model: nn.Module | str | torch.device | None,
    device: str | torch.device,
    factory: Callable[..., nn.Module],
    from_state: Callable[[Mapping[str, torch.Tensor]], nn.Module],
    last_only: bool,
    name: str,
) -> torch.Tensor:
    """Functional batch loss, or per-example values of a checkpoint over a loader.

    ``factory()`` builds the paper-size template used when ``model`` is None in
    the functional form; ``from_state(state_dict)`` builds a model of the
    checkpoint's size in the per-example form.
    """
    if isinstance(model, (str, torch.device)):  # published order: (path, loader, device)
        model, device = None, model
    if isinstance(params, (str, os.PathLike, nn.Module)) or (
        isinstance(params, Mapping) and not is_batch(data)
    ):
        return _per_example(params, data, model, device, from_state, last_only, name)
    if not isinstance(params, Mapping):
        msg = (
            f"{name}: params must be a name -> tensor dict (loss(params, batch)), or a "
            "checkpoint path / state dict / model (loss(checkpoint, dataloader)), got "
            f"{type(params).__name__}."
        )
        raise DattriValueError(msg)
    if model is None:
        model = default_model(factory)
        _check_full_params(params, model, name)
    x, y = split_batch(data, name)
    logits = functional_call(model, dict(params), (x,))
    return _token_loss(logits, y, last_only)


def _per_example(
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module,
    loader: Iterable,
    model: nn.Module | None,
    device: str | torch.device,
    from_state: Callable[[Mapping[str, torch.Tensor]], nn.Module],
    last_only: bool,
    name: str,
) -> torch.Tensor:
    from dattri.task import load_state_dict_file  # noqa: PLC0415

    if isinstance(checkpoint, nn.Module):
        net = checkpoint
    else:
        if not isinstance(checkpoint, Mapping):
            checkpoint = load_state_dict_file(checkpoint)
        state = dict(checkpoint)
        net = from_state(state) if model is None else copy.deepcopy(model)
        try:
            net.load_state_dict(state)
        except RuntimeError as exc:
            msg = (
                f"{name}: the checkpoint does not fit the model ({exc}); pass model= "
                "the right architecture."
            )
            raise CheckpointError(msg) from exc
    net.to(device).eval()
    out = []
    with torch.no_grad():
        for batch in loader:
            x, y = split_batch(batch, name)
            out.append(_token_loss(net(x.to(device)), y.to(device), last_only, "none").cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _check_train_args(epoch_num: int | None, max_iters: int | None) -> None:
    for arg, value in (("epoch_num", epoch_num), ("max_iters", max_iters)):
        bad = isinstance(value, bool) or not isinstance(value, int) or value < 0
        if value is not None and bad:
            msg = f"{arg}: expected an int >= 0 or None, got {value!r}."
            raise DattriValueError(msg)
    if epoch_num is None and max_iters is None:
        msg = "epoch_num / max_iters: give at least one of them (both None would never stop)."
        raise DattriValueError(msg)


def train_language_model(  # noqa: PLR0913
    model: nn.Module,
    loader: Iterable,
    *,
    epoch_num: int | None,
    max_iters: int | None,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    grad_clip: float | None,
    device: str | torch.device,
    progress: bool | None,
    desc: str,
) -> nn.Module:
    """Adam on the mean token cross-entropy until ``epoch_num`` passes or ``max_iters`` steps."""
    _check_train_args(epoch_num, max_iters)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps)
    steps, epoch = 0, 0
    bar = tqdm(total=max_iters, desc=desc, disable=None if progress is None else not progress)
    while (epoch_num is None or epoch < epoch_num) and (max_iters is None or steps < max_iters):
        seen = 0
        for batch in loader:
            if max_iters is not None and steps >= max_iters:
                break
            x, y = split_batch(batch, "train_dataloader")
            loss = _token_loss(model(x.to(device)), y.to(device), last_only=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            steps, seen = steps + 1, seen + 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
        epoch += 1
        if seen == 0:
            break  # empty loader
    bar.close()
    return model.eval()
