"""Spawn the ranks of a torch.distributed (gloo, 127.0.0.1) test run, bounded in time."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(script: str, rank_args: Sequence[Sequence[str]], guard_s: float) -> None:
    """Run ``python script *rank_args[r]`` for every rank at once (one thread each, the
    checkout importable) and assert that each exits 0; a rank still running after
    ``guard_s`` seconds is killed, and every rank is killed when this returns."""
    root = os.path.dirname(HERE)  # the checkout, importable even without an install
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, script, *map(str, args)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for args in rank_args]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=guard_s)
            logs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [f"rank {r} (exit {p.returncode}):\n{log[-2500:]}"
              for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode != 0]
    assert not failed, "\n".join(failed)
