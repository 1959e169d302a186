"""Retrain the models that LOO and LDS ground truth need; resumable and parallel.

``retrain_loo`` trains one model per left-out training example (plus the model
on the full training set); ``retrain_lds`` trains models on random subsets of a
fraction ``subset_ratio`` of the training set (Park et al. 2023, TRAK; dattri
paper Appendix B). Both write a *retrain folder*::

    path/metadata.json                      plan: subsets, seeds, settings, files
    path/full/model_weights.safetensors     (LOO) the full-data model
    path/index_{i}/model_weights.safetensors (LOO) model without training row i
    path/{s}/model_weights_{r}.safetensors  (LDS) run r on subset s

Indices are *positions in the training loader order* (the rows of a score
matrix); ``metadata["dataset_indices"][pos]`` maps a position to the index in
``dataloader.dataset``. File paths in the metadata are relative to the folder.

Resuming: the plan is deterministic given ``seed`` and the settings, so calling
the function again with the same arguments (or ``seed=None``, which adopts the
recorded seed) trains only the models whose file is missing or fails
verification. Each file is written atomically and carries a checksum and the id
of its job. A folder made with different settings raises ``GroundTruthError``.

Parallelism: ``executor=`` takes any ``concurrent.futures``-style executor (a
Dask ``client.get_executor()``, Ray's or submitit's); by default a local process
pool of ``num_workers`` (spawn) processes, and ``num_workers=0`` trains in this
process. With a process pool, ``train_func`` and the dataset must be picklable
(module-level functions) and a script must guard its entry point with
``if __name__ == "__main__":``. Workers seed torch's *global* RNG before each
model, so a thread-based executor must run one task per process at a time
(e.g. Dask ``threads_per_worker=1``) for results to be reproducible.

Fast path: ``vectorized=VectorizedTraining(...)`` trains many small models at
once (see :mod:`dattri.model_util.vtrain`) instead of calling ``train_func``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dattri._loader import check_loader
from dattri.errors import DattriValueError, GroundTruthError
from dattri.model_util._retrain_runner import Job, run_jobs
from dattri.model_util._retrain_store import (
    FORMAT_VERSION,
    METADATA_NAME,
    job_id,
    load_metadata,
    write_json_atomic,
)
from dattri.model_util.vtrain import VectorizedTraining

__all__ = [
    "VectorizedTraining",
    "derive_seed",
    "lds_subset",
    "loader_dataset_indices",
    "retrain_lds",
    "retrain_loo",
]

_EXT = {"safetensors": "safetensors", "torch": "pt"}


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 63-bit seed for ``keys`` (e.g. subset, run) from a base seed."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % (2**63 - 1)


# ----------------------------------------------------------------------------- inputs
def loader_dataset_indices(dataloader: Any) -> np.ndarray:
    """Dataset index of every loader position (the order scores use).

    Args:
        dataloader: a map-style ``DataLoader`` with a fixed order.

    Returns:
        ``(n,)`` int64 array: ``dataset_indices[pos]`` is the ``dataloader.dataset``
        index of the example at loader position ``pos``.
    """
    if not isinstance(dataloader, DataLoader):
        msg = (
            f"dataloader must be a torch.utils.data.DataLoader, got "
            f"{type(dataloader).__name__}; retraining needs its dataset and sampler."
        )
        raise DattriValueError(msg)
    if isinstance(dataloader.dataset, IterableDataset):
        msg = "dataloader wraps an IterableDataset; retraining needs a map-style dataset."
        raise DattriValueError(msg)
    check_loader(dataloader, "dataloader")
    if dataloader.batch_sampler is not None:
        order = [int(i) for batch in dataloader.batch_sampler for i in batch]
    else:
        order = [int(i) for i in dataloader.sampler]
    if not order:
        msg = "dataloader is empty; pass the training loader."
        raise DattriValueError(msg)
    return np.asarray(order, dtype=np.int64)


def _loader_tensors(dataloader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for batch in dataloader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            msg = (
                "the vectorized path needs batches (inputs, targets) of two tensors; "
                f"got a {type(batch).__name__}. Use train_func for other data."
            )
            raise DattriValueError(msg)
        xs.append(batch[0])
        ys.append(batch[1])
    return torch.cat(xs), torch.cat(ys)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    return f"<{type(value).__name__}>"


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _check_common(train_func: Any, path: Any, vectorized: Any, save_format: str) -> Path:
    if path is None:
        msg = "path is required: the folder to write the retrained models into."
        raise DattriValueError(msg)
    if vectorized is None and not callable(train_func):
        msg = (
            f"train_func must be callable train_func(dataloader) -> model, got "
            f"{type(train_func).__name__}; or pass vectorized=VectorizedTraining(...)."
        )
        raise DattriValueError(msg)
    if vectorized is not None and not isinstance(vectorized, VectorizedTraining):
        msg = (
            f"vectorized must be a dattri.model_util.vtrain.VectorizedTraining, got "
            f"{type(vectorized).__name__}."
        )
        raise DattriValueError(msg)
    if save_format not in _EXT:
        msg = f"save_format must be 'safetensors' or 'torch', got {save_format!r}."
        raise DattriValueError(msg)
    return Path(path).resolve()


def _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs) -> tuple[dict, dict]:
    """Training description for the workers, and its JSON-able settings."""
    n = len(order)
    if vectorized is not None:
        x, y = _loader_tensors(dataloader)
        spec = {"kind": "vectorized", "vectorized": vectorized, "x": x, "y": y,
                "data_length": n, "save_format": save_format}
        return spec, vectorized.settings()
    spec = {"kind": "generic", "train_func": train_func, "kwargs": kwargs,
            "dataset": dataloader.dataset, "dataset_indices": order, "data_length": n,
            "batch_size": dataloader.batch_size or 1, "collate_fn": dataloader.collate_fn,
            "shuffle": shuffle, "save_format": save_format}
    settings = {"trainer": "train_func", "train_func": _qualname(train_func),
                "kwargs": _jsonable(kwargs), "batch_size": dataloader.batch_size,
                "shuffle": shuffle}
    return spec, settings


def _existing_seed(root: Path, mode: str) -> int | None:
    if not (root / METADATA_NAME).is_file():
        return None
    meta = load_metadata(root)
    return int(meta["seed"]) if meta.get("mode") == mode and meta.get("seed") is not None else None


def _resolve_seed(seed: Any, root: Path, mode: str) -> int:
    if seed is None:
        found = _existing_seed(root, mode)
        return found if found is not None else int.from_bytes(os.urandom(4), "little")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed must be a non-negative int or None, got {seed!r}."
        raise DattriValueError(msg)
    return int(seed)


def _reconcile(root: Path, meta: dict[str, Any]) -> None:
    """Write ``meta``, or check that the folder's metadata describes the same plan."""
    if (root / METADATA_NAME).is_file():
        old = load_metadata(root)
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if diff:
            msg = (
                f"{str(root / METADATA_NAME)!r} was written for a different retraining "
                f"(differs in {diff}); resume with the same arguments, or use a new path."
            )
            raise GroundTruthError(msg)
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, root / METADATA_NAME)


