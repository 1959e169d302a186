"""The report of a benchmark setting: ``dattri report`` and the page ``dattri bench`` writes.

:func:`report_setting` loads a setting through :func:`~dattri.benchmark.load.load_benchmark`
(its cached models and ground truth; trained on first use), builds a method at
given hyper-parameters, attributes only the shown test examples (or reads a
precomputed :class:`~dattri.report.topk.TopK`, e.g. merged from a sharded run)
and, for a setting with noisy-label detection, ranks the noisy training set by
the self-influence of a method (the AUC-best one in the bench). It writes the
page of :func:`dattri.report.write_report`.

:func:`write_bench_reports` is what ``dattri bench`` calls at the end of a run:
one page per setting, ``<out>/figures/report_<setting>.html``, for the method
of best LDS (else LOO) at its best hyper-parameters, with the noisy-label
ranking of the method of best AUC, and the values the run measured.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dattri.errors import DattriError, DattriValueError
from dattri.report.page import write_report
from dattri.report.render import default_renderer
from dattri.report.topk import TopK, topk_from_attributor, topk_from_scores

__all__ = ["best_choice", "report_main", "report_setting", "write_bench_reports"]

DEFAULT_METHOD = "Grad-Dot"
_LABELS = {"lds": "LDS", "loo": "LOO", "auc": "AUC"}


def _slug(hyper: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(hyper.items())) or "default"


def best_choice(rows: Sequence[Mapping[str, Any]], setting: str) -> dict[str, Any] | None:
    """What the bench page of ``setting`` shows, from ``run_bench``'s best rows.

    Returns:
        ``{"method", "hyperparameters", "auc_method", "auc_hyperparameters",
        "metrics"}``: the method of best LDS (else LOO; else the AUC-best one)
        and its values, the AUC-best method for the noisy-label ranking; None
        when the setting has no ``ok`` row.
    """
    ok = [r for r in rows if r.get("setting") == setting and r.get("status") == "ok"
          and r.get("value") is not None and math.isfinite(r["value"])]

    def best(metric: str) -> Mapping[str, Any] | None:
        cands = [r for r in ok if r["metric"] == metric]
        return max(cands, key=lambda r: r["value"]) if cands else None

    clean = best("lds") or best("loo")
    auc = best("auc")
    main = clean or auc
    if main is None:
        return None
    metrics = {f"{_LABELS[r['metric']]} ({r['method']}, {_slug(r['hyperparameters'])})": r["value"]
               for r in ok if r["method"] == main["method"]
               and r["hyperparameters"] == main["hyperparameters"] and r["metric"] != "auc"}
    if auc is not None:
        metrics[f"AUC ({auc['method']}, {_slug(auc['hyperparameters'])})"] = auc["value"]
    return {"method": main["method"], "hyperparameters": dict(main["hyperparameters"]),
            "auc_method": None if auc is None else auc["method"],
            "auc_hyperparameters": None if auc is None else dict(auc["hyperparameters"]),
            "metrics": metrics}


def _view(md: Mapping[str, Any], side: str) -> torch.utils.data.Subset:
    """The data set whose item ``i`` is the ``i``-th example of the setting's loader."""
    return torch.utils.data.Subset(md[f"{side}_dataset"], list(md[f"{side}_sampler"]))


def _loader(md: Mapping[str, Any], side: str) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(md[f"{side}_dataset"], sampler=md[f"{side}_sampler"],
                                       batch_size=md["setting"].attr_batch_size)


def _checkpoints(md: Mapping[str, Any], spec: Any) -> list[str]:
    paths = md["models_full" if spec.checkpoints == "full" else "models_half"][: spec.num_models]
    root = Path(md["cache"]["root"])
    return [os.path.relpath(p, root) if str(p).startswith(str(root)) else str(p) for p in paths]


def _positions(n_test: int, num_test: int) -> list[int]:
    if num_test < 1:
        msg = f"num_test: expected a positive number of test examples, got {num_test}."
        raise DattriValueError(msg)
    if num_test >= n_test:
        return list(range(n_test))
    return sorted({round(i * (n_test - 1) / (num_test - 1)) for i in range(num_test)}) if (
        num_test > 1) else [0]


def _build(spec: Any, md: Mapping[str, Any], hyper: Mapping[str, Any], device: str) -> Any:
    from dattri.benchmark.methods import infeasible_reason

    why = infeasible_reason(spec, md)
    if why is not None:
        msg = f"method: {why[1]}; choose another method for the report."
        raise DattriValueError(msg)
    return spec.build(md, dict(hyper), {"device": device})


def _noisy_ranking(spec: Any, hyper: Mapping[str, Any], load: Any, device: str,
                   evaluate: bool, values: dict[str, Any]) -> dict[str, Any]:
    """Self-influence on the noisy-label training set, with the flipped mask."""
    md, gt = load("auc")
    att = _build(spec, md, hyper, device)
    train = _loader(md, "train")
    self_inf = att.cache(train).self_attribute(train).detach().cpu()
    if evaluate:
        from dattri.metric import mislabel_detection_auc

        auc, _ = mislabel_detection_auc(self_inf, gt[0])
        values[f"AUC ({spec.name}, {_slug(hyper)})"] = float(auc)
    return {"self_influence": self_inf, "flipped": gt[0], "noisy_dataset": _view(md, "train"),
            "md": md, "attributor": att}


