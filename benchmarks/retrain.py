"""Benchmark: ground-truth retraining, vectorised (vmap over models) vs one at a time.

MNIST-shaped synthetic data (784 features, 10 classes), subsets of 2,500 of 5,000
training examples (the LDS half-data setting of the dattri paper), minibatch SGD
(batch 64, lr 0.01, as the MNIST benchmark trainers). Two models:

* ``lr``: logistic regression, Linear(784, 10);
* ``mlp``: 784-128-64-10 with ReLU and dropout 0.1 after each hidden layer.

Three ways to train ``M`` models, each printed as one JSON line:

* ``vectorized``: :func:`dattri.model_util.vtrain.train_models_vectorized`;
* ``loop``: :func:`dattri.model_util.vtrain.train_model`, the plain nn.Module +
  torch.optim.SGD loop on tensors (same results, one model at a time);
* ``dataloader_loop``: a typical user ``train_func`` over a DataLoader (the
  generic retraining path), timed on fewer models.

Fields: ``models_per_s`` (at the given epochs), ``model_epochs_per_s``,
``est_100_models_s`` (100 LDS models at ``--report-epochs`` epochs) and
``gflop_per_s`` (achieved matmul rate; the first line has the machine's 2048^2
float32 matmul rate for comparison). A final
``summary`` line gives the speed-up of ``vectorized`` over ``loop``.

``--pipeline`` also times the whole LDS ground truth as a user runs it:
``retrain_lds(vectorized=...)`` of 100 half-data models at ``--report-epochs``
epochs into a retrain folder (``--workers`` processes), then
``calculate_lds_ground_truth`` on 500 test examples.

Usage: ``python benchmarks/retrain.py [--epochs 2] [--models 100] [--device cpu]
[--pipeline --workers 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dattri.metric import calculate_lds_ground_truth
from dattri.model_util.retrain import retrain_lds
from dattri.model_util.vtrain import VectorizedTraining, train_model, train_models_vectorized

N_TRAIN, SUBSET, DIM, CLASSES, BATCH, LR = 5000, 2500, 784, 10, 64, 0.01


def make_lr() -> nn.Module:
    return nn.Linear(DIM, CLASSES)


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 128), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(128, 64), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(64, CLASSES))


FACTORIES = {"lr": make_lr, "mlp": make_mlp}


def flop_per_model_epoch(factory) -> float:
    """Matmul FLOP of one epoch on a subset: forward 2P, weight grads 2P, input grads
    2P' (P = sum of in*out of the linear layers, P' without the first layer)."""
    sizes = [m.in_features * m.out_features for m in factory().modules() if isinstance(m, nn.Linear)]
    return SUBSET * (4.0 * sum(sizes) + 2.0 * sum(sizes[1:]))


def matmul_gflops(device: str, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        c = a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    del c
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def synthetic_mnist(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N_TRAIN, DIM, generator=g)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    return x, y


def subsets(m: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(N_TRAIN, generator=g)[:SUBSET] for _ in range(m)]


def dataloader_train(factory, x, y, subset, seed, epochs, device):
    """A typical user train_func: DataLoader + torch.optim.SGD."""
    torch.manual_seed(seed)
    model = factory().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loader = DataLoader(TensorDataset(x[subset], y[subset]), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb.to(device)), yb.to(device)).backward()
            opt.step()
    return model


def _line(name: str, mode: str, m: int, epochs: int, seconds: float, report_epochs: int, **extra) -> dict:
    flop = flop_per_model_epoch(FACTORIES[name]) * m * epochs
    rec = {
        "model": name, "mode": mode, "models": m, "epochs": epochs, "subset": SUBSET,
        "batch_size": BATCH, "seconds": round(seconds, 3),
        "models_per_s": round(m / seconds, 4),
        "model_epochs_per_s": round(m * epochs / seconds, 3),
        "est_100_models_s": round(100 * report_epochs * seconds / (m * epochs), 1),
        "gflop_per_s": round(flop / seconds / 1e9, 2),
        "threads": torch.get_num_threads(), **extra,
    }
    print(json.dumps(rec), flush=True)
    return rec


def run(name: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    factory = FACTORIES[name]
    subs = subsets(args.models)
    seeds = list(range(args.models))
    kw = {"epochs": args.epochs, "lr": LR, "batch_size": BATCH, "device": args.device}
    # warm-up (vmap tracing, allocator), not timed
    train_models_vectorized(factory, nn.functional.cross_entropy, x, y, subs[:2], seeds[:2],
                            epochs=1, lr=LR, batch_size=BATCH, device=args.device, progress=False)
    t0 = time.perf_counter()
    train_models_vectorized(factory, nn.functional.cross_entropy, x, y, subs, seeds,
                            chunk_size=args.chunk_size, progress=False, **kw)
    vec = _line(name, "vectorized", args.models, args.epochs, time.perf_counter() - t0,
                args.report_epochs, chunk_size=args.chunk_size)
    t0 = time.perf_counter()
    for s, sd in zip(subs[:args.loop_models], seeds):
        train_model(factory, nn.functional.cross_entropy, x, y, s, sd, **kw)
    loop = _line(name, "loop", args.loop_models, args.epochs, time.perf_counter() - t0,
                 args.report_epochs)
    t0 = time.perf_counter()
    for s, sd in zip(subs[:args.dl_models], seeds):
        dataloader_train(factory, x, y, s, sd, args.epochs, args.device)
    dl = _line(name, "dataloader_loop", args.dl_models, args.epochs, time.perf_counter() - t0,
               args.report_epochs)
    print(json.dumps({
        "model": name, "summary": True,
        "speedup_vs_loop": round(vec["models_per_s"] / loop["models_per_s"], 2),
        "speedup_vs_dataloader_loop": round(vec["models_per_s"] / dl["models_per_s"], 2),
    }), flush=True)


def pipeline(name: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
    """Time retrain_lds (vectorised, 100 models) + calculate_lds_ground_truth end to end."""
    import tempfile

    from torch.func import functional_call

    factory = FACTORIES[name]
    vt = VectorizedTraining(factory, nn.functional.cross_entropy, epochs=args.report_epochs,
                            lr=LR, batch_size=BATCH, chunk_size=args.chunk_size // max(1, args.workers),
                            device=args.device)
    train = DataLoader(TensorDataset(x, y), batch_size=500)
    g = torch.Generator().manual_seed(2)
    test = DataLoader(TensorDataset(torch.rand(500, DIM, generator=g),
                                    torch.randint(0, CLASSES, (500,), generator=g)), batch_size=250)
    model = factory().eval()

    def target(params, batch):
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    with tempfile.TemporaryDirectory() as folder:
        t0 = time.perf_counter()
        retrain_lds(None, train, folder, num_subsets=100, seed=0, vectorized=vt,
                    num_workers=args.workers, progress=False)
        t1 = time.perf_counter()
        values, _ = calculate_lds_ground_truth(target, folder, test, progress=False)
        t2 = time.perf_counter()
    print(json.dumps({"model": name, "pipeline": "lds_ground_truth", "models": 100,
                      "epochs": args.report_epochs, "workers": args.workers,
                      "retrain_s": round(t1 - t0, 1), "ground_truth_s": round(t2 - t1, 1),
                      "total_s": round(t2 - t0, 1), "values_shape": list(values.shape)}),
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--which", default="lr,mlp")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--report-epochs", type=int, default=20)
    p.add_argument("--models", type=int, default=100)
    p.add_argument("--loop-models", type=int, default=5)
    p.add_argument("--dl-models", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=100)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--pipeline", action="store_true", help="also time the full LDS ground truth")
    p.add_argument("--workers", type=int, default=2, help="processes for --pipeline (0: in-process)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = synthetic_mnist()
    print(json.dumps({"machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "device": args.device,
                                  "matmul_gflop_per_s": round(matmul_gflops(args.device), 1)}}),
          flush=True)
    for name in args.which.split(","):
        run(name, args, x, y)
        if args.pipeline:
            pipeline(name, args, x, y)


if __name__ == "__main__":
    main()
