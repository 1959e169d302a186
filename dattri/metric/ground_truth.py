"""Ground truth for LOO and LDS from a retrain folder.

The folder is the one written by :func:`dattri.model_util.retrain.retrain_loo` /
:func:`~dattri.model_util.retrain.retrain_lds`. Every model listed in its
metadata is loaded (and verified: checksum and job id), and
``target_func(params, batch)`` is evaluated per test example, with the API.md
convention: ``params`` is a state dict for
``torch.func.functional_call(model, params, ...)``, ``batch`` a batch of one
example as the test loader yields it, and the return value a scalar (for example
the loss). Per-example values are computed with ``torch.func.vmap`` over each
test batch, falling back to a loop over batches of one if the function cannot be
vmapped.

Signs (so that a proponent-positive score correlates positively):
    LOO: ``values[m, j] = target(theta_{-i_m}, z_j) - target(theta_full, z_j)``.
    LDS: ``values[m, j] = -mean_r target(theta_{S_m, r}, z_j)`` (the negated target,
    averaged over the runs of subset ``m``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from dattri._loader import batch_size_of, check_loader, slice_batch, to_device
from dattri.errors import DattriValueError, GroundTruthError, InvalidLossError
from dattri.model_util._retrain_store import load_metadata, load_model_file
from dattri.task import batch_of_one

__all__ = ["calculate_lds_ground_truth", "calculate_loo_ground_truth", "per_example_target"]


def _check_scalar(out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        msg = (
            f"target_func(params, batch) must return a scalar (the mean target of the "
            f"batch) on a batch of one example; it returned {shape}."
        )
        raise InvalidLossError(msg)
    return out.reshape(())


def per_example_target(
    target_func: Callable,
    params: dict[str, torch.Tensor],
    loader: Iterable,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """``target_func(params, z_j)`` for every example ``z_j`` of ``loader`` (in order).

    Args:
        target_func: ``(params, batch) -> scalar``.
        params: state dict passed to ``target_func``.
        loader: test loader (fixed order).
        device: where batches are moved.

    Returns:
        ``(n_test,)`` float64 tensor on the CPU.
    """
    out = []
    vmappable = True
    with torch.no_grad():
        for batch in loader:
            batch = to_device(batch, device)
            if vmappable:
                try:
                    dims = tree_map(
                        lambda t: 0 if isinstance(t, torch.Tensor) and t.dim() > 0 else None,
                        batch,
                    )
                    vals = vmap(lambda ex: _check_scalar(target_func(params, batch_of_one(ex))),
                                in_dims=(dims,))(batch)
                    out.append(vals.reshape(-1).to("cpu", torch.float64))
                    continue
                except InvalidLossError:
                    raise
                except Exception:  # noqa: BLE001 - not vmappable: fall back to a loop
                    vmappable = False
            for k in range(batch_size_of(batch)):
                one = slice_batch(batch, slice(k, k + 1))
                out.append(_check_scalar(target_func(params, one)).reshape(1).to("cpu", torch.float64))
    if not out:
        msg = "test_dataloader yielded no examples."
        raise DattriValueError(msg)
    return torch.cat(out)


def _model_values(target_func, root: Path, entries: list[dict[str, Any]], loader, device,
                  progress, desc) -> torch.Tensor:
    rows = []
    for entry in tqdm(entries, desc=desc, unit="model", leave=False,
                      disable=(not progress) if progress is not None else None):
        file = entry.get("file")
        if not isinstance(file, str) or os.path.isabs(file) or ".." in Path(file).parts:
            msg = f"{str(root / 'metadata.json')!r} lists a bad model path {file!r}; paths must be relative."
            raise GroundTruthError(msg)
        state = load_model_file(root / file, entry.get("job_id"))
        params = {k: v.to(device) for k, v in state.items()}
        rows.append(per_example_target(target_func, params, loader, device))
    n_test = {r.shape[0] for r in rows}
    if len(n_test) > 1:  # pragma: no cover - a loader that changes between passes
        msg = "test_dataloader yielded a different number of examples on different passes."
        raise DattriValueError(msg)
    return torch.stack(rows)


def _check_target_args(target_func: Any, test_dataloader: Any) -> None:
    if not callable(target_func):
        msg = f"target_func must be callable target_func(params, batch), got {type(target_func).__name__}."
        raise DattriValueError(msg)
    check_loader(test_dataloader, "test_dataloader")


def calculate_loo_ground_truth(
    target_func: Callable,
    retrain_dir: str | os.PathLike,
    test_dataloader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOO ground truth: change of the target when each training row is left out.

    ``values[m, j] = target(theta_{-i_m}, z_j) - target(theta_full, z_j)``

    Args:
        target_func: ``target_func(params, batch) -> scalar`` (e.g. the loss).
        retrain_dir: folder written by ``retrain_loo``.
        test_dataloader: test loader (fixed order; its order is the score columns').
        device: device of the evaluation.
        progress: progress bar over models (None: only on a terminal).

    Returns:
        ``(values, indices)``: ``values`` ``(n_models, n_test)`` float64,
        ``indices`` ``(n_models,)`` int64 left-out loader positions.

    Raises:
        GroundTruthError: missing / corrupt / foreign model files (named), or
            metadata of another mode.
    """
    _check_target_args(target_func, test_dataloader)
    root = Path(retrain_dir)
    meta = load_metadata(root, "loo")
    if "full_model" not in meta:
        msg = f"{str(root / 'metadata.json')!r} has no 'full_model' entry; the file is damaged."
        raise GroundTruthError(msg)
    entries = meta["models"]
    removed = torch.tensor([int(e["removed"]) for e in entries], dtype=torch.int64)
    n = int(meta["data_length"])
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= n):
        msg = f"{str(root / 'metadata.json')!r} lists left-out indices outside [0, {n})."
        raise GroundTruthError(msg)
    full = _model_values(target_func, root, [meta["full_model"]], test_dataloader, device,
                         False, "full model")
    values = _model_values(target_func, root, entries, test_dataloader, device, progress,
                           "LOO ground truth")
    return values - full, removed


