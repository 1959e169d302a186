"""The memory and time of a Hessian-vector product over a training set's batches:
a recorded gradient graph kept between products, recorded again for each, or the
forward-over-reverse product (``jvp`` of ``grad``), on ResNet-9 at CIFAR's shape.

Usage::

    python benchmarks/hvp_graphs.py                    # batch 64, 5 products each
    python benchmarks/hvp_graphs.py --batch 32 --reps 3 --out hvp.jsonl

IF-Arnoldi, IF-CG and the other Hessian-vector products of
``dattri.algorithm.influence_function.dataset_matmat`` multiply by the Hessian of the
mean loss over every training batch, many times. Reverse-over-reverse records each
batch's gradient graph once and replays its backward for each product; the graph
holds the batch's activations and what the backward saved for the second
derivative. This script measures, for one batch of the benchmark's ResNet-9 (eval
mode, 3 x 32 x 32, 2 classes; the first time for each path is apart as its first
call):

- ``graph_bytes``: the bytes autograd saved while recording the graph (distinct
  storages, by ``saved_tensors_hooks``), and the training set size whose graphs would
  fit in ``GRAPH_BYTES`` (the budget of kept graphs);
- ``replay_seconds``: a product on the kept graph;
- ``rerecord_seconds``: a product that records the graph and frees it (the batches
  past the budget);
- ``fwd_over_rev_seconds``: ``jvp`` of ``grad`` (no graph kept either);
- ``step_seconds``: a batched forward + backward of the same batch (a training step).

One JSON line, with the ratios to the step.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from attributors import emit, matmul_gflops  # noqa: E402
from featurize import _timed as _median_time  # noqa: E402  (first call, median of reps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=None, help="also append the JSON line to this file")
    args = ap.parse_args()

    from torch.func import functional_call, grad, jvp

    from dattri.algorithm import influence_function as IF
    from dattri.benchmark.datasets.cifar import create_resnet9_model

    torch.manual_seed(0)
    model = create_resnet9_model().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(args.batch, 3, 32, 32, generator=g), torch.randint(0, 2, (args.batch,), generator=g))

    def loss(t: torch.Tensor, b) -> torch.Tensor:
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = t[i:i + s.numel()].view(s)
            i += s.numel()
        return nn.functional.cross_entropy(functional_call(model, params, (b[0],)), b[1])

    v = torch.randn(1, theta.numel(), generator=g)
    kept = IF.hvp_matmat(loss, theta, batch)
    graph_bytes = kept.record()
    replay_first, replay = _median_time(lambda: kept(v), args.reps)
    kept = None  # its graph freed before the next path runs
    fresh = IF.hvp_matmat(loss, theta, batch)
    fresh.keep = False
    rerecord_first, rerecord = _median_time(lambda: fresh(v), args.reps)
    gfun = grad(lambda t: loss(t, batch))
    fwd_first, fwd = _median_time(lambda: jvp(gfun, (theta,), (v[0],))[1], args.reps)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()

    _, step_s = _median_time(step, args.reps)
    row = {
        "model": "resnet9", "batch": args.batch, "params": theta.numel(),
        "graph_bytes": graph_bytes, "graph_bytes_per_example": round(graph_bytes / args.batch),
        "graph_budget_bytes": IF.GRAPH_BYTES,
        "examples_within_budget": int(IF.GRAPH_BYTES // max(graph_bytes / args.batch, 1)),
        "replay_seconds": round(replay, 4), "replay_first_call_seconds": round(replay_first, 4),
        "rerecord_seconds": round(rerecord, 4), "rerecord_first_call_seconds": round(rerecord_first, 4),
        "fwd_over_rev_seconds": round(fwd, 4), "fwd_over_rev_first_call_seconds": round(fwd_first, 4),
        "step_seconds": round(step_s, 4),
        "replay_over_step": round(replay / step_s, 2), "rerecord_over_step": round(rerecord / step_s, 2),
        "fwd_over_rev_over_step": round(fwd / step_s, 2),
        "matmul_gflops": round(matmul_gflops(), 1), "threads": torch.get_num_threads(),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    emit(json.dumps(row), args.out)


if __name__ == "__main__":
    main()
