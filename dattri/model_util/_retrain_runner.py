"""Run retraining jobs on any ``concurrent.futures``-style executor (private).

A *job* is one model file to produce. Jobs are grouped into *tasks* (several jobs
per submitted call, so the training data is shipped once per task, not once per
model); a task is the module-level function :func:`run_task`, so it pickles to a
process pool, a Dask ``client.get_executor()``, Ray or submitit alike. Workers
write every finished model straight into the retrain folder (atomically) and skip
jobs whose file is already finished, so a killed run resumes where it stopped and
no finished model is trained twice. Progress is the count of finished files.
"""

from __future__ import annotations

import inspect
import math
import multiprocessing
import os
import pickle
import random
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dattri._warn import warn_user
from dattri.errors import DattriRuntimeError, DattriValueError
from dattri.model_util._retrain_store import (
    file_status,
    remove_stale_temporaries,
    save_model_file,
)

__all__ = ["Job", "run_jobs", "run_task"]

_POLL_S = 0.2


@dataclass(frozen=True)
class Job:
    """One model to train.

    Attributes:
        file: path relative to the retrain folder.
        job_id: identity stored in the file (see ``_retrain_store.job_id``).
        seed: training seed.
        include: loader positions to train on (None: all).
        exclude: loader positions to leave out (applied after ``include``).
    """

    file: str
    job_id: str
    seed: int
    include: tuple[int, ...] | None = None
    exclude: tuple[int, ...] = ()

    def positions(self, n: int) -> np.ndarray:
        pos = np.arange(n) if self.include is None else np.asarray(self.include, dtype=np.int64)
        if self.exclude:
            pos = pos[~np.isin(pos, np.asarray(self.exclude, dtype=np.int64))]
        return pos


# ----------------------------------------------------------------------------- worker side
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - users' train_func may use it
    random.seed(seed)


def _accepts_seed(func: Any) -> bool:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "seed" or p.kind is p.VAR_KEYWORD for p in params)


