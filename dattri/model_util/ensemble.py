"""Ensembles of independently trained checkpoints (TRAK-10 / TRAK-50, TracIn, IF).

TRAK averages its scores over checkpoints trained with different seeds (Park et
al. 2023); the dattri paper's TRAK-10/50 use the first 10/50 models of the LDS
retraining (half-data subsets), and the last 50 for the LDS itself. Two helpers:

* :func:`train_ensemble` trains ``num_models`` checkpoints (on the full training
  set, or on random subsets) with seeds ``derive_seed(seed, k)``, resumable and on
  any executor, exactly like :mod:`dattri.model_util.retrain`;
* :func:`checkpoint_paths` lists (and verifies) the model files of any retrain
  folder in metadata order, e.g. ``checkpoint_paths(lds_dir, 0, 50)``.

Both return absolute paths, ready for ``AttributionTask(checkpoints=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from dattri.errors import DattriValueError
from dattri.model_util._retrain_runner import Job
from dattri.model_util._retrain_store import (
    FORMAT_VERSION,
    SEED_SCHEME,
    describe_job,
    load_metadata,
    load_model_file,
)
from dattri.model_util.retrain import (
    _EXT,
    _build_spec,
    _check_common,
    _existing,
    _fingerprint,
    _resolve_seed,
    _run,
    _scheme,
    derive_seed,
    lds_subset,
    loader_dataset_indices,
    train_seed,
)
from dattri.model_util.vtrain import VectorizedTraining

__all__ = ["checkpoint_paths", "recorded_seed", "train_ensemble"]


def train_ensemble(
    train_func: Callable | None = None,
    dataloader: DataLoader | None = None,
    path: str | os.PathLike | None = None,
    num_models: int = 10,
    seed: int | None = 0,
    subset_ratio: float = 1.0,
    *,
    executor: Any = None,
    num_workers: int | None = None,
    vectorized: VectorizedTraining | None = None,
    save_format: str = "safetensors",
    shuffle: bool = True,
    models_per_task: int | None = None,
    progress: bool | None = None,
    **kwargs: Any,
) -> list[str]:
    """Train ``num_models`` checkpoints with seeds ``train_seed(seed, k)`` (< 2**32).

    Model ``k`` trains on the whole loader (``subset_ratio=1``) or on
    ``lds_subset(seed, k, n, int(n * subset_ratio))``; files go to
    ``path/model_{k}/model_weights.safetensors`` with a metadata file (mode
    ``"ensemble"``). A rerun resumes.

    Args:
        train_func: ``train_func(dataloader, [seed=...,] **kwargs) -> nn.Module``.
        dataloader: training loader (fixed order).
        path: output folder.
        num_models: ensemble size (e.g. 10 or 50 for TRAK-10 / TRAK-50).
        seed: base seed (None: random, recorded).
        subset_ratio: fraction of the training set per model (1: all of it).
        executor, num_workers, vectorized, save_format, shuffle, models_per_task,
            progress, **kwargs: as in :func:`dattri.model_util.retrain.retrain_lds`.

    Returns:
        The ``num_models`` checkpoint paths (absolute), in seed order.
    """
    root = _check_common(train_func, path, vectorized, save_format)
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
        msg = f"num_models must be a positive int, got {num_models!r}."
        raise DattriValueError(msg)
    if not isinstance(subset_ratio, (int, float)) or not 0 < subset_ratio <= 1:
        msg = f"subset_ratio must be in (0, 1], got {subset_ratio!r}."
        raise DattriValueError(msg)
    order = loader_dataset_indices(dataloader)
    n = len(order)
    size = max(1, int(n * subset_ratio))
    old = _existing(root)
    seed = _resolve_seed(seed, old, "ensemble")
    spec, settings = _build_spec(train_func, dataloader, order, vectorized, save_format, shuffle, kwargs)
    legacy, fp = _scheme(old, _fingerprint(spec, dataloader, train_func, kwargs), root)
    seed_of = derive_seed if legacy else train_seed
    ext = _EXT[save_format]
    jobs, models = [], []
    for k in range(num_models):
        subset = None if size == n else tuple(lds_subset(seed, k, n, size).tolist())
        model_seed = seed_of(seed, k)
        jid = describe_job("ensemble", n, model_seed, settings, fp, subset=subset)
        file = f"model_{k}/model_weights.{ext}"
        jobs.append(Job(file=file, job_id=jid, seed=model_seed, include=subset))
        models.append({"file": file, "seed": model_seed, "job_id": jid,
                       "indices": list(subset) if subset is not None else None})
    meta = {
        "format_version": FORMAT_VERSION, "mode": "ensemble", "data_length": n,
        "dataset_indices": order.tolist(), "seed": seed, "save_format": save_format,
        "train_settings": settings, "subset_ratio": subset_ratio, "models": models,
    }
    if not legacy:
        meta.update(seed_scheme=SEED_SCHEME, fingerprint=fp)
    _run(root, meta, old, jobs, spec, executor, num_workers, models_per_task, progress, "ensemble")
    return [str(root / m["file"]) for m in models]


def checkpoint_paths(
    retrain_dir: str | os.PathLike,
    start: int = 0,
    stop: int | None = None,
    verify: bool = True,
) -> list[str]:
    """Model files ``start:stop`` of a retrain folder, in metadata order.

    Args:
        retrain_dir: a folder written by ``retrain_lds``, ``retrain_loo`` or
            :func:`train_ensemble`.
        start, stop: slice of the model list (e.g. ``0, 50`` for TRAK-50 from an
            LDS folder, whose other models then serve the LDS evaluation).
        verify: load each file and check its checksum and job id.

    Returns:
        Absolute paths.

    Raises:
        GroundTruthError: no metadata, or a missing / corrupt file (named).
    """
    root = Path(retrain_dir).resolve()
    models = load_metadata(root)["models"][start:stop]
    paths = []
    for entry in models:
        file = root / entry["file"]
        if verify:
            load_model_file(file, entry.get("job_id"))
        paths.append(str(file))
    return paths


def recorded_seed(path: str | os.PathLike, k: int, default: int) -> int:
    """The seed model ``k`` of the ensemble folder ``path`` was trained with
    (``default`` when the folder has no metadata yet): what a new folder's
    ``train_seed(seed, k)`` gives, or an earlier version's recorded seed."""
    root = Path(path)
    if not (root / "metadata.json").is_file():
        return int(default)
    return int(load_metadata(root)["models"][k]["seed"])

