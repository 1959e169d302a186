"""Tables and bar charts of benchmark results, in the style of the paper's Figures 2-4.

* Figure 2: LOO correlation and LDS on MNIST-10 (LR, MLP);
* Figure 3: LDS on CIFAR-2, MAESTRO and Shakespeare;
* Figure 4: noisy-label AUC on MNIST-10 (LR, MLP) and CIFAR-10.

One panel per (setting, metric), one bar per method in the paper's order; a
method that could not run is a red cross at zero, as in the paper, and one that
does not apply to the setting a grey "n/a". The methods
beyond the paper (``MethodSpec.group == "new"``) come after a gap and a dashed
divider labelled "beyond the paper", drawn lighter and hatched. The figures
need matplotlib (``pip install dattri[plot]``); without it :func:`plot_results`
returns no files and says so. :func:`format_table` needs nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dattri.benchmark.methods import METHODS, PAPER_METHODS

__all__ = ["FIGURES", "PAPER_VALUES", "format_table", "plot_results"]

#: the paper's LDS for MNIST-10 (read off its Figure 2; "~" values there), drawn as
#: black ticks beside our bars and printed in the table's "paper" column
PAPER_VALUES: dict[tuple[str, str], dict[str, float]] = {
    ("mnist_lr", "lds"): {
        "IF-Explicit": 0.80, "IF-CG": 0.80, "IF-LiSSA": 0.80, "IF-Arnoldi": 0.31,
        "TracInCP-10": 0.33, "Grad-Dot": 0.33, "Grad-Cos": 0.19, "RPS-L2": 0.19,
        "TRAK-1": 0.42, "TRAK-10": 0.64, "TRAK-50": 0.68},
    ("mnist_mlp", "lds"): {
        "IF-CG": 0.26, "IF-LiSSA": 0.14, "IF-Arnoldi": 0.09, "TracInCP-10": 0.15,
        "Grad-Dot": 0.10, "Grad-Cos": 0.12, "RPS-L2": 0.09, "TRAK-1": 0.11,
        "TRAK-10": 0.33, "TRAK-50": 0.45},
}

FIGURES: dict[str, tuple[tuple[str, str], ...]] = {
    "figure2_loo_lds_mnist": (("mnist_lr", "loo"), ("mnist_lr", "lds"),
                              ("mnist_mlp", "loo"), ("mnist_mlp", "lds")),
    "figure3_lds_large": (("cifar2_resnet9", "lds"), ("maestro_musictransformer", "lds"),
                          ("shakespeare_nanogpt", "lds")),
    "figure4_auc": (("mnist_lr", "auc"), ("mnist_mlp", "auc"), ("cifar10_resnet9", "auc")),
}
_TITLES = {"mnist_lr": "LR / MNIST-10", "mnist_mlp": "MLP / MNIST-10",
           "cifar2_resnet9": "ResNet-9 / CIFAR-2", "cifar10_resnet9": "ResNet-9 / CIFAR-10",
           "maestro_musictransformer": "MusicTransformer / MAESTRO",
           "shakespeare_nanogpt": "NanoGPT / Shakespeare"}
_METRIC = {"lds": "LDS", "loo": "LOO corr.", "auc": "AUC"}
_COLORS = {"IF": "#4C72B0", "TracIn": "#55A868", "RPS": "#8172B2", "TRAK": "#DD8452",
           "Shapley": "#937860", "DVEmb": "#DA8BC3"}


def _order(method: str) -> int:
    names = list(METHODS)
    return names.index(method) if method in names else len(names)


def _hyper_text(hyper: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hyper.items())) or "-"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A plain-text table: setting, size, metric, method, best value, chosen hyper, time.

    ``paper`` is the paper's value at the paper's size (``PAPER_VALUES``; ``-`` where
    the paper gives none in numbers, e.g. the AUC bars of its Figure 4), blank at
    other sizes. ``search time`` is the method's whole search (every configuration);
    ``peak memory`` the process's largest peak over its configurations.

    Args:
        rows: :func:`dattri.benchmark.run.best_results` rows.

    Returns:
        The table, then the distinct notes (sizes, stand-in data, LOO subsets).
    """
    head = ("setting", "size", "metric", "method", "value", "paper", "best hyper-parameters",
            "search time", "peak memory")
    lines = [head]
    key = lambda r: (r["setting"], r["metric"], _order(r["method"]))
    for r in sorted(rows, key=key):
        if r.get("status") == "ok":
            value = f"{r['value']:.4f}"
            secs = r.get("seconds")
            took = f"{secs:.1f}s" if isinstance(secs, (int, float)) else ""
            if took and r.get("search_size", 1) > 1:
                took += f" ({r['search_size']} configs)"
            if r.get("over_budget"):
                took += f" > budget {r['budget_s']:.0f}s"
            hyper = _hyper_text(r.get("hyperparameters", {}))
        else:
            value, took = str(r.get("status", "?")).upper(), ""
            hyper = str(r.get("reason", ""))[:70]
        paper = PAPER_VALUES.get((r["setting"], r["metric"]), {}).get(r["method"])
        if r["size"] != "full":
            paper = ""
        else:
            paper = "-" if paper is None else f"{paper:.2f}"
        label = _METRIC.get(r["metric"], r["metric"])
        if r["metric"] == "loo" and r.get("loo_points"):  # LOO on a sample: say so
            label += f" ({r['loo_points']} left out)"
        peak = r.get("peak_memory_gib")
        mem = f"{peak:.2f} GiB" if isinstance(peak, (int, float)) else ""
        lines.append((r["setting"], r["size"], label, r["method"], value, paper, hyper, took, mem))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    notes = sorted({n for r in rows for n in r.get("notes", [])})
    if notes:
        out += ["", "Notes:"] + [f"  - {n}" for n in notes]
    return "\n".join(out)


