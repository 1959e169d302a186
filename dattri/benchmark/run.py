"""The benchmark runner: methods x settings x metrics, with the paper's hyper-parameter search.

For every setting, the runner loads the benchmark (training and caching it on
first use, :func:`dattri.benchmark.load.load_benchmark`), builds every method at
every hyper-parameter of its search space (:mod:`dattri.benchmark.methods`),
and evaluates:

* LDS and LOO (one score matrix ``(n_train, n_test)`` of ``models_full[0]`` serves
  both): the mean over test points of :func:`dattri.metric.lds` /
  :func:`dattri.metric.loo_corr`;
* AUC: the noisy-label variant; training points ranked by ``self_attribute``
  (high = suspicious), :func:`dattri.metric.mislabel_detection_auc`.

Each (setting, size, metric, method, hyper-parameters) result is one JSON file
``out/results/<setting>/<size>/<metric>/<method>/<hyper>.json``, written
atomically; a rerun skips the ones present with the same fingerprint (data,
sizes, seed and models: the cache key of load_benchmark), and recomputes the
others (``retry_failed`` also recomputes failed ones). The reported value of a method is the best over its search space (as in
Appendix C.1, chosen on the same test points), with the chosen hyper-parameters.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import dattri
from dattri.benchmark.load import METRICS, load_benchmark
from dattri.benchmark.methods import (
    MethodSpec,
    get_method,
    hyper_slug,
    infeasible_reason,
    num_parameters,
    resolve_methods,
    search_space,
)
from dattri.benchmark.settings import get_setting
from dattri.errors import DattriError, DattriValueError, MemoryBudgetError

__all__ = ["BenchConfig", "best_results", "measure_matmul_gflops", "run_bench"]

QUICK_METHODS = ("IF-Explicit", "Grad-Dot", "TRAK-10", "RPS-L2")
_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


@dataclass
class BenchConfig:
    """What to run.

    Attributes:
        settings: setting names (``"mnist_lr"``, ``"cifar2"``, ...).
        methods: method names (``"IF-Explicit"``, ``"TRAK-10"``, ...).
        metrics: subset of ``("lds", "loo", "auc")``; each setting runs the ones
            it has (paper Table 3).
        out_dir: where results, ``summary.json`` and figures go.
        size: ``"full"``, ``"reduced"`` or ``"tiny"``.
        search: ``"paper"`` (Appendix C.1) or ``"quick"`` (a subset).
        cache_dir: the load_benchmark cache (None: default).
        data_paths: setting name -> original data set on disk.
        device: where attribution runs.
        seed: base seed of the benchmark.
        loo_size: left-out training points for LOO (None: the size's).
        force: try methods beyond their feasibility limit.
        retry_failed: recompute results recorded as failed.
        num_workers, executor: retraining parallelism (see load_benchmark).
        progress: ``None`` (default): a bar when stderr is a terminal, and one line
            per finished result (value, elapsed time, estimate of what remains) on
            stdout when stdout or stderr is not a terminal (a file, a pipe, CI);
            ``True``: the bar always; ``False``: neither.
    """

    settings: Sequence[str] = ("mnist_lr",)
    methods: Sequence[str] = QUICK_METHODS
    metrics: Sequence[str] = ("lds", "auc")
    out_dir: str | os.PathLike = "dattri_bench"
    size: str = "full"
    search: str = "paper"
    cache_dir: str | os.PathLike | None = None
    data_paths: dict[str, str] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    loo_size: int | None = None
    force: bool = False
    retry_failed: bool = False
    num_workers: int | None = 0
    executor: Any = None
    progress: bool | None = None


def measure_matmul_gflops(n: int = 1024, repeats: int = 3) -> float:
    """The machine's float32 matmul rate (GFLOP/s), best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def _write_json(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _result_path(cfg: BenchConfig, setting: str, metric: str, method: str, hyper: dict) -> Path:
    return (Path(cfg.out_dir) / "results" / setting / cfg.size / metric / method
            / f"{hyper_slug(hyper)}.json")


def _mean(x: torch.Tensor) -> tuple[float, float, int]:
    ok = x[torch.isfinite(x)].to(torch.float64)
    if ok.numel() == 0:
        return math.nan, math.nan, int(x.numel())
    std = float(ok.std()) if ok.numel() > 1 else 0.0
    return float(ok.mean()), std, int(x.numel() - ok.numel())


def _evaluate(metric: str, att: Any, score: torch.Tensor | None, gt: Any,
              train: Any) -> dict[str, Any]:
    """The metric of one attributor: mean LDS / LOO over test points, or the AUC."""
    from dattri.metric import lds, loo_corr, mislabel_detection_auc

    if metric == "auc":
        auc, _ = mislabel_detection_auc(att.self_attribute(train).detach().cpu(), gt[0])
        return {"value": float(auc)}
    corr, _ = (lds if metric == "lds" else loo_corr)(score, gt)
    mean, std, nan = _mean(corr)
    return {"value": mean, "std_over_test": std, "nan_test_points": nan}


def _base_record(cfg: BenchConfig, md: dict, metric: str, spec: MethodSpec, hyper: dict) -> dict:
    return {
        "setting": md["setting"].name, "size": cfg.size, "metric": metric, "method": spec.name,
        "family": spec.family, "hyperparameters": dict(hyper), "search": cfg.search,
        "n_train": len(md["train_sampler"]), "n_test": len(md["test_sampler"]),
        "num_parameters": num_parameters(md["model"]), "notes": list(md["notes"]),
        "device": cfg.device, "seed": cfg.seed, "dattri_version": dattri.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _reset_peak_memory() -> bool:
    """Reset this process's peak resident memory (Linux: ``clear_refs`` 5); False
    where that is not possible (the peak is then not recorded)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory_gib() -> float | None:
    """The process's peak resident memory since the last reset (``VmHWM``), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 2**20, 3)
    except (OSError, ValueError, IndexError):
        return None
    return None


def _run_hyper(cfg, md, gts, spec, hyper, ctx, todo) -> dict[str, dict]:
    """Compute the results of one (method, hyper) for the metrics in ``todo``."""
    rec = md["setting"]
    train = torch.utils.data.DataLoader(md["train_dataset"], batch_size=rec.attr_batch_size,
                                        sampler=md["train_sampler"])
    test = torch.utils.data.DataLoader(md["test_dataset"], batch_size=rec.attr_batch_size,
                                       sampler=md["test_sampler"])
    out = {m: _base_record(cfg, md, m, spec, hyper) for m in todo}
    # the peak of this configuration alone (the process holds the models and data
    # too: a floor shared by every method of the run, recorded as such)
    peak = _reset_peak_memory()
    floor = _peak_memory_gib() if peak else None
    t0 = time.perf_counter()
    try:
        att = spec.build(md, hyper, ctx)
        proj = getattr(att, "proj_params", None)
        if isinstance(proj, dict):
            for m in todo:
                out[m]["projection"] = dict(proj)
        att.cache(train)
        for m in todo:  # what a method says about its own run (DVEmb's replay)
            out[m]["notes"] += list(getattr(att, "bench_notes", []))
        t1 = time.perf_counter()
        score = None
        if any(m != "auc" for m in todo):
            score = att.attribute(train, test).detach().cpu()
        t2 = time.perf_counter()
        for m in todo:
            t3 = time.perf_counter()
            out[m].update(_evaluate(m, att, score, gts[m], train))
            extra = time.perf_counter() - t3
            attr = extra if m == "auc" else t2 - t1
            out[m].update(status="ok", seconds={"cache": t1 - t0, "attribute": attr,
                                                "total": t1 - t0 + attr})
            if m == "loo":
                out[m]["loo_points"] = len(gts[m][1])
    except (MemoryBudgetError, MemoryError, _OOM) as e:  # the paper's "OOM" red cross
        for m in todo:
            out[m].update(status="infeasible", reason=f"{type(e).__name__}: {e}",
                          seconds={"total": time.perf_counter() - t0})
    except (DattriError, RuntimeError, ValueError) as e:
        for m in todo:
            out[m].update(status="failed", reason=f"{type(e).__name__}: {e}",
                          traceback=traceback.format_exc(limit=3),
                          seconds={"total": time.perf_counter() - t0})
    if peak:
        top = _peak_memory_gib()
        if top is not None and floor is not None:
            # the kernel's resident-set counters are batched per thread: a reading
            # after the reset can fall a few pages below the one taken at the reset,
            # but the peak since the reset is at least what was held then
            top = max(top, floor)
        for m in todo:
            out[m]["memory_gib"] = {"peak": top, "before": floor}
    return out


def _status_record(cfg, md, metric, spec, status, reason) -> dict:
    rec = _base_record(cfg, md, metric, spec, {})
    rec.update(status=status, reason=reason)
    return rec


def _fingerprint(md: dict, metric: str, gt: Any) -> str:
    """What a result depends on besides method and hyper: data, sizes, seed, models."""
    key = md["cache"]["key"]
    return f"{key}/loo{len(gt[1])}" if metric == "loo" else key


def _load_existing(path: Path, fingerprint: str, retry_failed: bool) -> dict | None:
    """A finished result of the same configuration, or None (recompute)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("fingerprint") != fingerprint:
        return None
    return None if retry_failed and rec.get("status") == "failed" else rec


def _clock(seconds: float) -> str:
    """``"42s"``, ``"3m05s"`` or ``"1h02m"``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class _Progress:
    """A tqdm bar on a terminal; one printed line per finished result otherwise.

    ``enabled``: ``False`` prints nothing; ``True`` forces the bar; ``None`` shows
    the bar when stderr is a terminal. Lines go to stdout whenever stdout or stderr
    is not a terminal (output to a file or a pipe, CI), with the elapsed time and
    an estimate of what remains (the mean time of the runs computed so far times
    the runs left).
    """

    def __init__(self, total: int, enabled: bool | None) -> None:
        ttys = sys.stdout.isatty() and sys.stderr.isatty()
        bar = bool(enabled) if enabled is not None else sys.stderr.isatty()
        self.lines = enabled is not False and not ttys
        self.bar = tqdm(total=total, desc="bench", unit="run", disable=not bar)
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.runs, self.run_seconds = 0, 0.0

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def say(self, text: str) -> None:
        if self.lines:
            print(text, flush=True)

    def start(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def finish(self, runs: int, records: Sequence[dict], seconds: float | None,
               loaded: bool = False) -> None:
        """``runs`` search configurations done, with their result records; ``seconds``
        is the compute time (None: nothing computed, not used for the estimate);
        ``loaded``: the records come from an earlier run."""
        self.bar.update(runs)
        self.done += runs
        if seconds is not None:
            self.runs += runs
            self.run_seconds += seconds
        if not self.lines:
            return
        left = self.total - self.done
        eta = (f"ETA ~{_clock(self.run_seconds / self.runs * left)} for {left} more run(s)"
               if self.runs and left else f"{left} run(s) left")
        clock = f"elapsed {_clock(time.perf_counter() - self.t0)}, {eta}"
        for rec in records:
            hyper = hyper_slug(rec.get("hyperparameters") or {})
            head = (f"[{self.done}/{self.total}] {rec['setting']} {rec['metric']} "
                    f"{rec['method']} {hyper}")
            if rec.get("status") == "ok":
                what = f"{rec['value']:.4f} ({rec['seconds']['total']:.1f}s)"
            else:
                what = f"{str(rec.get('status')).upper()}: {str(rec.get('reason', ''))[:80]}"
            print(f"{head}: {what}{' [loaded]' if loaded else ''}; {clock}", flush=True)


def _run_group(cfg, setting, metrics, specs, bar, results, counts) -> None:
    """One setting and one metric group (clean: lds/loo; noisy: auc)."""
    gts, md = {}, None
    for m in metrics:
        t = time.perf_counter()
        bar.say(f"{setting.name} {m}: models and ground truth (trained on first use, then "
                "cached)")
        md, gts[m] = load_benchmark(
            setting.model, setting.dataset, m, cache_dir=cfg.cache_dir, size=cfg.size,
            data_path=cfg.data_paths.get(setting.name), seed=cfg.seed, loo_size=cfg.loo_size,
            device=cfg.device, executor=cfg.executor, num_workers=cfg.num_workers,
            progress=cfg.progress)
        bar.say(f"{setting.name} {m}: ready, {md['cache']['trained_models']} model(s) trained "
                f"in {_clock(time.perf_counter() - t)}")
    prints = {m: _fingerprint(md, m, gts[m]) for m in metrics}
    for spec in specs:
        ctx: dict[str, Any] = {"device": cfg.device}
        why = infeasible_reason(spec, md, metrics)
        if why is not None and not (cfg.force and why[2]):
            status, reason, _ = why
            for m in metrics:
                path = _result_path(cfg, setting.name, m, spec.name, {})
                rec = _load_existing(path, prints[m], False)
                if rec is None:
                    rec = _status_record(cfg, md, m, spec, status, reason)
                    rec["fingerprint"] = prints[m]
                    _write_json(rec, path)
                results.append(rec)
            bar.finish(len(search_space(spec, cfg.search)), results[-len(metrics):], None)
            continue
        for hyper in search_space(spec, cfg.search):
            paths = {m: _result_path(cfg, setting.name, m, spec.name, hyper) for m in metrics}
            have = {m: _load_existing(p, prints[m], cfg.retry_failed) for m, p in paths.items()}
            todo = [m for m in metrics if have[m] is None]
            counts["skipped"] += len(metrics) - len(todo)
            seconds = None
            if todo:
                bar.start(f"{setting.name} {spec.name} {hyper_slug(hyper)}")
                t = time.perf_counter()
                new = _run_hyper(cfg, md, gts, spec, hyper, ctx, todo)
                seconds = time.perf_counter() - t
                for m, rec in new.items():
                    rec["fingerprint"] = prints[m]
                    _write_json(rec, paths[m])
                    have[m] = rec
                counts["computed"] += len(todo)
            results.extend(have[m] for m in metrics)
            bar.finish(1, [have[m] for m in metrics], seconds, loaded=not todo)


def _check_config(cfg: BenchConfig) -> tuple[list, list[MethodSpec], list[str]]:
    settings = [get_setting(s) for s in cfg.settings]
    specs = [get_method(m) for m in resolve_methods(cfg.methods)]
    metrics = [str(m).lower() for m in cfg.metrics]
    bad = [m for m in metrics if m not in METRICS]
    if bad:
        msg = f"metrics: unknown metric(s) {bad}; choose from {list(METRICS)}."
        raise DattriValueError(msg)
    for spec in specs:
        search_space(spec, cfg.search)  # validates cfg.search
    return settings, specs, metrics


def _budget(method: str) -> float | None:
    try:
        return get_method(method).budget_s
    except DattriValueError:  # a result file of a method no longer registered
        return None


def best_results(results: Sequence[dict]) -> list[dict]:
    """One row per (setting, size, metric, method): the best ``ok`` value and its hyper.

    Rows with no ``ok`` result keep the status (``"infeasible"``, ``"failed"``,
    ``"n/a"``) and reason. ``"all"`` lists every hyper-parameter's value.
    ``"seconds"`` is the method's whole search time: the sum over all its search
    configurations (failed ones included) of cache + attribute (or self-influence)
    time; ``"best_seconds"`` is the chosen configuration's alone. At the paper's
    size, a method with a time budget (``MethodSpec.budget_s``) gets ``"budget_s"``
    and ``"over_budget"`` (its whole search took longer). ``"peak_memory_gib"``:
    the largest peak resident memory of the process over the search's
    configurations (each measured from a reset before its build, Linux only).
    """
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["setting"], r["size"], r["metric"], r["method"]), []).append(r)
    rows = []
    for (setting, size, metric, method), rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok" and math.isfinite(r.get("value", math.nan))]
        row = {"setting": setting, "size": size, "metric": metric, "method": method,
               "notes": rs[0].get("notes", []),
               "all": [{"hyperparameters": r.get("hyperparameters", {}), "status": r.get("status"),
                        "value": r.get("value")} for r in rs]}
        if ok:
            best = max(ok, key=lambda r: r["value"])
            spent = [(r.get("seconds") or {}).get("total") for r in rs]
            row.update(status="ok", value=best["value"], hyperparameters=best["hyperparameters"],
                       seconds=sum(t for t in spent if isinstance(t, (int, float))),
                       best_seconds=(best.get("seconds") or {}).get("total"),
                       search_size=len(rs), loo_points=best.get("loo_points"))
            peaks = [(r.get("memory_gib") or {}).get("peak") for r in rs]
            peaks = [p for p in peaks if isinstance(p, (int, float))]
            if peaks:  # the largest over the search's configurations
                row["peak_memory_gib"] = max(peaks)
            budget = _budget(method)
            if budget is not None and size == "full":
                row.update(budget_s=budget, over_budget=row["seconds"] > budget)
        else:
            row.update(status=rs[0].get("status", "failed"), value=None,
                       reason=rs[0].get("reason", ""), hyperparameters={})
        rows.append(row)
    return rows


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; write per-result JSON, ``summary.json``; return the summary.

    Returns:
        ``{"rows": best_results(...), "computed": int, "skipped": int,
        "config": {...}, "machine": {...}, "seconds": float}``.

    Raises:
        DattriValueError: unknown settings, methods, metrics or search mode.
    """
    settings, specs, metrics = _check_config(cfg)
    t0 = time.perf_counter()
    results: list[dict] = []
    counts = {"computed": 0, "skipped": 0}
    plan = []
    for s in settings:
        avail = [m for m in metrics if m in s.metrics]
        plan += [(s, g) for g in ([m for m in avail if m != "auc"], [m for m in avail if m == "auc"]) if g]
    total = sum(len(search_space(sp, cfg.search)) for _ in plan for sp in specs)
    with _Progress(total, cfg.progress) as bar:
        for setting, group in plan:
            _run_group(cfg, setting, group, specs, bar, results, counts)
    summary = {
        "rows": best_results(results), **counts, "seconds": time.perf_counter() - t0,
        "config": {"settings": [s.name for s in settings], "methods": [s.name for s in specs],
                   "metrics": metrics, "size": cfg.size, "search": cfg.search, "seed": cfg.seed,
                   "device": cfg.device, "loo_size": cfg.loo_size},
        "skipped_metrics": sorted({f"{s.name}:{m}" for s in settings for m in metrics
                                   if m not in s.metrics}),
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "matmul_gflops": round(measure_matmul_gflops(), 1)},
    }
    from dattri.report.bench import write_bench_reports  # the proponents / opponents pages

    summary["reports"] = [str(p) for p in write_bench_reports(cfg, summary["rows"])]
    _write_json(summary, Path(cfg.out_dir) / "summary.json")
    return summary
