"""The ``dattri`` command: ``bench``, ``retrain`` and ``list``; and the old retrain scripts.

Quick default (MNIST-10 LR, IF-Explicit / Grad-Dot / TRAK-10 / RPS-L2, LDS and
AUC, a subset of the search space; it trains its 170 small models on first use;
the README gives its measured time with the machine's matmul rate)::

    dattri bench

The paper's full reproduction (every setting, method and metric of Figures 2-4,
the whole Appendix C.1 search space; GPU-days at full size)::

    dattri bench --preset paper --device cuda

The same at CPU size: ``dattri bench --preset paper --reduced``. Results are
resumable: rerun the same command to continue. ``dattri retrain`` fills the
benchmark cache (or writes a plain retrain folder) on any executor;
``dattri list`` shows the settings and methods. The console scripts
``dattri_retrain`` and ``dattri_retrain_nanogpt`` keep the published arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "retrain_main", "retrain_nanogpt_main"]

_PRESETS = {
    "quick": {"settings": ["mnist_lr"], "methods": ["IF-Explicit", "Grad-Dot", "TRAK-10", "RPS-L2"],
              "metrics": ["lds", "auc"], "search": "quick"},
    "paper": {"settings": ["all"], "methods": ["paper"], "metrics": ["loo", "lds", "auc"],
              "search": "paper"},
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        msg = f"expected KEY=VALUE, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _executor(args: argparse.Namespace) -> Any:
    if not getattr(args, "dask", None):
        return None
    try:
        from distributed import Client
    except ImportError:
        sys.exit("--dask needs the distributed package: pip install dattri[dask]")
    return Client(args.dask).get_executor()


# ----------------------------------------------------------------------------- parsers
def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("full", "reduced", "tiny"), default=None,
                   help="full = the paper's sizes (default); reduced = CPU-sized (not "
                        "comparable with the paper); tiny = test size (MNIST only)")
    p.add_argument("--reduced", action="store_true", help="shorthand for --size reduced")
    p.add_argument("--cache-dir", default=None,
                   help="benchmark cache (default $DATTRI_CACHE or ~/.cache/dattri)")
    p.add_argument("--data-path", action="append", type=_key_value, default=[],
                   metavar="SETTING=PATH", help="original data set of a setting on disk "
                   "(default: the offline source); repeatable")
    p.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    p.add_argument("--loo-size", type=int, default=None,
                   help="training points left out for LOO (default: the size's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="retraining processes (0: in this process; default 0)")
    p.add_argument("--dask", default=None, metavar="ADDRESS",
                   help="retrain on a Dask cluster (scheduler address)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _parser() -> argparse.ArgumentParser:
    from dattri.benchmark.load import METRICS

    top = argparse.ArgumentParser(
        prog="dattri", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="dattri benchmark suite (paper Sec. 4): run methods on settings, build "
        "ground truth, list what exists.",
        epilog="examples:\n"
        "  dattri bench                          quick default (MNIST-10 LR, 4 methods; trains\n"
        "                                        170 small models first, then cached)\n"
        "  dattri bench --preset paper           full reproduction of Figures 2-4\n"
        "  dattri bench --preset paper --reduced the same at CPU size\n"
        "  dattri retrain --setting mnist_mlp    train checkpoints + ground truth into the cache\n"
        "  dattri attribute task.py --top-k 10   a module's attributor (torchrun: sharded)\n"
        "  dattri list                           settings and methods")
    sub = top.add_subparsers(dest="command", metavar="{bench,retrain,report,attribute,list}")
    b = sub.add_parser("bench", help="run methods x settings x metrics and report the best "
                       "value over each method's search space",
                       description="Run the benchmark. Options override the preset.")
    b.add_argument("--preset", choices=sorted(_PRESETS), default="quick",
                   help="quick (default): mnist_lr, IF-Explicit/Grad-Dot/TRAK-10/RPS-L2, LDS+AUC, "
                        "search quick; paper: every setting, the paper's eleven methods, "
                        "every metric, search paper")
    b.add_argument("--settings", type=_csv, default=None, help="comma-separated, or all")
    b.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated names, or a group: all (every method), paper (the "
                        "paper's eleven), new (the methods beyond the paper)")
    b.add_argument("--metrics", type=_csv, default=None,
                   help=f"comma-separated subset of {','.join(METRICS)}")
    b.add_argument("--search", choices=("paper", "quick"), default=None,
                   help="paper: Appendix C.1's grid; quick: a subset of it")
    b.add_argument("--out", default="dattri_bench", help="output folder (default ./dattri_bench)")
    b.add_argument("--force", action="store_true",
                   help="run methods beyond their feasibility limit (memory/time)")
    b.add_argument("--retry-failed", action="store_true", help="recompute failed results")
    b.add_argument("--no-plot", action="store_true", help="do not write PNG figures")
    _add_common(b)
    r = sub.add_parser("retrain", help="train the checkpoints and ground truth of a setting",
                       description="Fill the load_benchmark cache of a setting (default), or "
                       "write a plain retrain folder with --save-path.")
    r.add_argument("--setting", required=True, help="setting name (see `dattri list`)")
    r.add_argument("--metric", default="all", help="lds, loo, auc or all (default: the setting's)")
    r.add_argument("--save-path", default=None, help="plain retrain folder instead of the cache")
    r.add_argument("--mode", choices=("lds", "loo"), default="lds", help="with --save-path")
    r.add_argument("--num-subsets", type=int, default=100, help="LDS subsets (--save-path)")
    r.add_argument("--start-id", type=int, default=0, help="first LDS subset (--save-path)")
    r.add_argument("--subset-ratio", type=float, default=0.5, help="LDS subset ratio")
    r.add_argument("--no-vectorized", action="store_true",
                   help="train one model at a time even where the vmapped trainer applies")
    _add_common(r)
    from dattri.report.bench import add_report_arguments

    rep = sub.add_parser("report", help="write an HTML page of test examples' proponents and "
                         "opponents", description="Write a self-contained HTML report of a setting.")
    add_report_arguments(rep)
    _add_common(rep)
    from dattri.benchmark.attribute_cli import add_parser as add_attribute_parser

    add_attribute_parser(sub)
    sub.add_parser("list", help="list the settings and the methods")
    return top


# ----------------------------------------------------------------------------- commands
def _size(args: argparse.Namespace) -> str:
    return "reduced" if args.reduced else (args.size or "full")


def _data_paths(args: argparse.Namespace) -> dict[str, str]:
    from dattri.benchmark.settings import get_setting

    return {get_setting(k).name: v for k, v in args.data_path}


def _cmd_list() -> int:
    from dattri.benchmark.methods import METHODS, hyper_slug
    from dattri.benchmark.settings import SETTINGS

    print("Settings (paper Table 3; sizes n_train/n_test):")
    for s in SETTINGS.values():
        sizes = ", ".join(f"{k} {v.n_train or 'all'}/{v.n_test}" for k, v in s.sizes.items())
        print(f"  {s.name:26s} metrics {','.join(s.metrics):12s} {sizes}")
        print(f"  {'':26s} {s.description}")
    print("\nMethods (search space of Appendix C.1; budget: planned seconds of one whole "
          "search per MNIST setting and metric at the paper's size, 2-core CPU):")
    for group, title in (("paper", "the paper's eleven (--methods paper)"),
                         ("new", "beyond the paper (--methods new; --methods all: both)")):
        print(f"  {title}:")
        for m in METHODS.values():
            if m.group != group:
                continue
            space = "; ".join(hyper_slug(h) for h in m.search_space)
            budget = f"{m.budget_s:.0f}s" if m.budget_s is not None else "-"
            print(f"    {m.name:15s} {m.family:7s} budget {budget:5s} {space}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from dattri.benchmark.methods import resolve_methods
    from dattri.benchmark.plot import format_table, plot_results
    from dattri.benchmark.run import BenchConfig, _check_config, run_bench
    from dattri.benchmark.settings import SETTINGS

    preset = _PRESETS[args.preset]
    settings = args.settings or preset["settings"]
    methods = args.methods or preset["methods"]
    settings = list(SETTINGS) if settings == ["all"] else settings
    methods = resolve_methods(methods)
    cfg = BenchConfig(
        settings=settings, methods=methods, metrics=args.metrics or preset["metrics"],
        out_dir=args.out, size=_size(args), search=args.search or preset["search"],
        cache_dir=args.cache_dir, data_paths=_data_paths(args), device=args.device,
        seed=args.seed, loo_size=args.loo_size, force=args.force,
        retry_failed=args.retry_failed, num_workers=args.num_workers,
        executor=_executor(args), progress=False if args.no_progress else None)
    _check_config(cfg)  # an argument error comes before the banner
    print(f"dattri bench: settings={','.join(cfg.settings)} methods={','.join(cfg.methods)} "
          f"metrics={','.join(cfg.metrics)} size={cfg.size} search={cfg.search} -> {cfg.out_dir}",
          flush=True)
    if cfg.size != "full":
        print(f"NOTE: size {cfg.size!r}: values are not comparable with the paper's.", flush=True)
    summary = run_bench(cfg)
    print()
    print(format_table(summary["rows"]))
    if summary["skipped_metrics"]:
        print(f"\nNot part of the setting (paper Table 3): {', '.join(summary['skipped_metrics'])}")
    machine = summary["machine"]
    print(f"\n{summary['computed']} result(s) computed, {summary['skipped']} loaded from earlier "
          f"runs (a result: one method x search configuration x metric; the table shows each "
          f"method's best, {len(summary['rows'])} row(s)); {summary['seconds']:.1f}s; machine "
          f"float32 matmul {machine['matmul_gflops']} GFLOP/s ({machine['threads']} threads)")
    out = Path(cfg.out_dir)
    print(f"JSON: {out / 'summary.json'} and {out / 'results'}/")
    if not args.no_plot:
        figs = plot_results(summary["rows"], out / "figures")
        if figs:
            print("Figures: " + ", ".join(str(f) for f in figs))
        else:
            print("Figures: none (matplotlib not installed: pip install dattri[plot])")
    for page in summary.get("reports", []):
        print(f"Report: {page}")
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from dattri.benchmark.load import load_benchmark, prepare_setting
    from dattri.benchmark.settings import get_setting

    rec = get_setting(args.setting)
    progress = False if args.no_progress else None
    executor = _executor(args)
    paths = _data_paths(args)
    if args.save_path is not None:
        from dattri.model_util.retrain import retrain_lds, retrain_loo

        prep = prepare_setting(rec, _size(args), paths.get(rec.name), args.seed, args.cache_dir)
        common = {"dataloader": prep.train_loader(), "path": args.save_path, "seed": args.seed,
                  "executor": executor, "num_workers": args.num_workers, "progress": progress,
                  "device": args.device}
        if args.mode == "lds":
            retrain_lds(prep.train_callable(), num_subsets=args.num_subsets,
                        start_id=args.start_id, subset_ratio=args.subset_ratio, **common)
        else:
            from dattri.benchmark.load import loo_positions

            k = prep.n_train if args.loo_size is None else args.loo_size
            retrain_loo(prep.train_callable(), indices=loo_positions(prep.n_train, k, args.seed),
                        **common)
        print(f"retrain folder: {args.save_path}")
        return 0
    metrics = rec.metrics if args.metric == "all" else _csv(args.metric)
    for metric in metrics:
        t = time.perf_counter()
        md, gt = load_benchmark(
            rec.model, rec.dataset, metric, cache_dir=args.cache_dir, size=_size(args),
            data_path=paths.get(rec.name), seed=args.seed, loo_size=args.loo_size,
            device=args.device, executor=executor, num_workers=args.num_workers,
            vectorized=not args.no_vectorized, progress=progress)
        print(f"{rec.name} {metric}: {md['cache']['trained_models']} model(s) trained, ground "
              f"truth {tuple(gt[0].shape)} in {time.perf_counter() - t:.1f}s -> {md['cache']['root']}")
        for note in md["notes"]:
            print(f"  note: {note}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dattri`` command."""
    from dattri.errors import DattriError

    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if getattr(args, "cache_dir", None) is not None:  # one line, before any work
            from dattri.model_util._retrain_store import check_writable_folder

            check_writable_folder(args.cache_dir, "--cache-dir")
        if args.command == "list":
            return _cmd_list()
        if args.command == "report":
            from dattri.report.bench import report_main
            return report_main(args)
        if args.command == "bench":
            return _cmd_bench(args)
        if args.command == "attribute":
            from dattri.benchmark.attribute_cli import run as run_attribute
            return run_attribute(args)
        return _cmd_retrain(args)
    except DattriError as e:
        print(f"dattri {args.command}: error: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- old scripts
def _partition(text: str) -> list[int | None]:
    parts = [None if x.strip().lower() == "none" else int(x) for x in text.split(",")]
    if len(parts) != 3:
        msg = "--partition should be in the format start,end,total"
        raise argparse.ArgumentTypeError(msg)
    return parts


def _literal(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def retrain_main(argv: Sequence[str] | None = None) -> int:
    """``dattri_retrain``: the published script's arguments, on the retraining engine.

    ``--dataset {mnist,cifar2,cifar10,maestro,shakespeare} --model {lr,mlp,resnet9,
    musictransformer,nanogpt} --mode {lds,loo} --save_path --data_path --seed
    --partition start,end,total --device --extra_param key=value --train_subset``.
    The loader is the first ``train_subset`` examples in order (the engine
    shuffles per model itself), and models go to the engine's retrain folder.
    """
    p = argparse.ArgumentParser(prog="dattri_retrain", description="Retrain models on "
                                "various datasets (LDS subsets or leave-one-out).")
    p.add_argument("--dataset", type=str, help="mnist, cifar2, cifar10, maestro or shakespeare")
    p.add_argument("--model", type=str, help="lr, mlp, resnet9, musictransformer or nanogpt")
    p.add_argument("--train_subset", type=int, default=5000,
                   help="training samples to use (default 5000; -1: all)")
    p.add_argument("--mode", choices=("loo", "lds"), help="the retraining mode")
    p.add_argument("--save_path", default=".", help="where the retrained models go")
    p.add_argument("--data_path", default=None, help="the data set on disk (default: offline)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the retraining")
    p.add_argument("--partition", type=_partition, default=[0, None, None],
                   help="start,end,total: LDS subsets start..end-1 of total, or LOO indices "
                        "range(start, end); default: 100 subsets / every training point")
    p.add_argument("--device", default="cpu", help="the device to train on")
    p.add_argument("--extra_param", type=_key_value, action="append",
                   help="extra key=value parameters of the train function (e.g. epoch_num=5)")
    args = p.parse_args(argv)
    if args.dataset is None or args.model is None or args.mode is None:
        p.print_help()
        return 0
    from torch.utils.data import DataLoader

    from dattri.benchmark.load import prepare_setting
    from dattri.benchmark.settings import get_setting
    from dattri.benchmark.utils import SubsetSampler
    from dattri.errors import DattriError
    from dattri.model_util.retrain import retrain_lds, retrain_loo

    try:
        rec = get_setting(args.model, args.dataset)
        prep = prepare_setting(rec, "full", args.data_path, args.seed)
        n = len(prep.train_dataset) if args.train_subset < 0 else min(args.train_subset,
                                                                       len(prep.train_dataset))
        loader = DataLoader(prep.train_dataset, batch_size=rec.batch_size,
                            sampler=SubsetSampler(range(n)))
        start, end, total = args.partition
        end = (n if args.mode == "loo" else 100) if end is None else end
        total = (n if args.mode == "loo" else 100) if total is None else total
        kwargs = {"device": args.device, **{k: _literal(v) for k, v in (args.extra_param or [])}}
        if args.mode == "lds":
            retrain_lds(prep.train_callable(), loader, args.save_path, num_subsets=end - start,
                        start_id=start, total_num_subsets=total, seed=args.seed, num_workers=0,
                        **kwargs)
        else:
            retrain_loo(prep.train_callable(), loader, args.save_path,
                        indices=list(range(start, end)), seed=args.seed, num_workers=0, **kwargs)
    except DattriError as e:
        print(f"dattri_retrain: error: {e}", file=sys.stderr)
        return 2
    return 0


def retrain_nanogpt_main(argv: Sequence[str] | None = None) -> int:
    """``dattri_retrain_nanogpt``: the published arguments, on the retraining engine.

    ``--save_path --dataset shakespeare_char --data_file --seed --partition start end
    total --subset_ratio --only_download_dataset``; added: ``--size {full,reduced}``
    and ``--device``. Models ``start..end-1`` are trained on seeded subsets of
    ``subset_ratio`` of the training blocks into the engine's retrain folder.
    """
    p = argparse.ArgumentParser(prog="dattri_retrain_nanogpt",
                                description="Retrain nanoGPT on subsets of Shakespeare.")
    p.add_argument("--save_path", default="output_models", help="where the models go")
    p.add_argument("--dataset", default="shakespeare_char",
                   help="shakespeare_char (tinystories is not supported offline)")
    p.add_argument("--data_file", default=None,
                   help="a Tiny Shakespeare input.txt (default: the offline copy)")
    p.add_argument("--seed", type=int, default=42, help="the seed of the retraining")
    p.add_argument("--partition", type=int, nargs=3, default=[0, 5, 5],
                   metavar=("START", "END", "TOTAL"), help="models start..end-1 of total")
    p.add_argument("--subset_ratio", type=float, default=0.5, help="fraction of the data")
    p.add_argument("--only_download_dataset", action="store_true",
                   help="only prepare the data set and say where it comes from")
    p.add_argument("--size", choices=("full", "reduced"), default="full",
                   help="full = the paper's nanoGPT; reduced = a small CPU-sized one")
    p.add_argument("--device", default="cpu", help="the device to train on")
    args = p.parse_args(argv)
    from dattri.benchmark.load import prepare_setting
    from dattri.errors import DattriError
    from dattri.model_util.retrain import retrain_lds

    try:
        if args.dataset not in ("shakespeare_char", "shakespeare"):
            print(f"dattri_retrain_nanogpt: error: dataset {args.dataset!r} is not supported; "
                  "use shakespeare_char", file=sys.stderr)
            return 2
        data = args.data_file if args.data_file and Path(args.data_file).exists() else None
        prep = prepare_setting("shakespeare_nanogpt", args.size, data, args.seed)
        if args.only_download_dataset:
            print(f"dataset ready: {len(prep.train_dataset)} training blocks from "
                  f"{getattr(prep.train_dataset, 'source', '?')}")
            return 0
        start, end, total = args.partition
        end = min(end, total)
        retrain_lds(prep.train_callable(), prep.train_loader(), args.save_path,
                    num_subsets=max(end - start, 1), start_id=start,
                    subset_ratio=args.subset_ratio, seed=args.seed, num_workers=0,
                    device=args.device)
    except DattriError as e:
        print(f"dattri_retrain_nanogpt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