def _run(root, meta, jobs, spec, executor, num_workers, models_per_task, progress, desc):
    _reconcile(root, meta)
    run_jobs(root, jobs, spec, executor=executor, num_workers=num_workers,
             models_per_task=models_per_task, progress=progress, desc=desc)
    return meta


# ----------------------------------------------------------------------------- LOO
def retrain_loo(
    train_func: Callable | None = None,
    dataloader: DataLoader | None = None,
    path: str | os.PathLike | None = None,
    indices: Sequence[int] | None = None,
    seed: int | None = None,
    *,
    executor: Any = None,
    num_workers: int | None = None,
    vectorized: VectorizedTraining | None = None,
    save_format: str = "safetensors",
    shuffle: bool = False,
    models_per_task: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train the leave-one-out models: one without each training row in ``indices``.

    Every model (and the full-data model ``full/``) uses the same training seed
    ``seed``, so with ``shuffle=False`` (default) they differ only by the removed
    example. ``train_func(dataloader, **kwargs)`` is called with ``seed=`` too if
    it accepts it; torch, numpy and random are seeded before each call.

    Args:
        train_func: ``train_func(dataloader, [seed=...,] **kwargs) -> nn.Module``
            (or a state dict). Unused with ``vectorized``.
        dataloader: the training loader (fixed order; its positions index scores).
        path: the retrain folder.
        indices: loader positions to leave out (None: every position).
        seed: training seed (None: random, recorded; an existing folder's seed).
        executor: ``concurrent.futures``-style executor (None: local process pool).
        num_workers: local pool size (None: CPU count; 0: in this process).
        vectorized: train with :class:`VectorizedTraining` instead of train_func.
        save_format: ``"safetensors"`` or ``"torch"``.
        shuffle: give train_func a seeded shuffling loader (generic path).
        models_per_task: models per submitted task (None: automatic).
        progress: show a progress bar with ETA (None: only on a terminal).
        **kwargs: extra arguments of ``train_func``.

    Returns:
        The metadata dict (also written to ``path/metadata.json``).

    Raises:
        DattriValueError: bad arguments. GroundTruthError: ``path`` holds a
        different retraining. DattriRuntimeError: a worker died (rerun to resume).
    """
    root = _check_common(train_func, path, vectorized, save_format)
    order = loader_dataset_indices(dataloader)
    n = len(order)
    left_out = list(range(n)) if indices is None else [int(i) for i in indices]
    if not left_out or min(left_out) < 0 or max(left_out) >= n or len(set(left_out)) != len(left_out):
        msg = (
            f"indices must be distinct loader positions in [0, {n}), got "
            f"{len(left_out)} value(s) spanning [{min(left_out, default=None)}, "
            f"{max(left_out, default=None)}]."
        )
        raise DattriValueError(msg)
    seed = _resolve_seed(seed, root, "loo")
    spec, settings = _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs)
    ext = _EXT[save_format]

    def make(file: str, removed: int | None) -> Job:
        jid = job_id({"mode": "loo", "n": n, "seed": seed, "removed": removed, "settings": settings})
        return Job(file=file, job_id=jid, seed=seed, exclude=() if removed is None else (removed,))

    full = make(f"full/model_weights.{ext}", None)
    jobs = [make(f"index_{i}/model_weights.{ext}", i) for i in left_out]
    meta = {
        "format_version": FORMAT_VERSION, "mode": "loo", "data_length": n,
        "dataset_indices": order.tolist(), "seed": seed, "save_format": save_format,
        "train_settings": settings, "indices": left_out,
        "full_model": {"file": full.file, "seed": seed, "job_id": full.job_id},
        "models": [{"file": j.file, "removed": i, "seed": seed, "job_id": j.job_id}
                   for j, i in zip(jobs, left_out)],
    }
    return _run(root, meta, [full, *jobs], spec, executor, num_workers, models_per_task,
                progress, "LOO retraining")


# ----------------------------------------------------------------------------- LDS
def _check_lds_args(num_subsets, subset_ratio, num_runs_per_subset, start_id, total_num_subsets) -> None:
    for name, value, low in (("num_subsets", num_subsets, 1),
                             ("num_runs_per_subset", num_runs_per_subset, 1),
                             ("start_id", start_id, 0), ("total_num_subsets", total_num_subsets, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            msg = f"{name} must be an int >= {low}, got {value!r}."
            raise DattriValueError(msg)
    if total_num_subsets and total_num_subsets % num_subsets:
        msg = (
            f"num_subsets={num_subsets} must divide total_num_subsets={total_num_subsets} "
            "(sharded runs); or pass an executor and let one call train all subsets."
        )
        raise DattriValueError(msg)
    if not isinstance(subset_ratio, (int, float)) or not 0 < subset_ratio <= 1:
        msg = f"subset_ratio must be in (0, 1], got {subset_ratio!r}."
        raise DattriValueError(msg)


def lds_subset(seed: int, subset_id: int, data_length: int, subset_size: int) -> np.ndarray:
    """The sorted loader positions of LDS subset ``subset_id`` (deterministic)."""
    rng = np.random.default_rng([int(seed), int(subset_id)])
    return np.sort(rng.choice(data_length, subset_size, replace=False))


def retrain_lds(
    train_func: Callable | None = None,
    dataloader: DataLoader | None = None,
    path: str | os.PathLike | None = None,
    num_subsets: int = 100,
    subset_ratio: float = 0.5,
    num_runs_per_subset: int = 1,
    start_id: int = 0,
    total_num_subsets: int = 0,
    seed: int | None = None,
    *,
    executor: Any = None,
    num_workers: int | None = None,
    vectorized: VectorizedTraining | None = None,
    save_format: str = "safetensors",
    shuffle: bool = True,
    models_per_task: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Train models on random subsets of ``subset_ratio`` of the training set (LDS).

    Subset ``s`` (``s = start_id .. start_id + num_subsets - 1``) is
    ``sort(default_rng([seed, s]).choice(n, int(n * subset_ratio), replace=False))``
    over loader positions; run ``r`` on it trains with seed
    ``derive_seed(seed, s, r)``. Both are recorded in the metadata.

    Args:
        train_func: ``train_func(dataloader, [seed=...,] **kwargs) -> nn.Module``.
        dataloader: the training loader (fixed order).
        path: the retrain folder.
        num_subsets: number of subsets (models per run).
        subset_ratio: alpha, the fraction of the training set in each subset.
        num_runs_per_subset: models per subset (their targets are averaged).
        start_id: id of the first subset (shards of one plan share a seed).
        total_num_subsets: kept for compatibility; only checked to be a multiple
            of ``num_subsets``.
        seed: base seed (None: random, recorded; an existing folder's seed).
        executor, num_workers, vectorized, save_format, models_per_task, progress:
            as in :func:`retrain_loo`.
        shuffle: give train_func a loader shuffled with the model's seed.
        **kwargs: extra arguments of ``train_func``.

    Returns:
        The metadata dict (also written to ``path/metadata.json``).
    """
    root = _check_common(train_func, path, vectorized, save_format)
    _check_lds_args(num_subsets, subset_ratio, num_runs_per_subset, start_id, total_num_subsets)
    order = loader_dataset_indices(dataloader)
    n = len(order)
    size = max(1, int(n * subset_ratio))
    seed = _resolve_seed(seed, root, "lds")
    spec, settings = _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs)
    ext = _EXT[save_format]
    subsets, models, jobs = [], [], []
    for s in range(start_id, start_id + num_subsets):
        idx = lds_subset(seed, s, n, size)
        subsets.append({"id": s, "dir": str(s), "indices": idx.tolist()})
        for r in range(num_runs_per_subset):
            run_seed = derive_seed(seed, s, r)
            jid = job_id({"mode": "lds", "n": n, "seed": run_seed, "subset": idx.tolist(),
                          "settings": settings})
            file = f"{s}/model_weights_{r}.{ext}"
            jobs.append(Job(file=file, job_id=jid, seed=run_seed, include=tuple(idx.tolist())))
            models.append({"file": file, "subset": s, "run": r, "seed": run_seed, "job_id": jid})
    meta = {
        "format_version": FORMAT_VERSION, "mode": "lds", "data_length": n,
        "dataset_indices": order.tolist(), "seed": seed, "save_format": save_format,
        "train_settings": settings, "subset_ratio": subset_ratio, "subset_size": size,
        "num_subsets": num_subsets, "num_runs_per_subset": num_runs_per_subset,
        "start_id": start_id, "subsets": subsets, "models": models,
    }
    return _run(root, meta, jobs, spec, executor, num_workers, models_per_task,
                progress, "LDS retraining")
