"""IF-LiSSA's minibatch Hessian products on the MNIST MLP: the chain R-operator
(dattri.algorithm._chain_hessian) against autograd double-backward, in one process.

The benchmark's IF-LiSSA search on the MLP (Appendix C.1: recursion depth 500,
minibatches of 10 and 50, the 500 test gradients) is the slowest search of the full
MNIST run. Each cell here times ``cache`` + ``attribute`` of IFAttributorLiSSA on
the same model, data and minibatches with both product paths, at a reduced
recursion depth (the cost per step does not depend on the depth), and prints one
JSON line with both times, their ratio, the per-step seconds, the projected
seconds at depth 500 and the relative difference of the two score matrices::

    python benchmarks/lissa.py                        # depth 40, batch 10 and 50
    python benchmarks/lissa.py --depth 500 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from dattri.algorithm import IFAttributorLiSSA
from dattri.algorithm import _chain_hessian
from dattri.benchmark.datasets.mnist import create_mnist_dataset
from dattri.benchmark.datasets.mnist.models import create_mlp_model
from dattri.task import AttributionTask


def _loaders(n_train: int, n_test: int, batch: int):
    train, test = create_mnist_dataset()
    xtr, ytr = train.materialize(range(n_train))
    xte, yte = test.materialize(range(n_test))
    mk = lambda x, y: torch.utils.data.DataLoader(  # noqa: E731
        torch.utils.data.TensorDataset(x, y), batch_size=batch)
    return mk(xtr, ytr), mk(xte, yte)


def _run(model, loaders, depth: int, bs: int, chain: bool) -> tuple[float, torch.Tensor]:
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    saved = _chain_hessian.chain_rows
    if not chain:
        _chain_hessian.chain_rows = lambda *a, **k: None
    try:
        task = AttributionTask(loss, model, model.state_dict())
        att = IFAttributorLiSSA(task, recursion_depth=depth, batch_size=bs)
        t = time.perf_counter()
        att.cache(loaders[0])
        score = att.attribute(*loaders)
        seconds = time.perf_counter() - t
        used = getattr(att._state[0], "chunk", None) is not None
    finally:
        _chain_hessian.chain_rows = saved
    if used != chain:
        raise SystemExit(f"chain={chain} but the chain operator was {'' if used else 'not '}used")
    return seconds, score


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depth", type=int, default=40)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = create_mlp_model("mnist").eval()  # weights at initialisation: the cost is the same
    loaders = _loaders(args.n_train, args.n_test, 500)
    _run(model, loaders, 2, 10, True)  # one-time costs of the process (both paths share them)
    base = 2  # per step = (t(depth) - t(base)) / (depth - base): the fixed costs cancel
    for bs in args.batch_sizes:
        row = {"model": "mnist_mlp", "n_train": args.n_train, "n_test": args.n_test,
               "threads": args.threads, "recursion_depth": args.depth, "batch_size": bs}
        scores = {}
        for name, chain in (("chain", True), ("autograd", False)):
            t_base, _ = _run(model, loaders, base, bs, chain)
            t_full, scores[name] = _run(model, loaders, args.depth, bs, chain)
            step = (t_full - t_base) / (args.depth - base)
            fixed = t_base - base * step
            row.update({f"{name}_seconds": round(t_full, 3),
                        f"{name}_seconds_per_step": round(step, 4),
                        f"{name}_fixed_seconds": round(fixed, 2),
                        f"{name}_at_depth_500_s": round(fixed + 500 * step, 1)})
        row["autograd_over_chain_per_step"] = round(
            row["autograd_seconds_per_step"] / row["chain_seconds_per_step"], 2)
        rel = (scores["chain"] - scores["autograd"]).norm() / scores["autograd"].norm()
        row["score_rel_diff"] = f"{float(rel):.2e}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
