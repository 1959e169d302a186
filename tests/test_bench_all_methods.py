"""Every registered benchmark method: groups, `dattri list`, a tiny `dattri bench` run
(subprocess) writing each method's result files, the DVEmb replay, the figures' groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dattri.benchmark.cli import _PRESETS
from dattri.benchmark.methods import (
    METHODS,
    NEW_METHODS,
    PAPER_METHODS,
    hyper_slug,
    momentum_step_weight,
    resolve_methods,
)
from dattri.benchmark.plot import _positions
from dattri.errors import DattriValueError
from dattri.model_util.vtrain import VectorizedTraining, train_model

PAPER_ELEVEN = ("IF-Explicit", "IF-CG", "IF-LiSSA", "IF-Arnoldi", "TracInCP-10", "Grad-Dot",
                "Grad-Cos", "RPS-L2", "TRAK-1", "TRAK-10", "TRAK-50")
NEW = ("IF-DataInf", "IF-EK-FAC", "LoGra", "FactGraSS", "KNN-Shapley", "DVEmb",
       "TRAK-10-dropout", "TRAK-50-dropout")


def _cli(*args: str) -> subprocess.CompletedProcess:
    # no time limit: a slow but correct run must pass
    return subprocess.run([sys.executable, "-m", "dattri.benchmark.cli", *args], check=False,
                          capture_output=True, text=True, env=dict(os.environ))


def test_groups_and_old_spellings():
    assert PAPER_METHODS == PAPER_ELEVEN and NEW_METHODS == NEW
    assert resolve_methods(["paper"]) == list(PAPER_ELEVEN)
    assert resolve_methods(["all"]) == [*PAPER_ELEVEN, *NEW] == list(METHODS)
    assert resolve_methods(["new"]) == list(NEW)
    # names, aliases and the published spellings, each once, in the given order
    assert resolve_methods(["cg", "TRAK-10", "datainf", "ekfac", "IF-CG", "knn"]) == [
        "IF-CG", "TRAK-10", "IF-DataInf", "IF-EK-FAC", "KNN-Shapley"]
    assert resolve_methods(["paper", "DVEmb"]) == [*PAPER_ELEVEN, "DVEmb"]
    with pytest.raises(DattriValueError, match="unknown method 'EKFAC2'.*group: all, paper, new"):
        resolve_methods(["EKFAC2"])
    assert _PRESETS["paper"]["methods"] == ["paper"]  # the reproduction keeps the eleven
    for name in NEW:
        spec = METHODS[name]
        assert spec.group == "new" and spec.budget_s is not None and spec.budget_s > 0
        # the quick space is a subset of the full grid
        assert all(h in spec.search_space for h in spec.quick_space)


def test_list_prints_every_search_space_and_budget():
    out = _cli("list")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    paper_at, new_at = text.index("the paper's eleven"), text.index("beyond the paper")
    for spec in METHODS.values():
        line = next(x for x in text.splitlines() if x.split()[:1] == [spec.name])
        space = "; ".join(hyper_slug(h) for h in spec.search_space)
        assert line.rstrip().endswith(space), (spec.name, line)
        budget = f"budget {spec.budget_s:.0f}s" if spec.budget_s is not None else "budget -"
        assert budget in line
        at = text.index(line)
        assert (paper_at < at < new_at) if spec.group == "paper" else at > new_at


def _records(out: Path) -> dict[tuple[str, str, str], list[dict]]:
    got: dict[tuple[str, str, str], list[dict]] = {}
    for f in (out / "results").rglob("*.json"):
        rec = json.loads(f.read_text())
        got.setdefault((rec["setting"], rec["metric"], rec["method"]), []).append(rec)
    return got


def _bench(tmp_path: Path, settings: str, methods: str) -> dict:
    out = _cli("bench", "--size", "tiny", "--settings", settings, "--methods", methods,
               "--metrics", "lds,auc", "--search", "quick", "--out", str(tmp_path / "out"),
               "--cache-dir", str(tmp_path / "c"), "--no-plot", "--no-progress")
    assert out.returncode == 0, out.stderr
    return _records(tmp_path / "out")


def test_new_methods_write_their_results_on_tiny_lr(tmp_path):
    """`--methods new` through the command on MNIST LR (tiny, quick search): a result
    file per method and metric; the ones that apply to LR run."""
    recs = _bench(tmp_path, "mnist_lr", "new")
    for metric in ("lds", "auc"):
        for name in ("IF-DataInf", "IF-EK-FAC", "LoGra", "FactGraSS", "DVEmb"):
            rs = recs[("mnist_lr", metric, name)]
            assert len(rs) == len(METHODS[name].quick_space)
            assert all(r["status"] == "ok" and -1 <= r["value"] <= 1 for r in rs), rs
        for name in ("TRAK-10-dropout", "TRAK-50-dropout"):  # LR has no dropout
            (r,) = recs[("mnist_lr", metric, name)]
            assert r["status"] == "n/a" and "needs dropout layers" in r["reason"]
    (knn,) = recs[("mnist_lr", "lds", "KNN-Shapley")]
    assert knn["status"] == "ok" and knn["hyperparameters"] == {"k_neighbors": 10}
    (knn_auc,) = recs[("mnist_lr", "auc", "KNN-Shapley")]
    assert knn_auc["status"] == "n/a" and "no self-value" in knn_auc["reason"]
    # DVEmb's replay of models_full[0]'s training reproduces the model
    for metric in ("lds", "auc"):
        (dv,) = recs[("mnist_lr", metric, "DVEmb")]
        note = next(n for n in dv["notes"] if n.startswith("DVEmb: replayed trajectory of"))
        assert "of 20 SGD steps" in note  # tiny: 200 digits / 64 = 4 steps, 5 epochs
        assert float(note.rsplit(" ", 1)[1]) < 1e-5
    # each configuration's peak memory, measured from a reset before its build
    for (_, _, name), rs in recs.items():
        for r in rs:
            if r["status"] == "ok":
                mem = r["memory_gib"]
                assert mem["peak"] >= mem["before"] > 0.05, (name, mem)
    # the flipped labels stand out for the IF family at this size too
    assert recs[("mnist_lr", "auc", "IF-EK-FAC")][0]["value"] > 0.7


@pytest.mark.slow
def test_paper_methods_write_their_results_on_tiny_lr(tmp_path):
    """`--methods paper`: each of the eleven leaves a result per metric (ok, or the
    red cross where the tiny size lacks the checkpoints / the feasibility limit)."""
    recs = _bench(tmp_path, "mnist_lr", "paper")
    for name in PAPER_ELEVEN:
        for metric in ("lds", "auc"):
            rs = recs[("mnist_lr", metric, name)]
            assert rs and all(r["status"] in ("ok", "infeasible") for r in rs), rs
    assert {n for (_, m, n), rs in recs.items() if rs[0]["status"] == "infeasible"} == {
        "TracInCP-10", "TRAK-10", "TRAK-50"}  # tiny: 2 full-data, 4 ensemble models


@pytest.mark.slow
def test_new_methods_on_tiny_mlp(tmp_path):
    """The MLP (dropout): the dropout ensembles and DVEmb run and write their results."""
    recs = _bench(tmp_path, "mnist_mlp", "new")
    for name in NEW:
        for metric in ("lds", "auc"):
            rs = recs[("mnist_mlp", metric, name)]
            want = "n/a" if (name, metric) == ("KNN-Shapley", "auc") else "ok"
            assert all(r["status"] == want for r in rs), rs
    assert recs[("mnist_mlp", "lds", "TRAK-50-dropout")][0]["projection"]["proj_dim"] == 2048


def test_momentum_weights_reconstruct_the_trajectory():
    """`train_model`'s on_step sees each step's minibatch and the parameters its
    gradient is taken at; with the momentum weights of DVEmb's replay the final
    parameters are theta_0 - sum_t w_t g_t exactly (float64)."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randint(0, 2, (24,))
    lr, mu, epochs, bs = 0.05, 0.9, 3, 10

    def factory():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    steps: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def on_step(epoch, idx, model):
        params = list(model.parameters())
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        g = torch.autograd.grad(loss, params)
        steps.append((epoch, idx.clone(), torch.cat([t.reshape(-1) for t in g]).detach()))

    final = train_model(factory, nn.functional.cross_entropy, x, y, range(24), seed=3,
                        epochs=epochs, lr=lr, momentum=mu, batch_size=bs, on_step=on_step)
    torch.manual_seed(3)
    theta0 = torch.cat([p.reshape(-1) for p in factory().parameters()]).detach()
    theta_t = torch.cat([final[k].reshape(-1) for k in ("0.weight", "0.bias", "2.weight",
                                                        "2.bias")])
    total = len(steps)
    vt = VectorizedTraining(model_factory=factory, loss_fn=nn.functional.cross_entropy,
                            epochs=epochs, batch_size=bs)
    assert total == vt.num_steps(24) == epochs * 3 and [e for e, _, _ in steps] == [0] * 3 + [1] * 3 + [2] * 3
    for e in range(epochs):  # every epoch visits every example once
        seen = torch.cat([i for ep, i, _ in steps if ep == e])
        assert sorted(seen.tolist()) == list(range(24))
    recon = theta0 - sum(momentum_step_weight(lr, mu, total - t) * g
                         for t, (_, _, g) in enumerate(steps))
    torch.testing.assert_close(recon, theta_t, rtol=0, atol=1e-12)
    assert momentum_step_weight(lr, 0.0, 5) == lr
    assert abs(momentum_step_weight(lr, mu, 10_000) - lr / (1 - mu)) < 1e-12