def calculate_lds_ground_truth(
    target_func: Callable,
    retrain_dir: str | os.PathLike,
    test_dataloader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDS ground truth: the negated target of every subset model on every test example.

    ``values[s, j] = -(1/R) sum_r target(theta_{S_s, r}, z_j)``

    Args:
        target_func: ``target_func(params, batch) -> scalar`` (e.g. the loss).
        retrain_dir: folder written by ``retrain_lds``.
        test_dataloader: test loader (fixed order).
        device: device of the evaluation.
        progress: progress bar over models (None: only on a terminal).

    Returns:
        ``(values, indices)``: ``values`` ``(n_subsets, n_test)`` float64,
        ``indices`` ``(n_subsets, subset_size)`` int64 loader positions of each
        subset's training examples.

    Raises:
        GroundTruthError: missing / corrupt / foreign model files (named),
            metadata of another mode, or inconsistent subsets.
    """
    _check_target_args(target_func, test_dataloader)
    root = Path(retrain_dir)
    meta = load_metadata(root, "lds")
    meta_file = str(root / "metadata.json")
    subsets = meta.get("subsets")
    if not isinstance(subsets, list) or not subsets:
        msg = f"{meta_file!r} has no 'subsets' entry; the file is damaged."
        raise GroundTruthError(msg)
    n = int(meta["data_length"])
    sizes = {len(s.get("indices", ())) for s in subsets}
    if len(sizes) != 1:
        msg = f"{meta_file!r} lists subsets of different sizes {sorted(sizes)}."
        raise GroundTruthError(msg)
    indices = torch.tensor([s["indices"] for s in subsets], dtype=torch.int64)
    if int(indices.min()) < 0 or int(indices.max()) >= n:
        msg = f"{meta_file!r} lists subset indices outside [0, {n}) (data_length)."
        raise GroundTruthError(msg)
    row_of = {int(s["id"]): k for k, s in enumerate(subsets)}
    unknown = [e.get("file") for e in meta["models"] if int(e.get("subset", -1)) not in row_of]
    if unknown:
        msg = f"{meta_file!r} lists models of unknown subsets: {unknown[:5]}."
        raise GroundTruthError(msg)
    values = _model_values(target_func, root, meta["models"], test_dataloader, device,
                           progress, "LDS ground truth")
    rows = torch.tensor([row_of[int(e["subset"])] for e in meta["models"]])
    counts = torch.bincount(rows, minlength=len(subsets)).to(torch.float64)
    if bool((counts == 0).any()):
        empty = [subsets[k]["id"] for k in torch.nonzero(counts == 0).flatten().tolist()]
        msg = f"{meta_file!r} lists subsets without any model: {empty[:5]}."
        raise GroundTruthError(msg)
    total = torch.zeros(len(subsets), values.shape[1], dtype=torch.float64).index_add_(0, rows, values)
    return -(total / counts.unsqueeze(1)), indices
