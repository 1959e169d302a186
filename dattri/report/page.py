"""The report page: one self-contained HTML file (inline PNGs, CSS, no script).

Layout: a summary (method, checkpoints, metric values, notes), the noisy-label
ranking (training examples of highest self-influence, the flipped ones flagged),
then one section per test example: the example, its top-k proponents (highest
score first) and its top-k opponents (lowest first), each with its training row
and score.

Machine-readable attributes (for tests and scripts): every test section has
``data-test-index``; every card ``data-kind`` (``proponent``, ``opponent``,
``self-influence``), ``data-rank``, ``data-train-index`` and ``data-score``
(``repr`` of the float: exact); noisy cards have ``data-flipped`` (0 or 1).
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dattri.errors import DattriValueError
from dattri.report.render import default_renderer
from dattri.report.topk import TopK

__all__ = ["render_report", "write_report"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:18px;
color:#1d2330;background:#fff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:22px 0 8px;border-bottom:1px solid #dde}
h3{font-size:13px;margin:6px 0 4px;text-transform:uppercase;letter-spacing:.05em;color:#556}
table.summary{border-collapse:collapse;font-size:13px}
table.summary td,table.summary th{padding:3px 10px;border-bottom:1px solid #eef;text-align:left;
vertical-align:top}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start}
.card{margin:0;padding:6px;border:1px solid #ccd;border-radius:6px;background:#fafbfd;
display:flex;flex-direction:column;align-items:center;max-width:280px}
.card figcaption{font-size:11px;color:#334;margin-top:3px;text-align:center}
.proponent{border-color:#3a8f3a;background:#f3faf3}.opponent{border-color:#c0392b;background:#fdf4f3}
.test-card{border:2px solid #2c4f9e;background:#f2f5fc}
.flipped{border:2px solid #e67e22;background:#fff6ea}
.flag{color:#c05f00;font-weight:600}
section.test{display:grid;grid-template-columns:auto 1fr;gap:4px 16px;padding:10px 0;
border-bottom:1px solid #e4e6ee}
section.test .anchor{grid-row:span 2}
img.pixels{image-rendering:pixelated}img.roll{width:260px}img.strip{width:160px;height:14px;
image-rendering:pixelated}
pre.text{font-size:11px;white-space:pre-wrap;width:240px;margin:0;font-family:ui-monospace,
Menlo,Consolas,monospace}
pre.text .ctx{color:#99a}pre.text mark{background:#ffd54f}
.label{font-size:11px;color:#445}code{font-size:10px}
.muted{color:#778;font-size:12px}
"""


def _score_text(score: float) -> str:
    return f"{score:+.4g}"


class _Cards:
    """Renders examples once each (a training example may appear many times)."""

    def __init__(self, dataset: Any, render: Callable[[Any], str]) -> None:
        self.dataset, self.render, self.memo = dataset, render, {}

    def body(self, index: int) -> str:
        if index not in self.memo:
            self.memo[index] = self.render(self.dataset[index])
        return self.memo[index]

    def card(self, index: int, css: str, caption: str, **data: Any) -> str:
        attrs = "".join(f' data-{k.replace("_", "-")}="{html.escape(str(v))}"'
                        for k, v in data.items())
        return (f'<figure class="card {css}"{attrs}>{self.body(index)}'
                f"<figcaption>{caption}</figcaption></figure>")


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def _summary(method: str | None, checkpoints: Any, metrics: Mapping[str, Any] | None,
             notes: Sequence[str], topk: TopK, n_train: int) -> str:
    rows = [("method", html.escape(method or "(not given)"))]
    if checkpoints is not None:
        ckpts = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
        names = ", ".join(html.escape(str(c)) for c in ckpts[:4])
        more = f", ... ({len(ckpts)} in all)" if len(ckpts) > 4 else ""
        rows.append(("checkpoints", f"{len(ckpts)}: {names}{more}"))
    for name, value in (metrics or {}).items():
        rows.append((html.escape(str(name)), _value_text(value)))
    rows.append(("shown", f"{len(topk.test_indices)} test examples, top {topk.k} proponents and "
                          f"opponents each, of {n_train} training examples"))
    rows.extend(("note", html.escape(str(n))) for n in notes)
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="summary">{body}</table>'


def _noisy(cards: _Cards, self_influence: torch.Tensor, flipped: Any, num: int) -> str:
    values = torch.as_tensor(self_influence).detach().cpu().reshape(-1)
    flags = torch.zeros(values.numel(), dtype=torch.bool)
    if flipped is not None:
        f = torch.as_tensor(flipped).reshape(-1)
        if f.numel() == values.numel() and set(f.unique().tolist()) <= {0, 1}:
            flags = f.to(torch.bool)  # a 0/1 mask
        else:
            flags[f.to(torch.int64)] = True  # the flipped rows
    order = torch.argsort(values, descending=True, stable=True)[:num]
    hits = int(flags[order].sum())
    out = []
    for rank, i in enumerate(order.tolist()):
        flip = bool(flags[i])
        cap = f"#{i} &middot; {_score_text(float(values[i]))}"
        if flip:
            cap += '<br><span class="flag">flipped label</span>'
        out.append(cards.card(i, "noisy flipped" if flip else "noisy", cap, kind="self-influence",
                              rank=rank, train_index=i, score=repr(float(values[i])),
                              flipped=int(flip)))
    total = f" ({int(flags.sum())} of {values.numel()} labels flipped)" if flipped is not None else ""
    head = (f'<p class="muted">The {len(order)} training examples of highest self-influence; '
            f"{hits} of them have a flipped label{total}.</p>")
    return head + f'<div class="row">{"".join(out)}</div>'