def test_figures_put_the_new_methods_apart():
    names = ["IF-CG", "TRAK-50", "IF-EK-FAC", "DVEmb"]
    assert _positions(names) == [0, 1, 3, 4]  # one empty slot before the new group
    assert _positions(["IF-CG", "TRAK-50"]) == [0, 1]
    assert _positions(["LoGra", "DVEmb"]) == [0, 1]


def _tiny_lr() -> nn.Module:
    return nn.Linear(3, 2)


def test_vectorized_retraining_splits_models_into_equal_chunks(tmp_path, monkeypatch):
    """9 models at chunk_size 4 train as 3 + 3 + 3 (not 4 + 4 + 1), and the models are
    those of one chunk per model (vmapped results do not depend on the chunking)."""
    from torch.utils.data import DataLoader, TensorDataset

    from dattri.model_util import _retrain_runner
    from dattri.model_util.retrain import retrain_lds
    from dattri.model_util.vtrain import VectorizedTraining

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    sizes: list[int] = []
    original = _retrain_runner.run_task

    def spy(root, spec, task):
        sizes.append(len(task))
        return original(root, spec, task)

    monkeypatch.setattr(_retrain_runner, "run_task", spy)
    states = {}
    for chunk in (4, 1):
        vt = VectorizedTraining(model_factory=_tiny_lr, loss_fn=nn.functional.cross_entropy,
                                epochs=2, batch_size=5, chunk_size=chunk)
        sizes.clear()
        meta = retrain_lds(dataloader=DataLoader(data, batch_size=5), path=tmp_path / str(chunk),
                           num_subsets=9, seed=0, vectorized=vt, progress=False)
        states[chunk] = [torch.load(tmp_path / str(chunk) / m["file"], weights_only=True)
                         if m["file"].endswith(".pt") else _safetensors(tmp_path / str(chunk)
                                                                         / m["file"])
                         for m in meta["models"]]
        assert sizes == ([3, 3, 3] if chunk == 4 else [1] * 9)
    for a, b in zip(states[4], states[1]):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def _safetensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_dvemb_replay_gap_above_the_bound_is_noted_and_warned(tmp_path, monkeypatch):
    """A replay that ends away from models_full[0] (here: the bound lowered to 0, so
    any rounding difference counts) says so in the result and as a warning."""
    from dattri.benchmark import cli
    from dattri.benchmark import methods as bench_methods

    monkeypatch.setattr(bench_methods, "REPLAY_RELATIVE_GAP_WARN", 0.0)
    with pytest.warns(RuntimeWarning, match="the replay ended") as caught:
        rc = cli.main(["bench", "--size", "tiny", "--settings", "mnist_lr", "--methods",
                       "DVEmb", "--metrics", "lds", "--search", "quick", "--out",
                       str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"),
                       "--no-plot", "--no-progress"])
    assert rc == 0
    # the report (top-k proponents) replays the trajectory before it attributes
    assert not [w for w in caught if "was not written" in str(w.message)]
    assert list((tmp_path / "out").rglob("*.html"))
    (dv,) = _records(tmp_path / "out")[("mnist_lr", "lds", "DVEmb")]
    gap = float(next(n for n in dv["notes"] if n.startswith("DVEmb: replayed")).rsplit(" ", 1)[1])
    (warned,) = [n for n in dv["notes"] if n.startswith("DVEmb: the replay ended")]
    rel = float(warned.split("ended ", 1)[1].split(" ", 1)[0])
    assert 0 < rel <= gap / 1e-3 and rel < 1e-5  # relative to a parameter scale > 1e-3


