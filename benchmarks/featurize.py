"""Per-example features against a batched training step, on real model shapes.

Usage::

    python benchmarks/featurize.py                         # every model
    python benchmarks/featurize.py --models resnet9 nanogpt --reps 3

For each model (each in a fresh process, so that the peak memory is its own) and
the same batch of examples, in one process, it times:

- ``step``: a batched forward + backward of the mean loss with respect to every
  trainable parameter (a training step without the optimizer);
- ``dense``: per-example gradients ``(B, P)`` by the featurizer of the attributors
  (one forward and one backward per batch, ``dattri.algorithm._batched``);
- ``vmap``: the same by ``vmap(grad)`` on batches of one (the previous path);
- ``dense_reused``: the same, each result lent back to the featurizer before the
  next call (a consumer that keeps nothing of a batch, as the exact Grad-Dot / TracIn
  scores do through ``Featurizer.stream``): one buffer for every batch;
- ``trak``: TRAK's training features, the ``sjlt`` projection to k = 2,048 of the
  per-example gradients;
- ``trak_ts``: the same with ``proj_type="tensorsketch"`` (k = 2,048): the layers
  whose factors are cheaper (``dattri.func.sketch.FactoredSketchSink``'s cost model:
  deep convolutions with few positions) sketched from their inputs and output
  gradients without forming their per-example gradients, the others formed and
  scattered (``trak_ts_factored_layers`` lists the former);

and prints one JSON line per model with the seconds per batch (median of
``--reps`` after one warm-up call, which pays the one-time checks: they are
reported apart as ``first_call_seconds``), the ratios to ``step``, the step's FLOPs
(``torch.utils.flop_counter``), the achieved GFLOP/s of the step and of the
featurizer, the machine's float32 matmul rate, and the peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from attributors import emit, matmul_gflops  # noqa: E402

MODELS = ["mlp", "resnet9", "nanogpt", "musictransformer", "gpt2"]


def _classification(model: nn.Module):
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return loss


def _lm(model: nn.Module, logits=lambda out: out):
    def loss(params, data):
        x, y = data
        out = logits(torch.func.functional_call(model, params, (x,)))
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return loss


def setup(name: str, batch: int | None):
    """``(model, loss, batch)`` of a model at its benchmark shape."""
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        from dattri.benchmark.datasets.mnist import create_mlp_model

        model, b = create_mlp_model("mnist"), batch or 64
        data = (torch.rand(b, 1, 28, 28, generator=g), torch.randint(0, 10, (b,), generator=g))
        return model.eval(), _classification(model), data
    if name == "resnet9":
        from dattri.benchmark.datasets.cifar import create_resnet9_model

        model, b = create_resnet9_model(num_classes=2), batch or 16
        data = (torch.randn(b, 3, 32, 32, generator=g), torch.randint(0, 2, (b,), generator=g))
        return model.eval(), _classification(model), data
    if name in ("nanogpt", "musictransformer"):
        if name == "nanogpt":
            from dattri.benchmark.datasets.shakespeare_char import create_nanogpt_model

            model, vocab = create_nanogpt_model(), 65
        else:
            from dattri.benchmark.datasets.maestro import VOCAB_SIZE, create_musictransformer_model

            model, vocab = create_musictransformer_model(), VOCAB_SIZE
        b = batch or 8
        x = torch.randint(0, vocab, (b, 256), generator=g)
        return model.eval(), _lm(model), (x, torch.randint(0, vocab, (b, 256), generator=g))
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=256, vocab_size=2048, n_positions=256)
        model, b = GPT2LMHeadModel(cfg).eval(), batch or 8
        x = torch.randint(0, 2048, (b, 128), generator=g)
        return model, _lm(model, lambda out: out.logits), (x, torch.randint(0, 2048, (b, 128), generator=g))
    msg = f"unknown model {name!r}; choose from {MODELS}"
    raise SystemExit(msg)


def _timed(fn, reps: int) -> tuple[float, float]:
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def worker(name: str, batch: int | None, reps: int, skip_vmap: bool) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from dattri.algorithm._engine import Featurizer
    from dattri.algorithm.base import make_projection
    from dattri.task import AttributionTask

    torch.manual_seed(0)
    model, loss, data = setup(name, batch)
    task = AttributionTask(loss, model, model.state_dict())
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters() if p.requires_grad}
    n_params = sum(p.numel() for p in params.values())

    def step():
        torch.autograd.grad(loss(params, data), list(params.values()))

    with FlopCounterMode(display=False) as fc:
        step()
    flops = fc.get_total_flops()
    out = {"model": name, "batch": int(data[0].shape[0]), "params": n_params,
           "step_gflop": round(flops / 1e9, 3)}
    _, out["step_seconds"] = _timed(step, reps)

    fz = Featurizer(task, "loss", None, torch.device("cpu"))
    fz.use_factored = False  # dense gradients of every layer, linear ones included
    first, out["dense_seconds"] = _timed(lambda: fz.raw(data, 0), reps)
    out["dense_first_call_seconds"] = round(first, 3)
    out["dense_batched_verified"] = bool(fz._batched_ok.get(0))
    if fz.batched is not None and hasattr(fz.batched, "release"):
        # a consumer that keeps nothing of a batch (Featurizer.stream: exact Grad-Dot /
        # TracIn scores): each batch is written into the previous one's buffer
        _, out["dense_reused_seconds"] = _timed(lambda: fz.batched.release(fz.raw(data, 0)), reps)
    proj = make_projection({"proj_dim": 2048, "proj_type": "sjlt", "proj_max_batch_size": 64,
                            "proj_seed": 0}, torch.device("cpu"))
    tz = Featurizer(task, "loss", None, torch.device("cpu"), transform=proj)
    tz.use_factored = False
    first, out["trak_seconds"] = _timed(lambda: tz.batch(data, 0), reps)
    out["trak_first_call_seconds"] = round(first, 3)
    ts = make_projection({"proj_dim": 2048, "proj_type": "tensorsketch", "proj_seed": 0},
                         torch.device("cpu"))
    sz = Featurizer(task, "loss", None, torch.device("cpu"), transform=ts)
    from dattri.func.sketch import FactoredSketchSink

    seen: set[str] = set()
    real_add = FactoredSketchSink.add
    FactoredSketchSink.add = lambda self, n, a, d: (seen.add(n), real_add(self, n, a, d))[1]
    first, out["trak_ts_seconds"] = _timed(lambda: sz.batch(data, 0), reps)
    FactoredSketchSink.add = real_add
    out["trak_ts_first_call_seconds"] = round(first, 3)
    out["trak_ts_factored_layers"] = sorted(seen)
    if not skip_vmap:
        _, out["vmap_seconds"] = _timed(lambda: fz.vmapped(data, 0), max(1, reps // 2))
    for k in ("dense", "dense_reused", "trak", "trak_ts", "vmap"):
        if f"{k}_seconds" in out:
            out[f"{k}_over_step"] = round(out[f"{k}_seconds"] / out["step_seconds"], 3)
    out["step_gflops_per_s"] = round(flops / out["step_seconds"] / 1e9, 1)
    out["dense_gflops_per_s"] = round(flops / out["dense_seconds"] / 1e9, 1)
    out["matmul_gflops_per_s"] = round(matmul_gflops(), 1)
    out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["threads"] = torch.get_num_threads()
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: per model)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-vmap", action="store_true", help="do not time the vmap(grad) path")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch, args.reps, args.skip_vmap)))
        return
    for name in args.models:
        if name == "gpt2":
            try:
                import transformers  # noqa: F401
            except ImportError:
                emit(json.dumps({"model": name, "skipped": "transformers is not installed "
                                 "(pip install -e '.[hf]')"}), args.out)
                continue
        cmd = [sys.executable, __file__, "--worker", name, "--reps", str(args.reps)]
        cmd += ["--batch", str(args.batch)] if args.batch else []
        cmd += ["--skip-vmap"] if args.skip_vmap else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        emit(lines[-1] if lines else json.dumps({"model": name, "error": res.stderr[-2000:]}), args.out)


if __name__ == "__main__":
    main()