def report_setting(  # noqa: PLR0913
    setting: str,
    out: str | os.PathLike,
    *,
    size: str = "full",
    method: str | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    auc_method: str | None = None,
    auc_hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    evaluate: bool = False,
    num_test: int = 6,
    k: int = 6,
    num_noisy: int = 12,
    topk: TopK | str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    data_path: str | os.PathLike | None = None,
    seed: int = 0,
    loo_size: int | None = None,
    device: str = "cpu",
    num_workers: int | None = 0,
    executor: Any = None,
    progress: bool | None = False,
) -> Path:
    """Write the proponents / opponents page of one benchmark setting.

    Args:
        setting: a setting name (``dattri list``).
        out: the HTML file to write.
        size: the setting's size (``"full"``, ``"reduced"``, ``"tiny"``).
        method, hyperparameters: the attribution method (default Grad-Dot) and its
            hyper-parameters (default: the first of its quick search space).
        auc_method, auc_hyperparameters: the method whose self-influence ranks the
            noisy-label training set (default: ``method``), for settings with AUC.
        metrics: values to show (e.g. the bench's ``{"LDS (...)": 0.72}``).
        evaluate: also compute the setting's LDS / LOO (attributing every test
            example) and AUC of the methods shown.
        num_test: test examples shown (evenly spaced over the test set).
        k: proponents and opponents per test example.
        num_noisy: examples of the noisy-label ranking (0: none, no self-influence).
        topk: a precomputed ranking (a :class:`TopK` or a file of :meth:`TopK.save`)
            over the setting's training loader order; then nothing is attributed
            for the proponents.
        cache_dir, data_path, seed, loo_size, device, num_workers, executor,
            progress: as for :func:`~dattri.benchmark.load.load_benchmark`.

    Returns:
        The path of the page.
    """
    from dattri.benchmark.load import load_benchmark
    from dattri.benchmark.methods import get_method
    from dattri.benchmark.settings import get_setting

    rec = get_setting(setting)
    spec = get_method(method or DEFAULT_METHOD)
    hyper = dict(spec.quick_space[0] if hyperparameters is None else hyperparameters)
    values: dict[str, Any] = dict(metrics or {})

    def load(metric: str) -> tuple[dict, Any]:
        return load_benchmark(rec.model, rec.dataset, metric, cache_dir=cache_dir, size=size,
                              data_path=data_path, seed=seed, loo_size=loo_size, device=device,
                              executor=executor, num_workers=num_workers, progress=progress)

    a_spec = get_method(auc_method) if auc_method else spec
    a_hyper = dict(auc_hyperparameters if auc_hyperparameters is not None else (
        hyper if a_spec is spec else a_spec.quick_space[0]))
    options: dict[str, Any] = {}
    if "auc" in rec.metrics and num_noisy > 0:
        options = _noisy_ranking(a_spec, a_hyper, load, device, evaluate, values)
    noisy_md, noisy_att = options.pop("md", None), options.pop("attributor", None)
    clean = next((m for m in ("lds", "loo") if m in rec.metrics), None)
    att = None
    if clean is not None:
        md, gt = load(clean)
    else:  # a noisy-label-only setting (CIFAR-10): proponents on the noisy training set
        md, gt = (noisy_md, None) if noisy_md is not None else load("auc")
        att = noisy_att if a_spec is spec and a_hyper == hyper else None
    if topk is None and att is None:
        att = _build(spec, md, hyper, device)
    train_view, test_view = _view(md, "train"), _view(md, "test")
    shown = _positions(len(test_view), num_test)
    if topk is not None:
        top = topk if isinstance(topk, TopK) else TopK.load(topk)
    elif evaluate and clean is not None:
        from dattri.metric import lds, loo_corr

        if not att.is_cached:
            att.cache(_loader(md, "train"))
        score = att.attribute(_loader(md, "train"), _loader(md, "test")).detach().cpu()
        corr, _ = (lds if clean == "lds" else loo_corr)(score, gt)
        values[f"{_LABELS[clean]} ({spec.name}, {_slug(hyper)})"] = float(corr.nanmean())
        top = topk_from_scores(score, k, shown)
    else:
        top, _ = topk_from_attributor(att, _loader(md, "train"), test_view, shown, k,
                                      batch_size=rec.attr_batch_size)
    values = dict(sorted(values.items(), key=lambda kv: "AUC" in kv[0]))  # LDS / LOO first
    notes = list(md.get("notes", []))
    if clean is None:
        notes.append("proponents on the noisy-label training set (the setting has AUC only)")
    return write_report(
        out, top, train_view, test_view, title=f"dattri report: {rec.name} ({size})",
        method=f"{spec.name} ({_slug(hyper)})", checkpoints=_checkpoints(md, spec),
        metrics=values, num_noisy=num_noisy, notes=notes,
        renderer=default_renderer(train_view),
        test_renderer=default_renderer(test_view, last_only=rec.last_token_target), **options)


