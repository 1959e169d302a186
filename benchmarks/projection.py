"""Time per example of each projection type; prints JSON lines to stdout.

Default setting: P = 110,000 features (the MNIST MLP), k = 2048, B = 256, float32.
``cold`` is the first call (random blocks drawn), ``warm`` the mean of the next
calls (blocks reused while they fit ``cache_bytes``, 256 MiB by default; a dense
P x k float32 matrix here is 900 MB, so most of it is redrawn every call). The
first line is the machine's measured float32 matmul rate, for reference: a dense
projection costs 2 P k flops per example.

Usage: python benchmarks/projection.py [--device cuda] [--P 110000] [--k 2048] [--B 256]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dattri.func.projection import PROJ_TYPES, get_projector


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """Measured float32 matmul rate (GFLOP/s) on ``n x n`` matrices."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def bench(proj_type: str, p: int, k: int, b: int, device: torch.device, warm_reps: int) -> dict:
    """Cold and warm seconds per example for one projection type."""
    x = torch.randn(b, p, device=device)
    proj = get_projector(proj_type, p, k, seed=0, device="cpu", max_batch_size=b)
    _sync(device)
    start = time.perf_counter()
    proj.project(x)
    _sync(device)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(warm_reps):
        proj.project(x)
    _sync(device)
    warm = (time.perf_counter() - start) / warm_reps
    flops = 2 * p * k if proj_type in {"normal", "rademacher"} else None
    return {
        "proj_type": proj_type, "P": p, "k": k, "B": b, "device": str(device),
        "cold_s_per_example": cold / b, "warm_s_per_example": warm / b,
        "warm_gflops": flops * b / warm / 1e9 if flops else None,
        "blocks_generated": proj.blocks_generated, "peak_block_MiB": proj.peak_block_bytes / 2**20,
    }


def main() -> None:
    """Parse arguments and print one JSON line per projection type."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--P", type=int, default=110_000)
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--B", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--warm-reps", type=int, default=2)
    parser.add_argument("--types", nargs="*", default=list(PROJ_TYPES))
    args = parser.parse_args()
    device = torch.device(args.device)
    print(json.dumps({"machine_matmul_gflops_f32": matmul_gflops(device), "device": str(device),
                      "threads": torch.get_num_threads()}), flush=True)
    for proj_type in args.types:
        print(json.dumps(bench(proj_type, args.P, args.k, args.B, device, args.warm_reps)), flush=True)


if __name__ == "__main__":
    main()
