"""TensorSketch against dense Gaussian and SJLT projections on real MNIST gradients.

For the MNIST-10 LR and MLP checkpoints of ``benchmarks/attributors.py`` (trained
on first use) it takes the per-example gradients of 400 training examples (TRAK's
margin), projects them to ``k`` dimensions with each projection and reports the
relative Frobenius error of the off-diagonal Gram matrix, the mean relative
error of the squared norms, and the seconds to project 5,000 examples (the
factored TensorSketch needs no gradients; the others project dense ones, whose
formation time is reported apart). One JSON object per line.

``resnet9``: the CIFAR-2 ResNet-9 of ``benchmarks/table4_cifar2.py`` (seed 0, its
CIFAR-2 images, 64 training examples, the cross-entropy loss), where the TensorSketch
follows the model's layout (``dattri.func.sketch.SketchLayout``: the deep
convolutions sketched from their unfolded inputs and output gradients, the other
layers formed and hashed) against SJLT of the formed gradients; each over
``--seeds`` seeds (the error of one draw is itself random), mean and spread.

Usage: python benchmarks/sketch_accuracy.py [--models lr mlp resnet9] [--k 512 2048]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _errors(f: torch.Tensor, k_exact: torch.Tensor) -> tuple[float, float]:
    f = f.double()
    k_hat = f @ f.T
    off = ~torch.eye(len(f), dtype=torch.bool)
    gram = float((k_hat - k_exact)[off].norm() / k_exact[off].norm())
    norms = float(((k_hat.diag() - k_exact.diag()) / k_exact.diag()).abs().mean())
    return gram, norms


def run(model_name: str, k: int, cache: Path) -> list[dict]:
    import attributors as bench

    from dattri.algorithm._engine import Featurizer
    from dattri.func.projection import random_project
    from dattri.func.sketch import TensorSketch

    data = bench.prepare(cache, 5000, 500, model_name, 1)
    task = bench.build("trak_1", model_name, data["ckpts"]).task
    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    small = (data["x_train"][:400], data["y_train"][:400])
    if not fz.factored_ok(small, 0):
        msg = "the factored nn.Linear path is unavailable for this model"
        raise RuntimeError(msg)
    fg = fz.factored.try_batch(small, 0)
    g = fg.dense()
    exact = g.double() @ g.double().T
    big = [(data["x_train"][s:s + 500], data["y_train"][s:s + 500]) for s in range(0, 5000, 500)]
    t = time.perf_counter()
    factors = [fz.factored.try_batch(b, 0) for b in big]
    t_factors = time.perf_counter() - t
    t = time.perf_counter()
    dense = [f.dense() for f in factors]
    t_dense = time.perf_counter() - t
    out = []
    for proj_type in ("tensorsketch", "normal", "sjlt"):
        if proj_type == "tensorsketch":
            sketch = TensorSketch(k, seed=0)
            feats = sketch.project(fg.factors)
            t = time.perf_counter()
            for f in factors:
                sketch.project(f.factors)
        else:
            proj = random_project(g, len(g), k, 512, 0, proj_type)
            feats = proj(g)
            t = time.perf_counter()
            for d in dense:
                proj(d)
        secs = time.perf_counter() - t
        gram, norms = _errors(feats, exact)
        out.append({"model": model_name, "k": k, "proj_type": proj_type,
                    "gram_rel_error": round(gram, 4), "sq_norm_rel_error": round(norms, 4),
                    "project_5000_seconds": round(secs, 3),
                    "needs_dense_gradients": proj_type != "tensorsketch",
                    "factors_5000_seconds": round(t_factors, 3),
                    "dense_gradients_5000_seconds": round(t_dense, 3),
                    "num_parameters": g.shape[1]})
    return out


def run_resnet9(k: int, seeds: int) -> list[dict]:
    import statistics

    import table4_cifar2 as t4
    from torch import nn

    from dattri.algorithm._engine import Featurizer
    from dattri.algorithm.base import make_projection
    from dattri.task import AttributionTask

    data = torch.load(t4.prepare(HERE.parent / "bench_out" / "cifar2", 640, 64, 1), weights_only=False)
    model = t4._model(0)

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    task = AttributionTask(loss, model, model.state_dict())
    batch = (data["x_train"][:64], data["y_train"][:64])
    g = Featurizer(task, "loss", None, torch.device("cpu")).raw(batch, 0).double()
    exact = g @ g.T
    out = []
    for proj_type in ("tensorsketch", "sjlt"):
        errs, norms = [], []
        for seed in range(seeds):
            kw = {"proj_dim": k, "proj_type": proj_type, "proj_seed": seed, "proj_max_batch_size": 64}
            fz = Featurizer(task, "loss", None, torch.device("cpu"), make_projection(kw, torch.device("cpu")))
            e, n = _errors(fz.batch(batch, 0), exact)
            errs.append(e)
            norms.append(n)
        out.append({"model": "resnet9", "k": k, "proj_type": proj_type, "seeds": seeds,
                    "gram_rel_error_mean": round(statistics.mean(errs), 4),
                    "gram_rel_error_sd": round(statistics.stdev(errs), 4) if seeds > 1 else None,
                    "sq_norm_rel_error_mean": round(statistics.mean(norms), 4),
                    "examples": len(g), "num_parameters": g.shape[1]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lr", "mlp"], choices=["lr", "mlp", "resnet9"])
    ap.add_argument("--seeds", type=int, default=5, help="resnet9: draws per projection")
    ap.add_argument("--k", nargs="+", type=int, default=[512, 2048])
    ap.add_argument("--cache", default=str(HERE.parent / "bench_out" / "ckpt"))
    args = ap.parse_args()
    for model_name in args.models:
        for k in args.k:
            lines = (run_resnet9(k, args.seeds) if model_name == "resnet9"
                     else run(model_name, k, Path(args.cache)))
            for line in lines:
                print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
