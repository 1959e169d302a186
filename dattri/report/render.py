"""Renderers: one training or test example -> an HTML fragment with inline PNGs.

A renderer is any callable ``render(item) -> str`` where ``item`` is what the
data set returns (``dataset[i]``, e.g. ``(x, y)``). The fragment goes into the
report as is: images are PNG data URIs (``matplotlib``, no pyplot state), text
is HTML-escaped. :func:`custom` wraps a user function that returns HTML, an
image array or a matplotlib figure; :func:`default_renderer` picks one for a data
set by its attributes (duck typing, no benchmark import):

=======================================  =====================================
data set                                 renderer
=======================================  =====================================
``mean``, ``std``, ``data`` (images)     :class:`ImageRenderer` (de-normalised)
``vocab`` with ``decode`` (characters)   :class:`TextRenderer`
``pieces`` and ``transposition`` (MIDI)  :class:`PianoRollRenderer`
float ``(C, H, W)``, ``C`` in 1, 3       :class:`ImageRenderer` (min-max scaled)
anything else                            :class:`GenericRenderer`
=======================================  =====================================
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dattri.errors import DattriValueError

__all__ = [
    "GenericRenderer",
    "ImageRenderer",
    "PianoRollRenderer",
    "TextRenderer",
    "custom",
    "default_renderer",
    "piano_roll",
    "png_data_uri",
]

Renderer = Callable[[Any], str]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def png_data_uri(image: Any) -> str:
    """A ``data:image/png;base64,...`` URI of a matplotlib figure or an image array.

    Arrays: ``(H, W)`` grey or ``(H, W, 3|4)`` colour, values in ``[0, 1]``.
    """
    buf = io.BytesIO()
    if hasattr(image, "savefig"):
        image.savefig(buf, format="png", bbox_inches="tight", pad_inches=0.02)
    else:
        from matplotlib.image import imsave

        arr = np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0)
        if arr.ndim == 2:
            imsave(buf, arr, format="png", cmap="gray", vmin=0.0, vmax=1.0)
        elif arr.ndim == 3 and arr.shape[2] in (3, 4):
            imsave(buf, arr, format="png")
        else:
            msg = f"image: expected (H, W) or (H, W, 3|4) values in [0, 1], got shape {arr.shape}."
            raise DattriValueError(msg)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, css: str = "") -> str:
    return f'<img src="{uri}" class="{css}" alt="">'


def _split(item: Any) -> tuple[Any, Any]:
    """``(x, label)`` of a data set item (tuple / list / dict / tensor)."""
    if isinstance(item, dict):
        values = list(item.values())
        return values[0], (values[1] if len(values) > 1 else None)
    if isinstance(item, (tuple, list)):
        return item[0], (item[1] if len(item) > 1 else None)
    return item, None


def _label_html(label: Any, classes: Sequence[str] | None) -> str:
    if label is None:
        return ""
    t = torch.as_tensor(label)
    if t.numel() != 1:
        return ""
    value = t.item()
    name = str(value)
    if classes is not None and isinstance(value, int) and 0 <= value < len(classes) and str(
            classes[value]) != name:
        name = f"{value}: {classes[value]}"
    return f'<div class="label">label {html.escape(name)}</div>'


class ImageRenderer:
    """An image tensor ``(C, H, W)``, ``(H, W)`` or ``(H, W, C)`` as a PNG.

    Args:
        mean, std: per-channel normalisation to undo (``x * std + mean``); without
            them each image is min-max scaled.
        classes: class names, indexed by label.
        scale: on-page magnification (pixels are kept sharp).
    """

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 classes: Sequence[str] | None = None, scale: int = 3) -> None:
        self.mean, self.std, self.classes, self.scale = mean, std, classes, scale

    def array(self, x: Any) -> np.ndarray:
        """The ``(H, W)`` or ``(H, W, 3)`` array in ``[0, 1]`` that is drawn."""
        t = torch.as_tensor(x).detach().cpu().to(torch.float64)
        if t.ndim == 3 and t.shape[0] in (1, 3) and t.shape[-1] not in (1, 3):
            t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if t.ndim == 2:
            t = t.unsqueeze(-1)
        if t.ndim != 3 or t.shape[-1] not in (1, 3):
            msg = f"x: an image needs (C, H, W), (H, W) or (H, W, C) with C in 1, 3; got {tuple(t.shape)}."
            raise DattriValueError(msg)
        if self.mean is not None and self.std is not None:
            t = t * torch.tensor(self.std, dtype=t.dtype) + torch.tensor(self.mean, dtype=t.dtype)
        else:
            lo, hi = t.min(), t.max()
            t = (t - lo) / (hi - lo) if hi > lo else torch.zeros_like(t)
        arr = t.clamp(0, 1).numpy()
        return arr[..., 0] if arr.shape[-1] == 1 else arr

    def __call__(self, item: Any) -> str:
        x, label = _split(item)
        arr = self.array(x)
        w = arr.shape[1] * self.scale
        uri = png_data_uri(arr)
        return f'<img src="{uri}" class="pixels" style="width:{w}px" alt="">' + _label_html(
            label, self.classes)


class TextRenderer:
    """A character window ``(x, y)`` (``y`` = ``x`` shifted by one) as text.

    The window shown is ``x`` followed by the last target character: the first
    character is context only (greyed), every later one is a predicted (attributed)
    character. With ``last_only=True`` only the final character is attributed
    (highlighted).

    Args:
        decode: ids -> string (e.g. ``dataset.vocab.decode``).
        last_only: the attributed quantity is the last character's loss only.
    """

    def __init__(self, decode: Callable[[Any], str], last_only: bool = False) -> None:
        self.decode, self.last_only = decode, last_only

    def window(self, item: Any) -> str:
        """The text of the window (``x`` and the last target)."""
        x, y = _split(item)
        ids = torch.as_tensor(x).reshape(-1)
        if y is not None and torch.as_tensor(y).numel() == ids.numel():
            ids = torch.cat([ids, torch.as_tensor(y).reshape(-1)[-1:]])
        return self.decode(ids)

    def __call__(self, item: Any) -> str:
        text = self.window(item)
        head, body, tail = text[:1], text[1:], ""
        if self.last_only:
            head, body, tail = text[:-1], "", text[-1:]
        parts = [f'<span class="ctx">{html.escape(head)}</span>', html.escape(body)]
        if tail:
            parts.append(f'<mark>{html.escape(tail)}</mark>')
        return f'<pre class="text">{"".join(parts)}</pre>'


def piano_roll(tokens: Any) -> tuple[np.ndarray, int]:
    """``(roll (128, T), notes)``: velocity (0..1) of each pitch at each 10 ms step, and
    the number of notes; ``T`` is one step past the last note's end.

    Tokens are the 388-event performance vocabulary
    (:mod:`dattri.benchmark.datasets.maestro.events`); a window starting in the
    middle of a piece loses the notes sounding at its start (their NOTE_ON is
    before the window).
    """
    from dattri.benchmark.datasets.maestro.events import STEPS_PER_SECOND, events_to_notes

    notes = events_to_notes(torch.as_tensor(tokens).reshape(-1).cpu().numpy())
    steps = 1 + max((round(n.end * STEPS_PER_SECOND) for n in notes), default=0)
    roll = np.zeros((128, steps))
    for n in notes:
        on, off = round(n.start * STEPS_PER_SECOND), round(n.end * STEPS_PER_SECOND)
        roll[n.pitch, on:off] = n.velocity / 127.0
    return roll, len(notes)


class PianoRollRenderer:
    """Event tokens ``(x, y)`` as a piano roll (time right, pitch up).

    Args:
        last_event: mark the time of the last (attributed) event, for a target that
            scores the last event only (MAESTRO's).
    """

    def __init__(self, last_event: bool = False) -> None:
        self.last_event = last_event

    def __call__(self, item: Any) -> str:
        x, y = _split(item)
        tokens = torch.as_tensor(x).reshape(-1)
        if y is not None and torch.as_tensor(y).numel() == tokens.numel():
            tokens = torch.cat([tokens, torch.as_tensor(y).reshape(-1)[-1:]])
        roll, notes = piano_roll(tokens)
        steps = roll.shape[1]
        used = np.flatnonzero(roll.any(axis=1))
        lo, hi = (int(used.min()) - 2, int(used.max()) + 3) if used.size else (58, 70)
        fig = _figure(2.6, 1.5)
        ax = fig.add_axes((0.12, 0.16, 0.86, 0.8))
        ax.imshow(roll[max(lo, 0):hi], aspect="auto", origin="lower", cmap="magma",
                  vmin=0, vmax=1, extent=(0, steps / 100, max(lo, 0), hi), interpolation="nearest")
        if self.last_event:
            ax.axvline(steps / 100, color="#1f9e89", lw=2)
        ax.tick_params(labelsize=6)
        ax.set_xlabel("seconds", fontsize=6, labelpad=1)
        ax.set_ylabel("pitch", fontsize=6, labelpad=1)
        return _img(png_data_uri(fig), "roll") + (
            f'<div class="label">{tokens.numel()} events, {notes} notes</div>')


class GenericRenderer:
    """Any tensor: shape, dtype, the first values, the label; 1-D/2-D numbers as a strip."""

    def __init__(self, classes: Sequence[str] | None = None, max_values: int = 8) -> None:
        self.classes, self.max_values = classes, max_values

    def __call__(self, item: Any) -> str:
        x, label = _split(item)
        t = torch.as_tensor(x).detach().cpu()
        flat = t.reshape(-1)
        shown = ", ".join(f"{v:.3g}" if t.is_floating_point() else str(v)
                          for v in flat[: self.max_values].tolist())
        more = ", ..." if flat.numel() > self.max_values else ""
        parts = []
        if t.ndim in (1, 2) and flat.numel() > 1 and not t.is_complex():
            strip = t.to(torch.float64).reshape(1, -1) if t.ndim == 1 else t.to(torch.float64)
            parts.append(f'<img src="{png_data_uri(ImageRenderer().array(strip))}" '
                         'class="strip" alt="">')
        parts.append(f'<code>{tuple(t.shape)} {str(t.dtype).replace("torch.", "")}<br>'
                     f'[{html.escape(shown + more)}]</code>')
        return "".join(parts) + _label_html(label, self.classes)


def custom(func: Callable[[Any], Any]) -> Renderer:
    """A renderer from a user function of the item returning HTML, an array or a figure.

    ``str``: inserted as is (trusted HTML); a matplotlib figure or an ``(H, W[, 3])``
    array in ``[0, 1]`` (numpy or torch): shown as a PNG.
    """

    def render(item: Any) -> str:
        out = func(item)
        if isinstance(out, str):
            return out
        if isinstance(out, torch.Tensor):
            out = out.detach().cpu().numpy()
        return _img(png_data_uri(out), "custom")

    return render


def default_renderer(dataset: Any, last_only: bool = False) -> Renderer:
    """The renderer of a data set (see the module table); ``last_only``: the target
    scores the last token / event only."""
    base = dataset
    while hasattr(base, "dataset") and hasattr(base, "indices"):  # a torch Subset
        base = base.dataset
    classes = getattr(base, "classes", None)
    vocab = getattr(base, "vocab", None)
    if vocab is not None and hasattr(vocab, "decode"):
        return TextRenderer(vocab.decode, last_only=last_only)
    if hasattr(base, "pieces") and hasattr(base, "transposition"):
        return PianoRollRenderer(last_event=last_only)
    if hasattr(base, "mean") and hasattr(base, "std") and hasattr(base, "data"):
        return ImageRenderer(base.mean, base.std, classes)
    x, _ = _split(dataset[0])
    t = torch.as_tensor(x)
    if t.is_floating_point() and t.ndim == 3 and t.shape[0] in (1, 3) and min(t.shape[1:]) >= 8:
        return ImageRenderer(classes=classes)
    return GenericRenderer(classes)
