"""``dattri attribute``: run a user module's attribution, sharded under ``torchrun``.

The module (a ``.py`` file) defines ``build()`` returning a dict with
``"attributor"`` (an attributor, e.g. ``TRAKAttributor(..., offload="disk",
cache_dir=...)``), ``"train_loader"`` and ``"test_loader"``. Every rank imports
it, caches its share of the training set and scores; rank 0 writes the result
(the score matrix, or with ``--top-k`` the rankings) atomically to ``--out``.
With a feature store (``offload="disk"``) a killed run started again resumes
where it stopped::

    torchrun --nproc-per-node 2 -m dattri.benchmark.cli attribute task.py --top-k 10 --out top.pt
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """The ``attribute`` subcommand of ``dattri``."""
    a = sub.add_parser("attribute", help="run a module's attributor (sharded under torchrun)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("module", help="a .py file defining build() -> {'attributor', "
                                  "'train_loader', 'test_loader'}")
    a.add_argument("--top-k", type=int, default=None,
                   help="keep each test example's k proponents and opponents (no full matrix)")
    a.add_argument("--out", default="attribution.pt", help="result file (written by rank 0)")
    a.add_argument("--backend", default=None, help="torch.distributed backend (default: "
                                                   "nccl with CUDA, else gloo)")


def _load(path: str) -> dict[str, Any]:
    from dattri.errors import DattriValueError

    if not os.path.isfile(path):
        msg = f"module={path!r} is not a file; pass the path of a .py file defining build()."
        raise DattriValueError(msg)
    spec = importlib.util.spec_from_file_location("dattri_user_task", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    build = getattr(mod, "build", None)
    if not callable(build):
        msg = f"{path} defines no build(); define build() returning a dict with 'attributor', 'train_loader', 'test_loader'."
        raise DattriValueError(msg)
    out = build()
    missing = [k for k in ("attributor", "train_loader", "test_loader")
               if not isinstance(out, dict) or k not in out]
    if missing:
        msg = f"{path}: build() must return a dict with the keys {missing} (got {type(out).__name__})."
        raise DattriValueError(msg)
    return out


def run(args: argparse.Namespace) -> int:
    """Initialise the process group (under torchrun), cache, attribute, save."""
    import torch
    import torch.distributed as dist

    started = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
        started = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    try:
        spec = _load(args.module)
        att = spec["attributor"]
        att.show_progress = True
        print(f"[rank {rank}/{world}] caching {type(att).__name__}", file=sys.stderr, flush=True)
        att.cache(spec["train_loader"])
        print(f"[rank {rank}/{world}] attributing", file=sys.stderr, flush=True)
        kw = {} if args.top_k is None else {"top_k": args.top_k}
        result = att.attribute(spec["train_loader"], spec["test_loader"], **kw)
        if rank == 0:
            obj = result if isinstance(result, torch.Tensor) else dict(vars(result))
            tmp = f"{args.out}.tmp"
            torch.save(obj, tmp)
            os.replace(tmp, args.out)
            print(f"wrote {args.out}", flush=True)
    finally:
        if started:
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dattri.benchmark.attribute_cli MODULE ...`` (same as ``dattri attribute``)."""
    top = argparse.ArgumentParser(prog="dattri")
    add_parser(top.add_subparsers(dest="command"))
    return run(top.parse_args(["attribute", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
