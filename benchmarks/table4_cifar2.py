"""Table 4's CIFAR-2 + ResNet-9 column on this machine, beside each method's floor.

Usage::

    python benchmarks/table4_cifar2.py                          # the default methods
    python benchmarks/table4_cifar2.py --methods trak_1 rps --out t4.jsonl
    python benchmarks/table4_cifar2.py --n-train 500 --n-test 50   # quick

The paper's CIFAR-2 setting (5,000 train x 500 test, ResNet-9 of 4.83M parameters,
``create_resnet9_model``) through the public API, in eval mode, loaders of batch 64.
The images are the Fashion-MNIST stand-in (T-shirt vs shirt, padded to 3 x 32 x 32;
the same shapes and FLOPs as CIFAR: timing only) and the checkpoints are ResNet-9s
at their seeded initialisation (a trained model costs the same FLOPs; RPS's fit may
take a different number of Newton steps). Each method runs in a fresh process, so
its peak resident memory is its own and every one-time cost of a process is counted.

Methods with several checkpoints (TracInCP-10, TRAK-10, TRAK-50) run on
``--checkpoints`` of them (default 1) and report ``seconds_per_checkpoint`` and
``seconds_all_checkpoints`` (that times the method's count, flagged
``extrapolated``): their cost is linear in the checkpoints, each a full pass over the
data.

The floor of a method is its arithmetic at the machine's measured matmul rate (the
rates and the step are measured before the first method and again after each one;
every row's floors use the best of the measurements so far, and the row gives the
matmul rate measured just before and just after its method, so a machine that slowed
during a run shows):

- ``f``: FLOPs of a batched forward + backward per example (``torch.utils.flop_counter``
  on a batch; a per-example gradient costs no more: the same products, unsummed);
  ``f_fwd`` the forward alone; ``P`` the parameters.
- Grad-Dot / Grad-Cos: ``(n + m) f + 2 n m P`` (exact inner products); TracInCP-10
  ten times that.
- TRAK-k, per checkpoint: ``(n + m) f + n f_fwd`` in float32 (the gradients, and
  the forward pass that gives the training residuals ``1 - p``), and in float64 the Gram
  ``n k^2``, its Cholesky ``k^3 / 3`` and the scores ``2 n m k + 2 k^2 m`` (k = 2,048;
  the SJLT itself is ``O(P)`` per example, negligible).
- RPS-L2: ``(n + m) f_fwd`` (the final layer's inputs; the fit is small).
- IF-Arnoldi: 50 Hessian-vector products over the ``n`` training examples at ``2 f``
  each, plus ``(n + m) f`` for the gradients: ~2 PFLOP here, hours on this CPU, so
  it is not run by default (``--methods arnoldi`` runs it).
- IF-EK-FAC: ``(3 n + m) f`` (covariances, eigenvalue correction and the training
  gradients, the test gradients) plus ``2 n m P`` (the scores), plus the Kronecker
  arithmetic of each layer (``T`` output positions, ``d_a`` patch and ``d_o`` output
  sizes; :func:`kfac_flops`): per training example the two covariances
  ``2 T (d_a^2 + d_o^2)`` and the eigenbasis rotation of the eigenvalue correction
  (the cheaper of rotating the factors, ``2 T (d_a^2 + d_o^2 + d_a d_o)``, or the
  formed gradient, ``2 d_a d_o (T + d_a + d_o)``), and per test example the
  inverse-Fisher product ``4 d_a d_o (d_a + d_o)`` (two rotations there and back). On
  ResNet-9 that is 10.5 + 8.9 GFLOP per training example and 70.7 per test example,
  more than the 4.2 GFLOP of its step. The eigendecompositions (``d^3`` per factor)
  are not counted (a lower bound); session 10's floor left the Kronecker terms out.

Beside the floor, ``step_floor_seconds`` is the same count of per-example passes at
the measured rate of PyTorch's own batched step on this machine (what a training
step achieves here: the part of the gap that is the CPU convolution's, not ours),
and ``paper_a40_seconds`` the paper's Table 4 figure. One JSON object per line.
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

METHODS = ["grad_dot", "grad_cos", "tracin_cp_10", "trak_1", "trak_10", "trak_50",
           "arnoldi", "rps", "ekfac"]
DEFAULT_METHODS = ["rps", "trak_1", "grad_dot", "grad_cos", "ekfac", "tracin_cp_10",
                   "trak_10", "trak_50"]
#: the paper's Table 4, CIFAR-2 + ResNet-9, one A40 (seconds; EK-FAC not in it)
PAPER_A40_SECONDS = {"grad_dot": 226.50, "grad_cos": 235.01, "tracin_cp_10": 2250.02,
                     "trak_1": 36.98, "trak_10": 316.22, "trak_50": 1549.24,
                     "arnoldi": 732.92, "rps": 1.22, "ekfac": None}
CHECKPOINTS = {"tracin_cp_10": 10, "trak_10": 10, "trak_50": 50}
TRAK_K = 2048
BATCH = 64


def _model(seed: int) -> nn.Module:
    from dattri.benchmark.datasets.cifar import create_resnet9_model

    torch.manual_seed(seed)
    return create_resnet9_model(num_classes=2).eval()


def prepare(cache: Path, n: int, m: int, ckpts: int) -> Path:
    """Images, labels and ``ckpts`` seeded ResNet-9 states, saved once under ``cache``."""
    from dattri.benchmark.datasets.cifar import create_cifar2_dataset

    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"cifar2_{n}x{m}_{ckpts}ckpt.pt"
    if out.exists():
        return out
    train, test = create_cifar2_dataset()
    xtr, ytr = train.materialize(range(n))
    xte, yte = test.materialize(range(m))
    states = []
    for seed in range(ckpts):
        path = cache / f"resnet9_seed{seed}.pt"
        if not path.exists():
            torch.save(_model(seed).state_dict(), path)
        states.append(str(path))
    torch.save({"x_train": xtr, "y_train": ytr, "x_test": xte, "y_test": yte,
                "ckpts": states}, out)
    return out


def step_profile(batch: int = BATCH, reps: int = 3) -> dict:
    """FLOPs per example of a forward + backward and of a forward, the parameter
    count and the seconds per example of the batched step (median of ``reps``)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 2, (batch,), generator=g)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()

    with FlopCounterMode(display=False) as fc:
        step()
    f = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    f_fwd = fc.get_total_flops() / batch
    step()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"flop_per_example": f, "flop_forward_per_example": f_fwd,
            "params": sum(p.numel() for p in model.parameters()),
            "step_seconds_per_example": statistics.median(times) / batch, "step_batch": batch,
            "kfac": kfac_flops(model)}


