"""Attribution at scale: 10^6 training examples, features on disk, blocked top-k.

Usage::

    python benchmarks/scale.py                               # n = 10^6, 1,000 test digits
    python benchmarks/scale.py --n 10000 --check             # smoke size, checked
    python benchmarks/scale.py --world-size 2                # 2 processes (gloo, loopback)
    python benchmarks/scale.py --cache-dir /big/disk/scale   # keep the stores: reruns resume

The training set is ``n`` augmented MNIST digits: digit ``i % 60,000`` of the
offline MNIST training set, shifted by up to 2 pixels in each direction (a fixed
shift per ``i``), generated on the fly, so nothing of size ``n`` is ever in memory.
The model is the MNIST logistic regression trained on the first ``--train-n`` base
digits. For each method:

- ``trak1``: TRAK with one checkpoint: projected gradients of the margin
  ``log(p / (1 - p))`` (``--proj-dim``, normal projection) and ``Q = 1 - p``, written
  to the feature store; the Gram ``Phi^T Phi`` summed over the store's blocks (and
  all-reduced over ranks); the test side ``phi_test (Phi^T Phi + lambda I)^{-1}``;
  scores ``Q_i <Phi_i, ...>`` in float64, block by block;
- ``graddot``: Grad-Dot: gradients of the cross-entropy, projected to
  ``--graddot-proj-dim`` (0: the exact 7,850-dimensional gradients; 31 GB on disk at
  n = 10^6), inner products with the test gradients;

then the top-``--k`` proponents and opponents of each test digit (``dattri.topk``),
never forming the ``n x n_test`` matrix. Features live in ``dattri.store`` stores
(one per method, checkpoint and rank), read back under ``--budget-mb``.

With ``--world-size W > 1`` the training rows are split into W contiguous shards,
one process per shard (``torch.multiprocessing`` spawn, ``torch.distributed`` with
``gloo`` on loopback): each featurizes and ranks its shard; the Gram matrices are
all-reduced and the rankings merged on rank 0. ``--engine attributor`` runs the same
through ``TRAKAttributor`` / ``TracInAttributor`` with ``offload="disk"`` and
``attribute(..., top_k=k)``, which shard over the default process group themselves
(see :func:`attributor_engine`); ``--engine lowlevel`` (default) composes the pieces.

Output: one JSON object (stdout, and ``--out``) with per method and rank the wall
time of each phase, throughput (training examples per second), batches computed
(0 when the store was already complete), store size, and the peak resident memory
(``getrusage``), which must stay under 2 GiB whatever ``n`` (``peak_under_2GiB``).
Memory does not grow with ``n``: a loader batch, one store block (``--budget-mb``
with its score block), the ``(m, d)`` test side, the ``(d, d)`` Gram and ``O(m k)``
of ranking.

Arithmetic for 10^8 examples on W workers (measure ``featurize_examples_per_s``
here to fill in the time): a store row is ``(d + 1) * 4`` bytes for TRAK-1 (d = 512:
2,052 B, so 205 GB at 10^8) and ``d * 4`` for projected Grad-Dot (205 GB; exact
gradients: 31.4 kB a row, 3.1 TB); each shard holds 1/W of it. Time per shard:
``10^8 / (W * featurize_examples_per_s)`` for the features plus
``10^8 / (W * topk_examples_per_s)`` for scoring. Communication: one all-reduce of
the ``d x d`` float64 Gram per checkpoint (2 MiB at d = 512, whatever n) and one
gather of the rankings, ``m * k * 2 sides * 16`` bytes per rank (320 kB for
m = 1,000, k = 10): the data never moves.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dattri.algorithm._engine import Featurizer
from dattri.algorithm.base import make_projection
from dattri.benchmark.datasets.mnist import create_mnist_dataset, train_mnist_lr
from dattri.benchmark.datasets.mnist.models import create_lr_model
from dattri.benchmark.settings import margin_func
from dattri.store import featurize_to_store, open_store, shard_range
from dattri.task import AttributionTask
from dattri.topk import TopK, merge_topk, topk_from_features

GIB = 1 << 30
METHODS = ("trak1", "graddot")


class ShiftedDigits(Dataset):
    """Rows ``start .. stop - 1`` of the augmented training set: row ``i`` is base
    digit ``i % len(base)`` shifted by ``(dy, dx)`` in ``-2..2`` (a hash of ``i``),
    zero-filled, normalised like the base set."""

    SHIFT = 2

    def __init__(self, base: Any, start: int, stop: int) -> None:
        self.base, self.start, self.stop = base, int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitems__(self, indices):
        i = torch.as_tensor(indices, dtype=torch.int64) + self.start
        s = self.SHIFT
        h = (i * 2654435761) % (1 << 32)
        dy, dx = h % (2 * s + 1) - s, (h // (2 * s + 1)) % (2 * s + 1) - s
        raw = self.base.data[i % len(self.base)]
        pad = nn.functional.pad(raw, (s, s, s, s))
        r = torch.arange(28)
        rows = (r[None, :] + s - dy[:, None])[:, :, None]
        cols = (r[None, :] + s - dx[:, None])[:, None, :]
        shifted = pad[torch.arange(len(i))[:, None, None], rows, cols]
        x = self.base._normalize(shifted)
        return list(zip(x.unbind(0), self.base.targets[i % len(self.base)].unbind(0)))

    def __getitem__(self, index: int):
        return self.__getitems__([index])[0]


@functools.lru_cache(maxsize=1)
def _mnist():
    """The offline MNIST training and test sets (read once per process)."""
    return create_mnist_dataset()


def _rss() -> int:
    """Peak resident memory of this process (bytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _tasks(model: nn.Module) -> dict[str, AttributionTask]:
    def ce(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    ckpt = model.state_dict()
    return {"trak1": AttributionTask(loss_func=margin_func(model), model=model, checkpoints=ckpt),
            "graddot": AttributionTask(loss_func=ce, model=model, checkpoints=ckpt)}


class TRAKRows:
    """TRAK's training rows: the projected margin gradients and ``Q = 1 - p`` as a
    last column, so one store holds both."""

    def __init__(self, features: Featurizer, model: nn.Module) -> None:
        self.features, self.model, self.device = features, model, features.device

    def batch(self, batch, ckpt):
        phi = self.features.batch(batch, ckpt)
        x, y = batch
        with torch.no_grad():
            p = torch.softmax(self.model(x), -1).gather(1, y[:, None])
        return torch.cat([phi, (1 - p).to(phi.dtype)], dim=1)


def _projection(dim: int, device: torch.device):
    if dim <= 0:
        return None
    return make_projection({"proj_dim": dim, "proj_type": "normal", "proj_seed": 0,
                            "proj_max_batch_size": 32}, device)


def _setup(args: argparse.Namespace, rank: int, world: int):
    """The model, data and tasks of one process (and its process group when W > 1)."""
    torch.set_num_threads(max(1, args.threads // world))
    device = torch.device(args.device)
    model = create_lr_model()
    model.load_state_dict(torch.load(Path(args.cache_dir) / "model.pt", weights_only=True))
    model.eval().to(device)
    base, test_base = _mnist()
    test_loader = DataLoader(torch.utils.data.Subset(test_base, range(args.test)), batch_size=500)
    dist = None
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=rank, world_size=world)
    return device, model, base, test_loader, _tasks(model), dist


def _finish_rank(args: argparse.Namespace, rank: int, out: dict, tops: dict) -> dict:
    if rank == 0:
        for method, top in tops.items():
            top.save(Path(args.cache_dir) / f"topk-{method}.pt")
    out["peak_rss_bytes"] = _rss()
    with open(Path(args.cache_dir) / f"rank-{rank}.json", "w") as f:
        json.dump(out, f)
    return out


def run_rank(args: argparse.Namespace, rank: int, world: int) -> dict:
    """Featurize this rank's shard into the stores and rank its training rows."""
    if args.engine == "attributor":
        return attributor_engine(args, rank, world)
    device, model, base, test_loader, tasks, dist = _setup(args, rank, world)
    cache = Path(args.cache_dir)
    rows = shard_range(args.n, world, rank)
    loader = DataLoader(ShiftedDigits(base, rows.start, rows.stop), batch_size=args.batch_size)
    out: dict[str, Any] = {"rank": rank, "rows": [rows.start, rows.stop], "methods": {}}
    tops: dict[str, TopK] = {}
    for method in args.methods:
        proj_dim = args.proj_dim if method == "trak1" else args.graddot_proj_dim
        proj = _projection(proj_dim, device)
        train_side = Featurizer(tasks[method], "loss", None, device, transform=proj)
        test_side = Featurizer(tasks[method], "target", None, device, transform=proj)
        rec: dict[str, Any] = {}
        settings = {"method": method, "proj_dim": proj_dim, "proj_type": "normal", "seed": 0,
                    "train_n": args.train_n, "epochs": args.epochs}
        store = open_store(cache / method, loader, 0, shard=rank, settings=settings,
                           row_offset=rows.start)
        t = time.perf_counter()
        rows_fn = TRAKRows(train_side, model) if method == "trak1" else train_side
        rec["computed_batches"] = featurize_to_store(rows_fn, loader, 0, store,
                                                     desc=f"{method} rank {rank}",
                                                     show_progress=args.progress)
        rec["featurize_s"] = time.perf_counter() - t
        done_rows = len(rows) * rec["computed_batches"] / len(loader)  # about (last batch)
        rec["featurize_examples_per_s"] = done_rows / max(rec["featurize_s"], 1e-9)
        rec["store_bytes"] = sum(f.stat().st_size for f in store.folder.iterdir())
        rec["dim"] = store.dim
        budget = args.budget_mb << 20
        t = time.perf_counter()
        test = test_side.all(test_loader, 0)
        if method == "trak1":
            d = test.shape[1]
            gram = torch.zeros(d, d, dtype=torch.float64, device=device)
            # per row: the stored float32 features and their float64 copy
            gram_rows = max(1, budget // (store.dim * (store.dtype.itemsize + 8)))
            for _, block in store.blocks(rows=gram_rows, device=device):
                phi = block[:, :d].to(torch.float64)
                gram += phi.T @ phi
            if dist is not None:
                dist.all_reduce(gram)  # the Gram of the whole training set
            gram += args.regularization * torch.eye(d, dtype=torch.float64, device=device)
            chol = torch.linalg.cholesky(gram)
            right = torch.cholesky_solve(test.to(torch.float64).T, chol).T  # (m, d)

            def score(block, right=right, d=d):
                return block[:, d:d + 1].to(torch.float64) * (block[:, :d].to(torch.float64)
                                                             @ right.T)
        else:
            right = test

            def score(block, right=right):
                return block @ right.T.to(block.dtype)
        rec["test_side_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # per row: the stored features, their float64 copy, the float64 score row and
        # its product temporary all count against the budget
        width = store.dim * (store.dtype.itemsize + 8) + 2 * args.test * 8
        top = topk_from_features(store.blocks(rows=max(1, budget // width), device=device),
                                 right, args.k, score)
        rec["topk_s"] = time.perf_counter() - t
        rec["topk_train_examples_per_s"] = len(rows) / max(rec["topk_s"], 1e-9)
        rec["peak_rss_bytes"] = _rss()
        tops[method] = top
        out["methods"][method] = rec
    if dist is not None:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {m: t for m, t in tops.items()})
        tops = {m: merge_topk([g[m] for g in gathered]) for m in tops}
        dist.destroy_process_group()
    return _finish_rank(args, rank, out, tops)


def _spawned(rank: int, args: argparse.Namespace, world: int) -> None:
    run_rank(args, rank, world)


def attributor_engine(args: argparse.Namespace, rank: int, world: int) -> dict:
    """The same run through the attributors: ``TRAKAttributor`` / ``TracInAttributor``
    with ``offload="disk"`` (their stores under ``cache_dir/attributor-<method>``) and
    ``attribute(..., top_k=k)``; with W > 1 they shard the whole training loader over
    the default process group themselves."""
    from dattri.algorithm import TracInAttributor, TRAKAttributor
    from dattri.benchmark.settings import correct_probability_func

    device, model, base, test_loader, tasks, _ = _setup(args, rank, world)
    loader = DataLoader(ShiftedDigits(base, 0, args.n), batch_size=args.batch_size)
    out: dict[str, Any] = {"rank": rank, "rows": None, "methods": {}}
    tops: dict[str, TopK] = {}
    for method in args.methods:
        proj_dim = args.proj_dim if method == "trak1" else args.graddot_proj_dim
        proj = None if proj_dim <= 0 else {"proj_dim": proj_dim, "proj_type": "normal",
                                           "proj_seed": 0, "proj_max_batch_size": 32}
        folder = str(Path(args.cache_dir) / f"attributor-{method}")
        if method == "trak1":
            att = TRAKAttributor(tasks[method], correct_probability_func(model), proj_params=proj,
                                 device=device, regularization=args.regularization,
                                 offload="disk", cache_dir=folder)
        else:
            att = TracInAttributor(tasks[method], weight_list=[1.0], normalized_grad=False,
                                   proj_params=proj, device=device, offload="disk",
                                   cache_dir=folder)
        rec: dict[str, Any] = {"computed_batches": None, "test_side_s": 0.0}
        t = time.perf_counter()
        att.cache(loader)
        rec["featurize_s"] = time.perf_counter() - t
        t = time.perf_counter()
        tops[method] = att.attribute(loader, test_loader, top_k=args.k)
        rec["topk_s"] = time.perf_counter() - t
        rec["store_bytes"] = sum(f.stat().st_size for f in Path(folder).rglob("*")
                                 if f.is_file()) if rank == 0 else 0
        rec["peak_rss_bytes"] = _rss()
        out["methods"][method] = rec
    return _finish_rank(args, rank, out, tops)


def _check(args: argparse.Namespace) -> dict:
    """Smoke sizes only: the top-k of the store equals the top-k of the full matrix
    computed in memory (features recomputed here, in one process)."""
    from dattri.topk import topk_from_scores

    device = torch.device(args.device)
    model = create_lr_model()
    model.load_state_dict(torch.load(Path(args.cache_dir) / "model.pt", weights_only=True))
    model.eval()
    base, test_base = _mnist()
    loader = DataLoader(ShiftedDigits(base, 0, args.n), batch_size=args.batch_size)
    test_loader = DataLoader(torch.utils.data.Subset(test_base, range(args.test)), batch_size=500)
    tasks, out = _tasks(model), {}
    for method in args.methods:
        proj = _projection(args.proj_dim if method == "trak1" else args.graddot_proj_dim, device)
        train = Featurizer(tasks[method], "loss", None, device, transform=proj).all(loader, 0)
        test = Featurizer(tasks[method], "target", None, device, transform=proj).all(test_loader, 0)
        if method == "trak1":
            x = train.to(torch.float64)
            gram = x.T @ x + args.regularization * torch.eye(x.shape[1], dtype=torch.float64)
            with torch.no_grad():
                p = torch.cat([torch.softmax(model(b[0]), -1).gather(1, b[1][:, None])
                               for b in loader])
            score = (1 - p).to(torch.float64) * (x @ torch.linalg.solve(gram, test.double().T))
        else:
            score = train @ test.T
        want = topk_from_scores(score, args.k)
        got = TopK.load(Path(args.cache_dir) / f"topk-{method}.pt")
        out[method] = {"same_rows": bool(torch.equal(got.proponents, want.proponents)
                                          and torch.equal(got.opponents, want.opponents)),
                       "max_rel_score_diff": float(
                           ((got.proponent_scores.double() - want.proponent_scores.double()).abs()
                            / want.proponent_scores.double().abs().clamp_min(1e-30)).max())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000, help="training examples (default 10^6)")
    p.add_argument("--test", type=int, default=1000, help="test digits ranked (default 1,000)")
    p.add_argument("--k", type=int, default=10, help="proponents and opponents per test digit")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--proj-dim", type=int, default=512, help="TRAK-1 projection dimension")
    p.add_argument("--graddot-proj-dim", type=int, default=512,
                   help="Grad-Dot projection dimension (0: exact gradients, 7,850 dims)")
    p.add_argument("--regularization", type=float, default=0.0, help="TRAK's lambda")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--budget-mb", type=int, default=64, help="bytes per block read from the store")
    p.add_argument("--train-n", type=int, default=10_000, help="base digits the LR is trained on")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--world-size", type=int, default=1, help="processes (shards); gloo on loopback")
    p.add_argument("--engine", choices=("lowlevel", "attributor"), default="lowlevel")
    p.add_argument("--cache-dir", default=None, help="where the stores go (kept; reruns resume). "
                   "Default: a temporary folder, deleted afterwards")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch threads in all (split between the processes)")
    p.add_argument("--check", action="store_true",
                   help="compare with the full score matrix in memory (small --n only)")
    p.add_argument("--progress", action="store_true", help="tqdm bars")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    keep = args.cache_dir is not None
    args.cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="dattri-scale-")
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    wall = time.perf_counter()
    t = time.perf_counter()
    if not (cache / "model.pt").exists():
        base, _ = _mnist()
        torch.manual_seed(0)
        model = train_mnist_lr(DataLoader(torch.utils.data.Subset(base, range(args.train_n)),
                                          batch_size=64), seed=0, epoch_num=args.epochs)
        torch.save(model.state_dict(), cache / "model.pt")
    train_s = time.perf_counter() - t
    world = args.world_size
    if world == 1:
        ranks = [run_rank(args, 0, 1)]
    else:
        with socket.socket() as s:  # a free loopback port for the process group
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]
        torch.multiprocessing.spawn(_spawned, args=(args, world), nprocs=world, join=True)
        ranks = [json.loads((cache / f"rank-{r}.json").read_text()) for r in range(world)]
    result: dict[str, Any] = {
        "benchmark": "scale", "n": args.n, "test": args.test, "k": args.k,
        "world_size": world, "engine": args.engine, "threads": args.threads, "batch_size": args.batch_size,
        "budget_mb": args.budget_mb, "model": "MNIST LR (7,850 parameters)",
        "data": "augmented MNIST: digit i % 60000 shifted by up to 2 px",
        "proj_dim": {"trak1": args.proj_dim, "graddot": args.graddot_proj_dim},
        "train_model_s": train_s, "ranks": ranks,
    }
    for method in args.methods:
        recs = [r["methods"][method] for r in ranks]
        feat_s = max(r["featurize_s"] for r in recs)
        rank_s = max(r["test_side_s"] + r["topk_s"] for r in recs)
        counted = [r["computed_batches"] for r in recs if r["computed_batches"] is not None]
        computed = sum(counted) if counted else None  # the attributors do not count them
        result[method] = {
            "featurize_s": feat_s, "score_topk_s": rank_s,
            "featurize_examples_per_s": args.n / feat_s if computed != 0 else None,
            "topk_examples_per_s": args.n / rank_s,
            "computed_batches": computed, "store_bytes": sum(r["store_bytes"] for r in recs),
        }
    peak = max([r["peak_rss_bytes"] for r in ranks] + [_rss()])
    result.update(wall_s=time.perf_counter() - wall, peak_rss_bytes=peak,
                  peak_rss_gib=peak / GIB, peak_under_2GiB=peak < 2 * GIB)
    if args.check:
        result["check"] = _check(args)
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    if not keep:
        shutil.rmtree(cache, ignore_errors=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