def _train_generic(spec: Mapping[str, Any], job: Job, path: Path) -> None:
    dataset_idx = np.asarray(spec["dataset_indices"])[job.positions(spec["data_length"])]
    subset = Subset(spec["dataset"], dataset_idx.tolist())
    gen = torch.Generator().manual_seed(job.seed) if spec["shuffle"] else None
    loader = DataLoader(subset, batch_size=spec["batch_size"], shuffle=spec["shuffle"],
                        generator=gen, collate_fn=spec["collate_fn"])
    func, kwargs = spec["train_func"], dict(spec["kwargs"])
    if _accepts_seed(func):
        kwargs["seed"] = job.seed
    _seed_everything(job.seed)
    try:
        model = func(loader, **kwargs)
    except Exception as e:
        msg = f"train_func failed while training {job.file!r}: {type(e).__name__}: {e}"
        raise DattriRuntimeError(msg) from e
    if isinstance(model, nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = dict(model)
    else:
        msg = (
            f"train_func returned a {type(model).__name__} for {job.file!r}; it must "
            "return the trained nn.Module (or its state dict)."
        )
        raise DattriRuntimeError(msg)
    save_model_file(state, path, job.job_id, spec["save_format"])


def _train_vectorized(spec: Mapping[str, Any], jobs: list[Job], root: Path) -> None:
    cfg = spec["vectorized"]
    n = spec["data_length"]
    groups: dict[int, list[tuple[Job, np.ndarray]]] = {}
    for job in jobs:
        pos = job.positions(n)
        groups.setdefault(len(pos), []).append((job, pos))
    for members in groups.values():
        subsets = torch.as_tensor(np.stack([p for _, p in members]), dtype=torch.int64)
        states = cfg.train(spec["x"], spec["y"], subsets, [j.seed for j, _ in members],
                           progress=False)
        for (job, _), state in zip(members, states):
            save_model_file(state, root / job.file, job.job_id, spec["save_format"])


def run_task(root: str, spec: Mapping[str, Any], jobs: list[Job]) -> list[str]:
    """Train the unfinished ``jobs`` of one task and write their files (worker side).

    Args:
        root: absolute path of the retrain folder.
        spec: training description (see ``retrain._build_spec``).
        jobs: the jobs of this task.

    Returns:
        The files (relative) trained by this call.
    """
    root_path = Path(root)
    todo = [j for j in jobs if file_status(root_path / j.file, j.job_id) != "ok"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    if spec["kind"] == "vectorized":
        if todo:
            _train_vectorized(spec, todo, root_path)
    else:
        for job in todo:
            _train_generic(spec, job, root_path / job.file)
    return [j.file for j in todo]


#: seconds between a pool worker's checks that its parent (the driver) is alive
PARENT_POLL_S = 1.0


def _watch_parent(parent_pid: int, poll_s: float = PARENT_POLL_S) -> None:
    """Exit this process as soon as it is no longer a child of ``parent_pid`` (the
    driver died: the worker was re-parented), so a killed run leaves no orphans."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(poll_s)


def _init_worker(threads: int, parent_pid: int | None = None) -> None:
    torch.set_num_threads(threads)
    if parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="dattri-parent-watch").start()


# ----------------------------------------------------------------------------- driver side
def _make_pool(num_workers: int | None) -> ProcessPoolExecutor:
    workers = num_workers or os.cpu_count() or 1
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads, os.getpid()))


def _unpicklable(spec: Mapping[str, Any]) -> str | None:
    """The first entry of ``spec`` that a process pool could not receive, or None."""
    for key in ("train_func", "vectorized", "dataset", "collate_fn", "kwargs"):
        try:
            pickle.dumps(spec.get(key))
        except Exception:  # noqa: BLE001 - lambdas, closures, local classes, handles
            return key
    return None


def _chunks(jobs: list[Job], size: int) -> list[list[Job]]:
    return [jobs[i:i + size] for i in range(0, len(jobs), size)]


def _pending(root: Path, jobs: list[Job]) -> list[Job]:
    pending = []
    corrupt = []
    for job in jobs:
        status = file_status(root / job.file, job.job_id)
        if status != "ok":
            pending.append(job)
        if status == "corrupt":
            corrupt.append(job.file)
            bad = root / job.file
            os.replace(bad, bad.with_name(bad.name + ".corrupt"))
    if corrupt:
        warn_user(
            f"{len(corrupt)} model file(s) are corrupt, half-written or from another "
            f"run ({corrupt[:5]}); they were renamed to *.corrupt and will be retrained."
        )
    return pending


def run_jobs(
    root: Path,
    jobs: list[Job],
    spec: dict[str, Any],
    executor: Any = None,
    num_workers: int | None = None,
    models_per_task: int | None = None,
    progress: bool | None = None,
    desc: str = "retraining",
) -> None:
    """Train every unfinished job, on ``executor`` or a local pool / in-process.

    Args:
        root: retrain folder.
        jobs: all jobs of the plan (finished ones are skipped).
        spec: training description shipped to the workers.
        executor: any object with ``submit(fn, *args)`` returning a future with
            ``done()`` and ``result()``; None for a local process pool.
        num_workers: local pool size; 0 or None (no executor asked for) trains in
            this process, as does a pool whose spec cannot be pickled (a lambda or a
            closure as train_func; with a warning). The progress line says which.
        models_per_task: jobs per submitted task (None: automatic).
        progress: tqdm bar with ETA (None: only on a terminal).
        desc: bar label.

    Raises:
        DattriRuntimeError: a worker died or training failed; finished models are
            kept and a rerun resumes.
    """
    remove_stale_temporaries(root)
    pending = _pending(root, jobs)
    if not pending:
        return
    if executor is not None and not callable(getattr(executor, "submit", None)):
        msg = (
            f"executor must be a concurrent.futures-style executor with submit(), got "
            f"{type(executor).__name__}."
        )
        raise DattriValueError(msg)
    where = f"{desc}: on the executor"
    serial = executor is None and not num_workers
    if serial:
        where = f"{desc}: in this process"
    elif executor is None:
        bad = _unpicklable(spec)
        if bad is not None:
            serial = True
            where = f"{desc}: in this process ({bad} cannot be pickled for worker processes)"
            warn_user(
                f"{bad} cannot be pickled (a lambda, a closure or a local object?), so "
                f"the {num_workers} worker process(es) cannot receive it: training in "
                "this process instead. Define it at module level to use worker processes.",
                RuntimeWarning)
        else:
            where = f"{desc}: {num_workers} worker process(es)"
    if spec["kind"] == "vectorized":
        # equal chunks (200 models at 64: 4 x 50, not 64, 64, 64, 8): the same
        # number of vmapped calls, and worker processes get equal shares
        cap = spec["vectorized"].chunk_size
        size = models_per_task or math.ceil(len(pending) / max(1, math.ceil(len(pending) / cap)))
    elif serial:
        size = 1
    else:
        slots = getattr(executor, "_max_workers", None) or num_workers or os.cpu_count() or 1
        size = models_per_task or max(1, math.ceil(len(pending) / (4 * slots)))
    tasks = _chunks(pending, size)
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(pending), desc=where, unit="model",
               disable=(not progress) if progress is not None else None, leave=True)
    try:
        if serial:
            for task in tasks:
                run_task(str(root), spec, task)
                bar.update(len(task))
            return
        own = executor is None
        if own:
            executor = _make_pool(num_workers)
        try:
            _drive(executor, root, spec, tasks, pending, bar)
        finally:
            if own:
                executor.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()


def _drive(executor: Any, root: Path, spec: dict[str, Any], tasks: list[list[Job]],
           pending: list[Job], bar: Any) -> None:
    futures = [executor.submit(run_task, str(root), spec, task) for task in tasks]
    waiting = list(futures)
    done_before = bar.n
    try:
        while waiting:
            still = []
            for fut in waiting:
                if fut.done():
                    fut.result()  # re-raises worker errors
                else:
                    still.append(fut)
            waiting = still
            finished = sum((root / j.file).is_file() for j in pending)
            if done_before + finished > bar.n:
                bar.update(done_before + finished - bar.n)
            if waiting:
                time.sleep(_POLL_S if len(pending) < 1000 else 5 * _POLL_S)
    except BrokenProcessPool as e:
        msg = (
            "a retraining worker process died (killed or out of memory); the models "
            f"finished so far are kept in {str(root)!r}: rerun the same call to resume."
        )
        raise DattriRuntimeError(msg) from e
    except BaseException:
        for fut in waiting:
            cancel = getattr(fut, "cancel", None)
            if cancel is not None:
                cancel()
        raise