def machine_rates() -> dict:
    """One measurement of the float32 / float64 matmul rates and the batched step."""
    return {"matmul": matmul_gflops(), "matmul64": matmul_gflops(dtype=torch.float64),
            "prof": step_profile()}


def best_rates(seen: list[dict]) -> tuple[float, float, dict]:
    """The best rates of every measurement so far (a host's neighbours or a cold
    first call only ever slow one down; floors at the best rates are never too high):
    the fastest matmuls and the step profile with the fastest step."""
    prof = min((s["prof"] for s in seen), key=lambda p: p["step_seconds_per_example"])
    return max(s["matmul"] for s in seen), max(s["matmul64"] for s in seen), prof


def kfac_flops(model: nn.Module | None = None) -> dict:
    """EK-FAC's Kronecker arithmetic per example (see the module docstring): the
    covariances and eigenbasis rotation per training example, the inverse-Fisher
    product per test example, summed over the model's ``nn.Conv2d`` / ``nn.Linear``."""
    model = _model(0) if model is None else model
    shapes = []

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        bias = int(mod.bias is not None)
        if isinstance(mod, nn.Conv2d):
            t = out.shape[-1] * out.shape[-2]
            d_a = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1] + bias
            shapes.append((t, mod.out_channels, d_a))
        else:
            shapes.append((1, mod.out_features, mod.in_features + bias))

    hooks = [mod.register_forward_hook(hook) for mod in model.modules()
             if isinstance(mod, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    cov = sum(2 * t * (a * a + o * o) for t, o, a in shapes)
    rot = sum(min(2 * t * (a * a + o * o + a * o), 2 * a * o * (t + a + o)) for t, o, a in shapes)
    ihvp = sum(4 * a * o * (a + o) for _, o, a in shapes)
    return {"covariance": cov, "rotation": rot, "ihvp": ihvp}


def floors(method: str, prof: dict, n: int, m: int, rate: float, rate64: float) -> dict:
    """``floor_seconds`` (FLOPs at the matmul rates) and ``step_floor_seconds`` (the
    same per-example passes at the batched step's measured rate) per checkpoint."""
    f, f_fwd, p = prof["flop_per_example"], prof["flop_forward_per_example"], prof["params"]
    per_ex = prof["step_seconds_per_example"]
    k = TRAK_K
    passes, extra, extra64 = {
        "grad_dot": (n + m, 2 * n * m * p, 0.0),
        "grad_cos": (n + m, 2 * n * m * p, 0.0),
        "tracin_cp_10": (n + m, 2 * n * m * p, 0.0),
        "trak_1": (n + m, 0.0, n * k * k + k**3 / 3 + 2 * n * m * k + 2 * k * k * m),
        "arnoldi": (n + m + 100 * n, 0.0, 0.0),  # 50 HVPs at 2 f per example
        "ekfac": (3 * n + m, 2 * n * m * p, 0.0),
        "rps": (0, 0.0, 0.0),
    }[method if not method.startswith("trak") else "trak_1"]
    # forward passes alone: RPS's final-layer inputs, TRAK's residuals 1 - p of the
    # training examples (at a third of a training step's time)
    forwards = {"rps": n + m}.get(method, n if method.startswith("trak") else 0)
    if method == "ekfac":  # the Kronecker arithmetic (kfac_flops), at the matmul rate
        kf = prof.get("kfac") or kfac_flops()
        extra += n * (kf["covariance"] + kf["rotation"]) + m * kf["ihvp"]
    flop = passes * f + extra + forwards * f_fwd
    floor = flop / 1e9 / rate + extra64 / 1e9 / rate64
    step_floor = (passes + forwards / 3) * per_ex + extra / 1e9 / rate + extra64 / 1e9 / rate64
    return {"floor_gflop": round(flop / 1e9, 1), "floor_gflop_float64": round(extra64 / 1e9, 1),
            "floor_seconds_per_checkpoint": round(floor, 2),
            "step_floor_seconds_per_checkpoint": round(step_floor, 2)}


# ----------------------------------------------------------------------------- worker
def build(method: str, ckpts: list[str], trak_proj: str = "sjlt"):
    """The attributor of ``method`` through the public API (paper's settings)."""
    from dattri import algorithm as A
    from dattri.task import AttributionTask

    model = _model(0)

    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def margin(params, data):
        x, y = data
        logp = torch.log_softmax(torch.func.functional_call(model, params, (x,)), -1)
        lp = logp.gather(1, y[:, None]).squeeze(1)
        return (lp - torch.log(-torch.expm1(lp).clamp_min(1e-12))).mean()

    def prob(params, data):
        x, y = data
        out = torch.func.functional_call(model, params, (x,))
        return torch.softmax(out, -1).gather(1, y[:, None]).squeeze(1)

    if method.startswith("trak"):
        task = AttributionTask(margin, model, ckpts)
        return A.TRAKAttributor(task, prob, proj_params={"proj_dim": TRAK_K, "proj_type": trak_proj,
                                                         "proj_seed": 0})
    if method in ("tracin_cp_10", "grad_dot", "grad_cos"):
        task = AttributionTask(loss, model, ckpts)
        weights = [0.01] * len(ckpts) if method == "tracin_cp_10" else [1.0]
        return A.TracInAttributor(task, weight_list=torch.tensor(weights),
                                  normalized_grad=method == "grad_cos")
    if method == "rps":  # the model's logits are 0.125 times its final layer's output
        task = AttributionTask(lambda pre, y: nn.functional.cross_entropy(0.125 * pre, y),
                               model, ckpts[:1])
        return A.RPSAttributor(task, final_linear_layer_name="linear", l2_strength=1e-2)
    task = AttributionTask(loss, model, ckpts[:1])
    if method == "arnoldi":
        return A.IFAttributorArnoldi(task, max_iter=50, proj_dim=50, regularization=1e-2)
    if method == "ekfac":
        return A.IFAttributorEKFAC(task, damping=1e-3)
    raise ValueError(method)


def worker(method: str, data_file: str, n_ckpt: int, trak_proj: str = "sjlt") -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    data = torch.load(data_file, weights_only=False)
    n, m = len(data["y_train"]), len(data["y_test"])
    att = build(method, data["ckpts"][:n_ckpt], trak_proj)
    tr = DataLoader(TensorDataset(data["x_train"], data["y_train"]), batch_size=BATCH)
    te = DataLoader(TensorDataset(data["x_test"], data["y_test"]), batch_size=BATCH)
    t0 = time.perf_counter()
    status, t_cache, finite = "ok", float("nan"), False
    try:
        att.cache(tr)
        t_cache = time.perf_counter() - t0
        score = att.attribute(tr, te)
        finite = bool(torch.isfinite(score).all()) and tuple(score.shape) == (n, m)
    except Exception as e:  # noqa: BLE001 - reported in the line
        status = f"{type(e).__name__}: {str(e)[:200]}"
    return {"method": method, "n_train": n, "n_test": m, "checkpoints_run": n_ckpt,
            "status": status, "seconds": round(time.perf_counter() - t0, 2),
            "cache_seconds": round(t_cache, 2), "finite": finite,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--checkpoints", type=int, default=1,
                    help="checkpoints actually run by the methods with several (the rest extrapolated)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per method's process")
    ap.add_argument("--cache", default=str(HERE.parent / "bench_out" / "cifar2"))
    ap.add_argument("--out", default=None, help="append JSON lines to this file too")
    ap.add_argument("--trak-proj", default="sjlt", choices=["sjlt", "tensorsketch"],
                    help="TRAK's projection (k = 2,048): sjlt of the formed gradients, or the "
                         "TensorSketch with the deep convolutions sketched from their factors")
    ap.add_argument("--worker", nargs=3, metavar=("METHOD", "DATA", "CKPTS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        method, data_file, n_ckpt = args.worker
        print(json.dumps(worker(method, data_file, int(n_ckpt), args.trak_proj)), flush=True)
        return
    seen = [machine_rates()]
    n, m = args.n_train, args.n_test
    data_file = prepare(Path(args.cache), n, m, args.checkpoints)
    rate, rate64, prof = best_rates(seen)
    emit(json.dumps({"machine": True, "matmul_gflops": round(rate, 1),
                     "matmul_gflops_float64": round(rate64, 1), "threads": torch.get_num_threads(),
                     "step_gflops": round(prof["flop_per_example"] / prof["step_seconds_per_example"] / 1e9, 1),
                     **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in prof.items()}}),
         args.out)
    for method in args.methods:
        before = seen[-1]
        total = CHECKPOINTS.get(method, 1)
        run = min(total, args.checkpoints)
        cmd = [sys.executable, __file__, "--worker", method, str(data_file), str(run),
               "--trak-proj", args.trak_proj]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
            lines = res.stdout.strip().splitlines()
            row = json.loads(lines[-1]) if lines else {
                "method": method, "status": "crashed", "stderr": res.stderr[-400:]}
        except subprocess.TimeoutExpired:
            row = {"method": method, "status": f"timeout after {args.timeout:.0f} s",
                   "seconds": args.timeout, "checkpoints_run": run}
        seen.append(machine_rates())  # after the method: a machine slowed meanwhile shows
        rate, rate64, prof = best_rates(seen)
        fl = floors(method, prof, n, m, rate, rate64)
        row.update({"matmul_gflops_before": round(before["matmul"], 1),
                    "matmul_gflops_after": round(seen[-1]["matmul"], 1),
                    "matmul_gflops_best": round(rate, 1),
                    "step_gflops_best": round(prof["flop_per_example"] / prof["step_seconds_per_example"] / 1e9, 1)})
        per_ckpt = row.get("seconds", float("nan")) / max(run, 1)
        row.update(fl)
        row.update({
            "checkpoints": total, "extrapolated": run < total,
            "seconds_per_checkpoint": round(per_ckpt, 2),
            "seconds_all_checkpoints": round(per_ckpt * total, 1),
            "floor_seconds": round(fl["floor_seconds_per_checkpoint"] * total, 1),
            "step_floor_seconds": round(fl["step_floor_seconds_per_checkpoint"] * total, 1),
            "over_floor": round(per_ckpt / fl["floor_seconds_per_checkpoint"], 2),
            "over_step_floor": round(per_ckpt / fl["step_floor_seconds_per_checkpoint"], 2),
            "paper_a40_seconds": PAPER_A40_SECONDS[method],
        })
        if method.startswith("trak"):
            row["trak_proj"] = args.trak_proj
        emit(json.dumps(row), args.out)


if __name__ == "__main__":
    main()
