"""How far the MNIST-10 LR is trained moves every method's LDS (explains gaps to the paper).

The paper (Appendix C) trains the LR with SGD, learning rate 0.01, momentum 0.9,
batch 64, 20 epochs; the published benchmark code trains it without momentum. The
two recipes give differently converged models (weight norm 6.6 vs 3.2), and the
LDS of identity-Hessian methods (Grad-Dot, Grad-Cos, RPS) and of the influence
function move in opposite directions between them.

For each recipe this script trains, on the benchmark's MNIST-10 LR setting
(5,000 train / 500 test, ``load_benchmark``'s data and LDS subsets), one full-data
model and 50 half-data models (the LDS ground truth, same subsets as the
benchmark, seeds 100..149), then computes the LDS of Grad-Dot, Grad-Cos,
IF-Explicit (two regularisations) and RPS-L2 (two strengths). One JSON object per
line (stdout and ``--out``). Usage::

    python benchmarks/lr_training_regime.py [--cache-dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def run(cache_dir: str | None, momentum: float, num_models: int) -> dict:
    from dattri.algorithm import IFAttributorExplicit, RPSAttributor, TracInAttributor
    from dattri.benchmark.load import load_benchmark
    from dattri.benchmark.settings import _lr_model
    from dattri.metric import lds
    from dattri.model_util.vtrain import train_models_vectorized
    from dattri.task import AttributionTask

    md, gt = load_benchmark("lr", "mnist", "lds", cache_dir=cache_dir, progress=False)
    tr = DataLoader(md["train_dataset"], batch_size=500, sampler=md["train_sampler"])
    te = DataLoader(md["test_dataset"], batch_size=500, sampler=md["test_sampler"])
    x, y = map(torch.cat, zip(*list(tr)))
    xt, yt = map(torch.cat, zip(*list(te)))
    subsets = gt[1][:num_models]
    t0 = time.perf_counter()
    kw = {"epochs": 20, "lr": 0.01, "momentum": momentum, "batch_size": 64}
    full = train_models_vectorized(_lr_model, F.cross_entropy, x, y, [list(range(len(y)))], [0], **kw)[0]
    half = train_models_vectorized(_lr_model, F.cross_entropy, x, y, [s.tolist() for s in subsets],
                                   list(range(100, 100 + len(subsets))), chunk_size=64, **kw)
    model = _lr_model()
    values = []
    for sd in half:  # LDS ground truth: the negated test losses (dattri.metric.lds)
        model.load_state_dict(sd)
        with torch.no_grad():
            values.append(-F.cross_entropy(model(xt), yt, reduction="none"))
    truth = (torch.stack(values), subsets)
    model.load_state_dict(full)
    train_seconds = time.perf_counter() - t0

    def task(loss=md["loss_func"]) -> AttributionTask:
        return AttributionTask(loss_func=loss, model=model, checkpoints=full)

    def rps(l2: float) -> RPSAttributor:
        t = AttributionTask(loss_func=F.cross_entropy, model=model, checkpoints=full)
        return RPSAttributor(t, md["final_linear_layer_name"], l2_strength=l2,
                             normalize_preactivate=False)

    methods = {
        "Grad-Dot": lambda: TracInAttributor(task(), [1.0], False),
        "Grad-Cos": lambda: TracInAttributor(task(), [1.0], True),
        "IF-Explicit reg=1e-2": lambda: IFAttributorExplicit(task(), regularization=1e-2),
        "IF-Explicit reg=1e-3": lambda: IFAttributorExplicit(task(), regularization=1e-3),
        "RPS-L2 l2=1e-2": lambda: rps(1e-2),
        "RPS-L2 l2=1e-3": lambda: rps(1e-3),
    }
    out = {"momentum": momentum, "lds_models": len(half), "train_seconds": round(train_seconds, 1),
           "weight_norm": round(float(full["linear.weight"].norm()), 3)}
    with torch.no_grad():
        out["test_accuracy"] = round(float((model(xt).argmax(1) == yt).float().mean()), 4)
    for name, make in methods.items():
        corr, _ = lds(make().attribute(tr, te), truth)
        out[f"lds {name}"] = round(float(corr[torch.isfinite(corr)].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None, help="benchmark cache (default $DATTRI_CACHE)")
    ap.add_argument("--out", default=None, help="append JSON lines to this file too")
    ap.add_argument("--num-models", type=int, default=50)
    args = ap.parse_args()
    from attributors import emit  # the sibling benchmark script

    for momentum in (0.9, 0.0):
        emit(json.dumps(run(args.cache_dir, momentum, args.num_models)), args.out)


if __name__ == "__main__":
    main()
