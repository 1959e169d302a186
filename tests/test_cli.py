"""The ``dattri`` command (subprocess), the old retrain scripts, result tables and figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dattri.benchmark.cli import main, retrain_main, retrain_nanogpt_main
from dattri.benchmark.methods import METHODS
from dattri.benchmark.plot import format_table, plot_results
from dattri.benchmark.run import _load_existing, best_results
from dattri.benchmark.settings import SETTINGS

TINY_BENCH = ["bench", "--size", "tiny", "--settings", "mnist_lr", "--methods",
              "Grad-Dot,Grad-Cos,TRAK-1,TRAK-10", "--metrics", "lds,auc", "--search", "quick",
              "--no-progress", "--no-plot"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # no time limit: a slow but correct run must pass (stdout and stderr are pipes,
    # so the runner prints its one-line-per-result progress)
    return subprocess.run([sys.executable, "-m", "dattri.benchmark.cli", *args],
                          check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_help_and_list():
    top = _cli("--help")
    assert top.returncode == 0
    assert all(word in top.stdout for word in ("bench", "retrain", "list", "--preset paper"))
    bench = _cli("bench", "--help")
    assert bench.returncode == 0 and "--reduced" in bench.stdout and "--search" in bench.stdout
    listing = _cli("list")
    assert listing.returncode == 0
    for name in [*SETTINGS, *METHODS]:
        assert name in listing.stdout
    assert "regularization=1e-05" in listing.stdout


def test_bad_arguments_are_clean_errors_before_the_banner(tmp_path):
    for bad, says in ((["--methods", "Nope"], "unknown method 'Nope'"),
                      (["--metrics", "lds,bogus"], "unknown metric(s) ['bogus']"),
                      (["--settings", "mnist_cnn"], "mnist_cnn")):
        out = _cli("bench", *bad, "--out", str(tmp_path))
        assert out.returncode == 2 and says in out.stderr
        assert "dattri bench: settings=" not in out.stdout  # no banner for a failed start
        assert not (tmp_path / "summary.json").exists()


def test_quick_preset_at_tiny_size_prints_a_line_per_result(tmp_path):
    """The quick default's methods end to end (seconds at the tiny size), output to a pipe."""
    out = _cli("bench", "--size", "tiny", "--metrics", "lds", "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "c"), "--no-plot")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("dattri bench: settings=mnist_lr methods=IF-Explicit,Grad-Dot,"
                               "TRAK-10,RPS-L2 metrics=lds size=tiny search=quick")
    # search quick: IF-Explicit 2, Grad-Dot 1, TRAK-10 1 (infeasible), RPS-L2 2 configs:
    # 6 runs, one line per finished result
    progress = [x for x in lines if x.startswith("[")]
    assert [x.split("]")[0] for x in progress] == [f"[{k}/6" for k in range(1, 7)]
    assert all("elapsed " in x for x in progress)
    assert all("ETA ~" in x for x in progress[:-1]) and "0 run(s) left" in progress[-1]
    assert "mnist_lr lds RPS-L2 l2_strength=0.001_normalize_preactivate=False: " in progress[-1]
    assert "TRAK-10 default: INFEASIBLE" in progress[3] and "[loaded]" not in progress[3]
    assert any(x.startswith("mnist_lr lds: ready, 10 model(s) trained") for x in lines)
    assert "5 result(s) computed, 0 loaded" in out.stdout
    assert "each method's best, 4 row(s)" in out.stdout
    rows = _rows(tmp_path / "out")
    assert rows[("lds", "TRAK-10")]["status"] == "infeasible"
    for name, configs in (("IF-Explicit", 2), ("Grad-Dot", 1), ("RPS-L2", 2)):
        row = rows[("lds", name)]
        assert row["status"] == "ok" and row["search_size"] == configs
        files = sorted((tmp_path / "out" / "results" / "mnist_lr" / "tiny" / "lds"
                        / name).glob("*.json"))
        spent = [json.loads(f.read_text())["seconds"]["total"] for f in files]
        assert len(spent) == configs
        assert math.isclose(row["seconds"], sum(spent), rel_tol=1e-12)  # the whole search
        assert row["best_seconds"] in spent