def _side(cards: _Cards, kind: str, rows: torch.Tensor, scores: torch.Tensor) -> str:
    out = []
    for rank, (i, s) in enumerate(zip(rows.tolist(), scores.tolist())):
        out.append(cards.card(i, kind, f"#{i} &middot; {_score_text(s)}", kind=kind, rank=rank,
                              train_index=i, score=repr(float(s))))
    title = "proponents (highest score)" if kind == "proponent" else "opponents (lowest score)"
    return f'<div><h3>{title}</h3><div class="row">{"".join(out)}</div></div>'


def render_report(
    topk: TopK,
    train_dataset: Any,
    test_dataset: Any,
    *,
    renderer: Callable[[Any], str] | None = None,
    test_renderer: Callable[[Any], str] | None = None,
    title: str = "dattri attribution report",
    method: str | None = None,
    checkpoints: Any = None,
    metrics: Mapping[str, Any] | None = None,
    self_influence: torch.Tensor | None = None,
    flipped: Any = None,
    num_noisy: int = 12,
    noisy_dataset: Any = None,
    notes: Sequence[str] = (),
) -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    n_train = len(train_dataset)
    rows = torch.cat([topk.proponents.reshape(-1), topk.opponents.reshape(-1)])
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n_train):
        msg = (f"topk: training rows {int(rows.min())}..{int(rows.max())} fall outside "
               f"train_dataset (len {n_train}); pass the data set whose item i is score row i "
               "(wrap it in torch.utils.data.Subset if the loader used a sampler).")
        raise DattriValueError(msg)
    n_noisy = n_train if noisy_dataset is None else len(noisy_dataset)
    if self_influence is not None and torch.as_tensor(self_influence).numel() != n_noisy:
        msg = (f"self_influence: {torch.as_tensor(self_influence).numel()} values for "
               f"{n_noisy} training examples; pass one value per training example.")
        raise DattriValueError(msg)
    render = renderer or default_renderer(train_dataset)
    cards = _Cards(train_dataset, render)
    tests = _Cards(test_dataset, test_renderer or renderer or default_renderer(test_dataset))
    parts = [f"<h1>{html.escape(title)}</h1>",
             _summary(method, checkpoints, metrics, notes, topk, n_train)]
    if self_influence is not None and num_noisy > 0:
        noisy = cards if noisy_dataset is None else _Cards(noisy_dataset, render)
        parts += ["<h2>Noisy-label ranking (self-influence)</h2>",
                  _noisy(noisy, self_influence, flipped, num_noisy)]
    parts.append("<h2>Test examples</h2>")
    for c, j in enumerate(topk.test_indices.tolist()):
        anchor = tests.card(j, "test-card", f"test #{j}", kind="test", test_index=j)
        parts.append(
            f'<section class="test" data-test-index="{j}"><div class="anchor">{anchor}</div>'
            + _side(cards, "proponent", topk.proponents[c], topk.proponent_scores[c])
            + _side(cards, "opponent", topk.opponents[c], topk.opponent_scores[c])
            + "</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(parts)}</body></html>\n")


def write_report(path: str | os.PathLike, topk: TopK, train_dataset: Any, test_dataset: Any,
                 **options: Any) -> Path:
    """Write the proponents / opponents page of ``topk`` to ``path`` (returned).

    Args:
        path: the HTML file to write (folders are created).
        topk: the ranking (:mod:`dattri.report.topk`); row ``i`` of the score is
            ``train_dataset[i]``, test position ``j`` is ``test_dataset[j]``.
        train_dataset, test_dataset: indexable data sets (items as the loaders
            yield them, before batching).
        **options: ``renderer`` (training side, default
            :func:`~dattri.report.render.default_renderer`), ``test_renderer``
            (default: ``renderer``), ``title``, ``method``, ``checkpoints`` (names
            or paths), ``metrics`` (``{"LDS": 0.72, ...}``), ``self_influence``
            (``(n_train,)``), ``flipped`` (0/1 mask or the flipped rows),
            ``num_noisy`` (examples in the noisy-label ranking; 0: none),
            ``noisy_dataset`` (the training set ``self_influence`` ranks, e.g.
            the one with flipped labels; default ``train_dataset``), ``notes``.

    Returns:
        The path written.
    """
    page = render_report(topk, train_dataset, test_dataset, **options)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