def test_dvemb_steps_enter_with_the_trainers_plain_learning_rate(tmp_path, monkeypatch):
    """The replay records every SGD step with the trainer's lr (momentum not folded
    in: folded weights up to lr / (1 - mu) made DVEmb's propagation overshoot, AUC at
    chance on MNIST LR at the paper's size)."""
    from dattri.algorithm.dvemb import DVEmbAttributor
    from dattri.benchmark import cli
    from dattri.benchmark.settings import get_setting

    rates: list[float] = []
    orig = DVEmbAttributor.cache_gradients

    def spy(self, epoch, batch, indices, learning_rate):
        rates.append(learning_rate)
        return orig(self, epoch, batch, indices, learning_rate)

    monkeypatch.setattr(DVEmbAttributor, "cache_gradients", spy)
    rc = cli.main(["bench", "--size", "tiny", "--settings", "mnist_lr", "--methods", "DVEmb",
                   "--metrics", "lds", "--search", "quick", "--out", str(tmp_path / "out"),
                   "--cache-dir", str(tmp_path / "c"), "--no-plot", "--no-progress"])
    assert rc == 0
    rec = get_setting("mnist_lr")
    vt = rec.vectorized(rec.size("tiny") if callable(rec.size) else rec.sizes["tiny"])
    assert vt.momentum > 0 and len(rates) >= 20 and set(rates) == {vt.lr}