def _rows(out: Path) -> dict[tuple[str, str], dict]:
    summary = json.loads((out / "summary.json").read_text())
    return {(r["metric"], r["method"]): r for r in summary["rows"]}


def test_tiny_bench_writes_json_and_resumes(tmp_path, capsys):
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = [*TINY_BENCH, "--out", str(out), "--cache-dir", str(cache)]
    first = _cli(*args)  # through a subprocess, as a user runs it
    assert first.returncode == 0, first.stderr
    assert "6 result(s) computed, 0 loaded" in first.stdout
    assert "LDS" in first.stdout and "AUC" in first.stdout and "tiny" in first.stdout
    rows = _rows(out)
    methods = ("Grad-Dot", "Grad-Cos", "TRAK-1", "TRAK-10")
    assert set(rows) == {(m, n) for m in ("lds", "auc") for n in methods}
    for (metric, method), row in rows.items():
        if method == "TRAK-10":  # tiny has 4 ensemble models: recorded as infeasible
            assert row["status"] == "infeasible" and "needs 10" in row["reason"]
            continue
        assert row["status"] == "ok" and math.isfinite(row["value"])
        if metric == "auc":
            assert 0.0 <= row["value"] <= 1.0
        else:
            assert -1.0 <= row["value"] <= 1.0
    assert rows[("auc", "TRAK-1")]["hyperparameters"] == {"proj_dim": 512}
    assert rows[("auc", "Grad-Dot")]["value"] > 0.7  # flipped labels have large self-influence
    files = sorted((out / "results").rglob("*.json"))
    assert len(files) == 8
    record = json.loads((out / "results" / "mnist_lr" / "tiny" / "lds" / "TRAK-1"
                         / "proj_dim=512.json").read_text())
    assert {"setting", "metric", "method", "hyperparameters", "value", "seconds"} <= set(record)
    stamps = [f.stat().st_mtime_ns for f in files]
    # resume: everything is loaded, nothing rewritten; progress on (captured: lines)
    assert main([a for a in args if a != "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "0 result(s) computed, 6 loaded" in again
    assert "mnist_lr lds Grad-Dot default: 0." in again and "[loaded]" in again  # lines mode
    assert [f.stat().st_mtime_ns for f in files] == stamps
    (out / "results" / "mnist_lr" / "tiny" / "lds" / "Grad-Cos" / "default.json").unlink()
    assert main(args) == 0
    assert "1 result(s) computed, 5 loaded" in capsys.readouterr().out


def test_retrain_command_fills_the_cache(tmp_path, capsys):
    assert main(["retrain", "--setting", "mnist_lr", "--size", "tiny", "--metric", "auc",
                 "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    assert "mnist_lr auc: 6 model(s) trained" in capsys.readouterr().out
    assert main(["retrain", "--setting", "mnist_lr", "--size", "tiny", "--metric", "auc",
                 "--cache-dir", str(tmp_path), "--no-progress"]) == 0
    assert "mnist_lr auc: 0 model(s) trained" in capsys.readouterr().out


def test_old_retrain_scripts(tmp_path, capsys):
    assert retrain_main([]) == 0 and "--partition" in capsys.readouterr().out
    save = tmp_path / "lds"
    assert retrain_main(["--dataset", "mnist", "--model", "lr", "--mode", "lds", "--save_path",
                         str(save), "--partition", "0,2,2", "--train_subset", "64",
                         "--extra_param", "epoch_num=1"]) == 0
    meta = json.loads((save / "metadata.json").read_text())
    assert meta["data_length"] == 64 and len(meta["models"]) == 2
    assert meta["train_settings"]["kwargs"]["epoch_num"] == 1
    assert all((save / m["file"]).is_file() for m in meta["models"])
    assert retrain_main(["--dataset", "imagenet", "--model", "lr", "--mode", "lds"]) == 2
    assert retrain_nanogpt_main(["--only_download_dataset", "--size", "reduced"]) == 0
    assert "dataset ready: 200 training blocks" in capsys.readouterr().out


def _result(method, metric, value, hyper, status="ok"):
    return {"setting": "mnist_lr", "size": "full", "metric": metric, "method": method,
            "hyperparameters": hyper, "value": value, "status": status, "notes": ["n1"],
            "seconds": {"total": 1.0}, "reason": "too big" if status != "ok" else ""}


def test_best_results_table_and_figures(tmp_path):
    results = [
        _result("IF-Explicit", "lds", 0.2, {"regularization": 0.1}),
        _result("IF-Explicit", "lds", 0.4, {"regularization": 0.01}),
        _result("IF-Explicit", "lds", math.nan, {"regularization": 1e-5}),
        _result("TRAK-50", "lds", None, {}, status="infeasible"),
        _result("Grad-Dot", "auc", 0.9, {}),
    ]
    rows = {(r["metric"], r["method"]): r for r in best_results(results)}
    assert rows[("lds", "IF-Explicit")]["value"] == 0.4
    assert rows[("lds", "IF-Explicit")]["hyperparameters"] == {"regularization": 0.01}
    assert len(rows[("lds", "IF-Explicit")]["all"]) == 3
    # time: the whole search (three configurations of 1 s), not the winner's 1 s
    assert rows[("lds", "IF-Explicit")]["seconds"] == 3.0
    assert rows[("lds", "IF-Explicit")]["best_seconds"] == 1.0
    assert rows[("lds", "TRAK-50")]["status"] == "infeasible"
    table = format_table(list(rows.values()))
    assert "0.4000" in table and "regularization=0.01" in table and "INFEASIBLE" in table
    assert "n1" in table
    # the paper's value sits beside ours at the paper's size only
    line = next(x for x in table.splitlines() if "IF-Explicit" in x)
    assert "0.80" in line and "3.0s (3 configs)" in line
    # the paper gives no AUC numbers (Figure 4 is bars): "-", not a blank
    auc = next(x for x in table.splitlines() if "Grad-Dot" in x).split()
    assert auc[4:6] == ["0.9000", "-"]
    reduced = format_table([{**rows[("lds", "IF-Explicit")], "size": "reduced"}])
    assert "0.80" not in reduced
    pytest.importorskip("matplotlib")
    files = plot_results(list(rows.values()), tmp_path)
    assert sorted(f.name for f in files) == ["figure2_loo_lds_mnist.png", "figure4_auc.png"]
    assert all(f.stat().st_size > 1000 for f in files)


@pytest.mark.slow
def test_quick_default_end_to_end(tmp_path):
    out = _cli("bench", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
               "--no-progress")
    assert out.returncode == 0, out.stderr
    print(out.stdout)  # the table (pytest -s shows it)
    rows = _rows(tmp_path / "out")
    assert set(rows) == {(m, n) for m in ("lds", "auc")
                         for n in ("IF-Explicit", "Grad-Dot", "TRAK-10", "RPS-L2")}
    assert all(r["status"] == "ok" for r in rows.values())
    assert all(rows[("auc", n)]["value"] > 0.5 for n in ("IF-Explicit", "Grad-Dot", "TRAK-10"))
    assert all(rows[("lds", n)]["value"] > 0.0 for n in ("IF-Explicit", "TRAK-10"))
    assert (tmp_path / "out" / "figures" / "figure4_auc.png").is_file()


def test_results_are_reused_only_for_the_same_configuration(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"fingerprint": "mnist_lr/full-a", "status": "failed"}))
    assert _load_existing(path, "mnist_lr/full-a", retry_failed=False)["status"] == "failed"
    assert _load_existing(path, "mnist_lr/full-a", retry_failed=True) is None
    assert _load_existing(path, "mnist_lr/full-b", retry_failed=False) is None  # other seed/size
    path.write_text("{not json")
    assert _load_existing(path, "mnist_lr/full-a", retry_failed=False) is None