def write_bench_reports(cfg: Any, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """The page of each setting of a bench run (``<out>/figures/report_<setting>.html``).

    Uses the run's best rows (:func:`best_choice`) and its cached models; a page
    that cannot be made (no matplotlib, a failing method) is skipped with a warning.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("dattri bench: no report pages (matplotlib is not installed: "
                      "pip install dattri[plot])", stacklevel=2)
        return []
    paths = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        choice = best_choice(rows, setting)
        if choice is None:
            continue
        out = Path(cfg.out_dir) / "figures" / f"report_{setting}.html"
        try:
            paths.append(report_setting(
                setting, out, size=cfg.size, method=choice["method"],
                hyperparameters=choice["hyperparameters"], auc_method=choice["auc_method"],
                auc_hyperparameters=choice["auc_hyperparameters"], metrics=choice["metrics"],
                cache_dir=cfg.cache_dir, data_path=cfg.data_paths.get(setting), seed=cfg.seed,
                loo_size=cfg.loo_size, device=cfg.device, num_workers=cfg.num_workers,
                executor=cfg.executor, progress=False))
        except (DattriError, RuntimeError, ValueError, MemoryError) as e:
            warnings.warn(f"dattri bench: the report of {setting} was not written: "
                          f"{type(e).__name__}: {e}", stacklevel=2)
    return paths


# ----------------------------------------------------------------------------- command line
def _hyper_value(text: str) -> tuple[str, Any]:
    if "=" not in text:
        msg = f"expected KEY=VALUE (e.g. regularization=0.01), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    key, raw = (t.strip() for t in text.split("=", 1))
    try:
        return key, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return key, raw


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``dattri report`` (besides the common ones of the CLI)."""
    p.add_argument("--setting", required=True, help="setting name (see `dattri list`)")
    p.add_argument("--method", default=None, help="method (default: the bench's best with "
                   f"--bench-out, else {DEFAULT_METHOD})")
    p.add_argument("--hyper", type=_hyper_value, action="append", default=None,
                   metavar="KEY=VALUE", help="a hyper-parameter of --method; repeatable")
    p.add_argument("--auc-method", default=None,
                   help="method whose self-influence ranks the noisy labels (default: --method)")
    p.add_argument("--bench-out", default=None, metavar="DIR",
                   help="a `dattri bench` output folder: its best method and values")
    p.add_argument("--evaluate", action="store_true",
                   help="also compute LDS/LOO (every test example) and AUC of the methods shown")
    p.add_argument("--topk", default=None, metavar="FILE",
                   help="a precomputed ranking (dattri.report.TopK.save): no attribution")
    p.add_argument("--num-test", type=int, default=6, help="test examples shown (default 6)")
    p.add_argument("-k", type=int, default=6, help="proponents / opponents each (default 6)")
    p.add_argument("--num-noisy", type=int, default=12,
                   help="noisy-label ranking length (0: none; default 12)")
    p.add_argument("--out", default=None, help="the HTML file (default report_<setting>.html)")


def report_main(args: argparse.Namespace) -> int:
    """``dattri report``: write the page and print its path."""
    from dattri.benchmark.settings import get_setting

    size = "reduced" if args.reduced else (args.size or "full")
    name = get_setting(args.setting).name
    choice: dict[str, Any] = {"method": args.method, "metrics": {}, "auc_method": args.auc_method,
                              "hyperparameters": dict(args.hyper) if args.hyper else None,
                              "auc_hyperparameters": None}
    if args.bench_out is not None:
        summary = Path(args.bench_out) / "summary.json"
        if not summary.is_file():
            msg = f"--bench-out: {summary} does not exist; pass the --out folder of `dattri bench`."
            raise DattriValueError(msg)
        rows = [r for r in json.loads(summary.read_text())["rows"] if r.get("size") == size]
        if args.method is None:
            choice.update(best_choice(rows, name) or {})
    paths = dict(args.data_path)
    out = args.out or f"report_{name}.html"
    path = report_setting(
        name, out, size=size, method=choice["method"], hyperparameters=choice["hyperparameters"],
        auc_method=choice["auc_method"], auc_hyperparameters=choice["auc_hyperparameters"],
        metrics=choice["metrics"], evaluate=args.evaluate, num_test=args.num_test, k=args.k,
        num_noisy=args.num_noisy, topk=args.topk, cache_dir=args.cache_dir,
        data_path=paths.get(name) or paths.get(args.setting), seed=args.seed,
        loo_size=args.loo_size, device=args.device, num_workers=args.num_workers,
        progress=False if args.no_progress else None)
    print(f"Report: {path}")
    return 0
