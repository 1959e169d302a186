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
Dask ``client.get_executor()``, Ray's or submitit's); ``num_workers=N`` a local
pool of N (spawn) processes, which exit when the driver dies; with neither (the
default) models train in this process. A pool needs ``train_func`` and the
dataset to be picklable (module-level functions) and a script to guard its entry
point with ``if __name__ == "__main__":``; a lambda or closure trains in this
process instead, with a warning. The progress line says where models train.
Seeds passed to ``train_func`` are below ``2**32``. Workers seed torch's *global* RNG before each
model, so a thread-based executor must run one task per process at a time
(e.g. Dask ``threads_per_worker=1``) for results to be reproducible.

Fast path: ``vectorized=VectorizedTraining(...)`` trains many small models at
once (see :mod:`dattri.model_util.vtrain`) instead of calling ``train_func``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from dattri._warn import warn_user
from dattri._loader import check_loader, hash_batch
from dattri.errors import DattriValueError, GroundTruthError
from dattri.model_util._retrain_runner import Job, run_jobs
from dattri.model_util._retrain_store import (
    FORMAT_VERSION,
    METADATA_NAME,
    SEED_SCHEME,
    describe_job,
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
    "train_seed",
]

_EXT = {"safetensors": "safetensors", "torch": "pt"}


def derive_seed(seed: int, *keys: int) -> int:
    """Independent 63-bit seed for ``keys`` (e.g. subset, run) from a base seed."""
    state = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) % (2**63 - 1)


def train_seed(seed: int, *keys: int) -> int:
    """The seed a retrained model is trained with: below ``2**32``, so that
    ``numpy.random.seed``, ``random.seed`` and ``torch.manual_seed`` all accept it;
    a deterministic function of the base seed and ``keys`` (subset, run)."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0])


def data_fingerprint(dataloader: Any) -> str:
    """SHA-256 (32 hex digits) of every batch of ``dataloader`` in order (structure,
    dtypes, shapes, bytes), read with torch, numpy and random seeded at 0 (restored
    afterwards) so that random transforms read the same way every time."""
    h = hashlib.sha256()
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        np.random.seed(0)  # noqa: NPY002
        random.seed(0)
        try:
            for batch in dataloader:
                hash_batch(h, batch)
        finally:
            np.random.set_state(np_state)  # noqa: NPY002
            random.setstate(py_state)
    return h.hexdigest()[:32]


def _func_fingerprint(func: Any) -> dict[str, Any]:
    """What a training function is fixed with besides its name: a partial's
    arguments, default values and the values a closure captured."""
    out: dict[str, Any] = {"name": _qualname(func)}
    if isinstance(func, functools.partial):
        out.update(func=_qualname(func.func), args=_jsonable(func.args, True),
                   keywords=_jsonable(func.keywords, True))
        func = func.func
    out["defaults"] = _jsonable(getattr(func, "__defaults__", None), True)
    out["kwdefaults"] = _jsonable(getattr(func, "__kwdefaults__", None), True)
    cells = getattr(func, "__closure__", None) or ()
    names = getattr(getattr(func, "__code__", None), "co_freevars", ())
    captured = {}
    for name, cell in zip(names, cells):
        try:
            captured[name] = _jsonable(cell.cell_contents, True)
        except ValueError:  # an empty cell
            captured[name] = None
    out["closure"] = captured
    return out


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


def _jsonable(value: Any, digest: bool = False) -> Any:
    """A JSON-able description of ``value``; with ``digest``, tensors, arrays and
    modules are described by a hash of their contents (else by their type)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, digest) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v, digest) for k, v in value.items()}
    if isinstance(value, (torch.device, torch.dtype)):
        return str(value)
    if digest and isinstance(value, (torch.Tensor, np.ndarray, torch.nn.Module)):
        h = hashlib.sha256()
        hash_batch(h, value.state_dict() if isinstance(value, torch.nn.Module)
                   else torch.as_tensor(value))
        return f"<{type(value).__name__} {h.hexdigest()[:16]}>"
    if digest and callable(value):
        return _qualname(value)
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


def _fingerprint(spec: dict, dataloader: DataLoader, train_func: Any, kwargs: dict) -> dict:
    """The training data's and the training function's fingerprints (new folders)."""
    if spec["kind"] == "vectorized":
        h = hashlib.sha256()
        hash_batch(h, (spec["x"], spec["y"]))
        return {"data": h.hexdigest()[:32], "train": spec["vectorized"].settings()}
    train = _func_fingerprint(train_func)
    train["kwargs"] = _jsonable(kwargs, digest=True)
    return {"data": data_fingerprint(dataloader), "train": train}


def _existing(root: Path) -> dict[str, Any] | None:
    return load_metadata(root) if (root / METADATA_NAME).is_file() else None