def _is_new(method: str) -> bool:
    return method in METHODS and METHODS[method].group != "paper"


def _positions(names: list[str]) -> list[float]:
    """Bar positions: the paper's methods, a gap of one bar, then the new ones."""
    xs, gap = [], 0.0
    for i, n in enumerate(names):
        if _is_new(n) and i > 0 and not _is_new(names[i - 1]):
            gap = 1.0
        xs.append(i + gap)
    return xs


def _panel(ax: Any, rows: list[dict[str, Any]], setting: str, metric: str) -> None:
    rows = sorted(rows, key=lambda r: _order(r["method"]))
    names = [r["method"] for r in rows]
    values = [r["value"] if r.get("status") == "ok" else 0.0 for r in rows]
    colors = [_COLORS.get(METHODS[n].family if n in METHODS else "", "#777777") for n in names]
    xs = _positions(names)
    new = [_is_new(n) for n in names]
    from matplotlib.colors import to_rgba

    # the methods beyond the paper: lighter, hatched, right of a dashed divider
    for flag in (False, True):
        sel = [i for i, f in enumerate(new) if f == flag]
        if sel:
            ax.bar([xs[i] for i in sel], [values[i] for i in sel],
                   color=[to_rgba(colors[i], 0.5 if flag else 1.0) for i in sel],
                   hatch="///" if flag else None, edgecolor="black" if flag else None,
                   linewidth=0.5 if flag else 0.0)
    if any(new) and not all(new):
        divider = xs[new.index(True)] - 1.0
        ax.axvline(divider, color="gray", linestyle="--", linewidth=0.8)
        ax.text(divider + 0.2, 1.0, "beyond the paper", transform=ax.get_xaxis_transform(),
                ha="left", va="top", fontsize=6, color="gray")
    for x, r in zip(xs, rows):
        if r.get("status") == "ok":
            v = r["value"]
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        elif r.get("status") == "n/a":  # not defined here (no dropout, no self-value)
            ax.text(x, 0.0, "n/a", ha="center", va="bottom", fontsize=6, color="gray",
                    rotation=90)
        else:
            ax.plot([x], [0.0], marker="x", color="red", markersize=10, mew=2.5)
    paper = PAPER_VALUES.get((setting, metric), {}) if rows[0].get("size") == "full" else {}
    marks = [(x, paper[n]) for x, n in zip(xs, names) if n in paper]
    if marks:
        ax.scatter([x for x, _ in marks], [v for _, v in marks], marker="_", s=260,
                   color="black", linewidths=2.0, zorder=3, label="paper")
        ax.legend(fontsize=7, loc="best", frameon=True, framealpha=0.8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    if metric == "auc":
        ax.axhline(0.5, color="gray", linewidth=0.6, linestyle="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    size = rows[0].get("size", "")
    suffix = "" if size == "full" else f" [{size}]"
    ax.set_title(f"{_METRIC.get(metric, metric)}: {_TITLES.get(setting, setting)}{suffix}",
                 fontsize=9)
    finite = [v for v in values if math.isfinite(v)] + [v for _, v in marks]
    if finite and metric != "auc":
        low, high = min(0.0, *finite), max(0.0, *finite)
        pad = 0.15 * (high - low or 1.0)
        ax.set_ylim(low - pad, high + pad)
    elif metric == "auc":
        ax.set_ylim(0.0, 1.05)


def plot_results(rows: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Write the PNG figures whose panels have results; return their paths.

    Args:
        rows: :func:`dattri.benchmark.run.best_results` rows.
        out_dir: folder for ``figure2_*.png``, ``figure3_*.png``, ``figure4_*.png``.

    Returns:
        The written files (empty when matplotlib is missing or nothing fits).
    """
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fig_name, panels in FIGURES.items():
        present = []
        for setting, metric in panels:
            sel = [r for r in rows if r["setting"] == setting and r["metric"] == metric]
            if sel:
                present.append((setting, metric, sel))
        if not present:
            continue
        bars = max(len(sel) for _, _, sel in present)
        width = 3.6 + 0.22 * max(0, bars - len(PAPER_METHODS))
        fig, axes = plt.subplots(1, len(present), figsize=(width * len(present), 3.4),
                                 squeeze=False)
        for ax, (setting, metric, sel) in zip(axes[0], present):
            _panel(ax, sel, setting, metric)
        fig.tight_layout()
        path = out / f"{fig_name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