def _resolve_seed(seed: Any, old: dict[str, Any] | None, mode: str) -> int:
    if seed is None:
        if old is not None and old.get("mode") == mode and old.get("seed") is not None:
            return int(old["seed"])
        return int.from_bytes(os.urandom(4), "little")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        msg = f"seed must be a non-negative int or None, got {seed!r}."
        raise DattriValueError(msg)
    return int(seed)


def _scheme(old: dict[str, Any] | None, fingerprint: dict, root: Path) -> tuple[bool, dict | None]:
    """``(legacy, fingerprint)``: a folder written before seeds were kept below 2**32
    and data were fingerprinted resumes with its recorded seeds, unchecked."""
    if old is None or "seed_scheme" in old:
        return False, fingerprint
    warn_user(
        f"{str(root)!r} was written by an earlier dattri "
        "version: it resumes with its recorded (63-bit) seeds, and its training data "
        "cannot be checked against this call's (the folder has no data fingerprint). "
        "Retrain into a new folder to get both.")
    return True, None


def _reconcile(root: Path, meta: dict[str, Any], old: dict[str, Any] | None) -> None:
    """Write ``meta``, or check that the folder's metadata describes the same plan."""
    if old is not None:
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        if "fingerprint" in diff:
            what = [k for k in ("data", "train")
                    if (old.get("fingerprint") or {}).get(k) != meta["fingerprint"].get(k)]
            msg = (
                f"{str(root)!r} holds models trained on other "
                f"{' and '.join({'data': 'training data', 'train': 'training-function settings'}[k] for k in what)} "
                "(its metadata's fingerprint differs from this call's); reusing them would "
                "give wrong ground truth. Start a new folder: pass a new path (or delete "
                "this one), or pass the same training data and train_func settings to resume."
            )
            raise GroundTruthError(msg)
        if diff:
            msg = (
                f"{str(root / METADATA_NAME)!r} was written for a different retraining "
                f"(differs in {diff}); resume with the same arguments, or start a new "
                "folder (pass a new path)."
            )
            raise GroundTruthError(msg)
        return
    root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(meta, root / METADATA_NAME)


def _run(root, meta, old, jobs, spec, executor, num_workers, models_per_task, progress, desc):
    _reconcile(root, meta, old)
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
        num_workers: local pool size; None or 0 (the default: no executor asked
            for) trains in this process, as does a pool for a ``train_func`` or
            dataset that cannot be pickled (a lambda or a closure; with a warning).
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
    old = _existing(root)
    seed = _resolve_seed(seed, old, "loo")
    spec, settings = _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs)
    legacy, fp = _scheme(old, _fingerprint(spec, dataloader, train_func, kwargs), root)
    model_seed = seed if legacy or seed < 2**32 else train_seed(seed)
    ext = _EXT[save_format]

    def make(file: str, removed: int | None) -> Job:
        jid = describe_job("loo", n, model_seed, settings, fp, removed=removed)
        return Job(file=file, job_id=jid, seed=model_seed,
                   exclude=() if removed is None else (removed,))

    full = make(f"full/model_weights.{ext}", None)
    jobs = [make(f"index_{i}/model_weights.{ext}", i) for i in left_out]
    meta = {
        "format_version": FORMAT_VERSION, "mode": "loo", "data_length": n,
        "dataset_indices": order.tolist(), "seed": seed, "save_format": save_format,
        "train_settings": settings, "indices": left_out,
        "full_model": {"file": full.file, "seed": model_seed, "job_id": full.job_id},
        "models": [{"file": j.file, "removed": i, "seed": model_seed, "job_id": j.job_id}
                   for j, i in zip(jobs, left_out)],
    }
    if not legacy:
        meta.update(seed_scheme=SEED_SCHEME, fingerprint=fp)
    return _run(root, meta, old, [full, *jobs], spec, executor, num_workers, models_per_task,
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
    ``train_seed(seed, s, r)`` (below ``2**32``). Both are recorded in the
    metadata, with a fingerprint of the training data and of ``train_func``'s
    settings: rerunning into the folder with other data is a ``GroundTruthError``.

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
    old = _existing(root)
    seed = _resolve_seed(seed, old, "lds")
    spec, settings = _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs)
    legacy, fp = _scheme(old, _fingerprint(spec, dataloader, train_func, kwargs), root)
    run_seed_of = derive_seed if legacy else train_seed
    ext = _EXT[save_format]
    subsets, models, jobs = [], [], []
    for s in range(start_id, start_id + num_subsets):
        idx = lds_subset(seed, s, n, size)
        subsets.append({"id": s, "dir": str(s), "indices": idx.tolist()})
        for r in range(num_runs_per_subset):
            run_seed = run_seed_of(seed, s, r)
            jid = describe_job("lds", n, run_seed, settings, fp, subset=idx.tolist())
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
    if not legacy:
        meta.update(seed_scheme=SEED_SCHEME, fingerprint=fp)
    return _run(root, meta, old, jobs, spec, executor, num_workers, models_per_task,
                progress, "LDS retraining")
