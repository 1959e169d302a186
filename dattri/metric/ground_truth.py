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

import inspect
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
from dattri.metric.metrics import check_distinct_subsets
from dattri.model_util._retrain_store import (
    METADATA_NAME,
    describe_job,
    load_metadata,
    load_model_file,
)
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


def _check_entries(meta: dict[str, Any], meta_file: str, entries: list[dict[str, Any]],
                   mode: str, what: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Every model entry's ``job_id`` must be the one its recorded seed, subset /
    left-out row and settings give: an edited metadata file (indices, seeds) no
    longer matches the files trained from it."""
    n, settings, fp = int(meta["data_length"]), meta.get("train_settings"), meta.get("fingerprint")
    for e in entries:
        if describe_job(mode, n, e.get("seed"), settings, fp, **what(e)) != e.get("job_id"):
            msg = (
                f"{meta_file!r}: the entry of {e.get('file')!r} does not match the seed, "
                "indices and settings its model was trained with (the metadata was "
                "edited). Restore the file, or retrain into a new folder."
            )
            raise GroundTruthError(msg)


def _published_style(target_func: Callable) -> bool:
    """Whether ``target_func`` is the 0.3.0 release's ``target_func(ckpt_path,
    dataloader)`` (told by its parameter names) rather than ``(params, batch)``."""
    try:
        names = [p.name for p in inspect.signature(target_func).parameters.values()][:2]
    except (TypeError, ValueError):
        return False
    if len(names) < 2:  # noqa: PLR2004
        return False
    first, second = (n.lower() for n in names)
    return "loader" in second or "path" in first or "ckpt" in first or "checkpoint" in first


def _published_values(target_func: Callable, files: list[Path], loader: Iterable) -> torch.Tensor:
    rows = []
    for f in files:
        out = target_func(f, loader)
        if not isinstance(out, torch.Tensor) or out.dim() != 1:
            msg = (f"target_func(ckpt_path, dataloader) returned "
                   f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                   f" for {str(f)!r}; it must return one value per test example (n_test,).")
            raise InvalidLossError(msg)
        rows.append(out.detach().to("cpu", torch.float64))
    if len({r.shape[0] for r in rows}) > 1:
        msg = "target_func returned different numbers of test values for different models."
        raise InvalidLossError(msg)
    return torch.stack(rows)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as e:
        msg = (f"{str(path)!r} is the metadata of a folder written by the published dattri "
               "0.3.0; reading it needs PyYAML: pip install pyyaml.")
        raise GroundTruthError(msg) from e
    try:
        with open(path, encoding="utf-8") as f:
            meta = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        msg = f"{str(path)!r} is not valid YAML ({e}); the folder's metadata is damaged."
        raise GroundTruthError(msg) from e
    if not isinstance(meta, dict):
        msg = f"{str(path)!r} does not hold a metadata mapping; the folder is damaged."
        raise GroundTruthError(msg)
    return meta


def _published_lds(root: Path) -> tuple[list[list[Path]], torch.Tensor]:
    """The model files (per subset, per run) and subset indices of an LDS folder
    written by the published 0.3.0 release (``metadata.yml``, ``{i}/indices.txt``,
    ``{i}/model_weights_{j}.pt``), read in place."""
    meta_file = root / "metadata.yml"
    meta = _read_yaml(meta_file)
    if meta.get("mode") not in (None, "lds") or "subset_dir_map" not in meta:
        msg = (f"{str(meta_file)!r} is not an LDS retraining's metadata (mode "
               f"{meta.get('mode')!r}, no subset_dir_map).")
        raise GroundTruthError(msg)
    runs = int(meta.get("num_runs_per_subset", 1))
    files, indices = [], []
    for key in sorted(meta["subset_dir_map"], key=int):
        folder = Path(str(meta["subset_dir_map"][key]))
        if not folder.is_dir():  # the folder was moved: its subsets are inside it
            folder = root / folder.name
        try:
            idx = [int(v) for v in (folder / "indices.txt").read_text().split()]
        except (OSError, ValueError) as e:
            msg = f"subset {key}: {str(folder / 'indices.txt')!r} is missing or damaged ({e})."
            raise GroundTruthError(msg) from e
        indices.append(idx)
        files.append([folder / f"model_weights_{j}.pt" for j in range(runs)])
        missing = [str(f) for f in files[-1] if not f.is_file()]
        if missing:
            msg = f"subset {key}: model file(s) {missing[:3]} are missing; finish the retraining."
            raise GroundTruthError(msg)
    if not indices or len({len(i) for i in indices}) != 1:
        msg = f"{str(meta_file)!r} lists no subsets, or subsets of different sizes."
        raise GroundTruthError(msg)
    return files, torch.tensor(indices, dtype=torch.int64)


def _published_lds_ground_truth(target_func, root: Path, loader, device, progress):
    files, indices = _published_lds(root)
    check_distinct_subsets(indices, str(root / "metadata.yml"))
    if _published_style(target_func):
        values = [_published_values(target_func, fs, loader).mean(0) for fs in files]
        return -torch.stack(values), indices
    rows = []
    for fs in tqdm(files, desc="LDS ground truth", unit="subset", leave=False,
                   disable=(not progress) if progress is not None else None):
        vals = []
        for f in fs:
            try:
                state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - unreadable / a pickled model
                msg = (f"{str(f)!r} is not a weights-only state dict ({type(e).__name__}); "
                       "pass a target_func(ckpt_path, dataloader) that loads it, as in "
                       "the published release.")
                raise GroundTruthError(msg) from e
            params = {k: v.to(device) for k, v in state.items()}
            vals.append(per_example_target(target_func, params, loader, device))
        rows.append(torch.stack(vals).mean(0))
    return -torch.stack(rows), indices


_PICKLE_FIX = (
    "it is a pickled whole model (the published retrain_loo saved torch.save(model)), and "
    "unpickling runs code stored in the file. If you trust the folder (you wrote it), "
    "pass allow_pickle=True; else load the models yourself and retrain with "
    "dattri.model_util.retrain.retrain_loo, which stores state dicts."
)


def _load_published_model(file: Path, allow_pickle: bool) -> Any:
    """A published ``model_weights.pt``: a state dict (read weights-only), or, with
    ``allow_pickle``, the pickled ``nn.Module`` the published ``retrain_loo`` saved."""
    import pickle

    if not file.is_file():
        msg = f"{str(file)!r} is missing; the published LOO folder is incomplete."
        raise GroundTruthError(msg)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            msg = f"{str(file)!r} cannot be read weights-only: {_PICKLE_FIX}"
            raise GroundTruthError(msg) from e
    except Exception as e:  # noqa: BLE001 - a damaged file
        msg = f"{str(file)!r} is not a torch file ({type(e).__name__}: {e}); the folder is damaged."
        raise GroundTruthError(msg) from e
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - the model's class is not importable here
        msg = (f"{str(file)!r} could not be unpickled ({type(e).__name__}: {e}); import the "
               "module that defines the model's class before the call.")
        raise GroundTruthError(msg) from e


def _published_loo_ground_truth(target_func, root: Path, loader, device, progress,
                                allow_pickle: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A LOO folder of the published 0.3.0 release: ``index_<i>/model_weights.pt``
    per left-out position ``i`` (and ``metadata.yml``), read in place."""
    import re

    dirs = [d for d in root.iterdir() if d.is_dir() and re.fullmatch(r"index_\d+", d.name)]
    if not dirs:
        msg = (f"{str(root)!r} has no metadata.json and no index_<i> folders: it is neither "
               "a dattri retrain_loo folder nor one of the published release.")
        raise GroundTruthError(msg)
    dirs.sort(key=lambda d: int(d.name[len("index_"):]))
    published = _published_style(target_func)
    rows = []
    for d in tqdm(dirs, desc="LOO ground truth", unit="model", leave=False,
                  disable=(not progress) if progress is not None else None):
        obj = _load_published_model(d / "model_weights.pt", allow_pickle)
        if published:  # the published target_func(model, dataloader) -> (n_test,)
            rows.append(_published_values(target_func, [obj], loader)[0])
            continue
        state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        if not isinstance(state, dict):
            msg = f"{str(d / 'model_weights.pt')!r} holds a {type(obj).__name__}, not a model."
            raise GroundTruthError(msg)
        params = {k: v.to(device) for k, v in state.items()}
        rows.append(per_example_target(target_func, params, loader, device))
    if len({r.shape[0] for r in rows}) > 1:
        msg = "target_func returned different numbers of test values for different models."
        raise InvalidLossError(msg)
    removed = torch.tensor([int(d.name[len("index_"):]) for d in dirs], dtype=torch.int64)
    return torch.stack(rows), removed


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
    allow_pickle: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LOO ground truth: change of the target when each training row is left out.

    ``values[m, j] = target(theta_{-i_m}, z_j) - target(theta_full, z_j)``

    A folder written by the published 0.3.0 ``retrain_loo`` (``metadata.yml``,
    ``index_<i>/model_weights.pt``, no full-data model) is read in place; its
    values are the targets themselves, ``target(theta_{-i_m}, z_j)``, as the
    published function returned them (the missing ``- target(theta_full, z_j)`` is
    a constant per test example, which ``loo_corr`` does not see). Its model files
    are pickled whole models: they are read only with ``allow_pickle=True``.

    Args:
        target_func: ``target_func(params, batch) -> scalar`` (e.g. the loss); for a
            published folder also the published ``target_func(model, dataloader)
            -> (n_test,)`` (told apart by its parameter names).
        retrain_dir: folder written by ``retrain_loo`` (or by the published one).
        test_dataloader: test loader (fixed order; its order is the score columns').
        device: device of the evaluation.
        progress: progress bar over models (None: only on a terminal).
        allow_pickle: unpickle the published folder's whole-model files (runs
            code stored in them: only for folders you trust).

    Returns:
        ``(values, indices)``: ``values`` ``(n_models, n_test)`` float64,
        ``indices`` ``(n_models,)`` int64 left-out loader positions.

    Raises:
        GroundTruthError: missing / corrupt / foreign model files (named),
            metadata of another mode, or a published pickled model without
            ``allow_pickle=True``.
    """
    _check_target_args(target_func, test_dataloader)
    root = Path(retrain_dir)
    if not (root / METADATA_NAME).is_file() and root.is_dir() and (
            (root / "metadata.yml").is_file() or any(root.glob("index_*"))):
        return _published_loo_ground_truth(target_func, root, test_dataloader, device,
                                           progress, allow_pickle)
    if _published_style(target_func):
        msg = ("target_func: the published target_func(model, dataloader) needs the model "
               "objects of a published LOO folder; for a dattri retrain_loo folder pass "
               "target_func(params, batch) -> the mean target of the batch.")
        raise DattriValueError(msg)
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
    meta_file = str(root / METADATA_NAME)
    _check_entries(meta, meta_file, [meta["full_model"]], "loo", lambda e: {"removed": None})
    _check_entries(meta, meta_file, entries, "loo", lambda e: {"removed": int(e["removed"])})
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
        target_func: ``target_func(params, batch) -> scalar`` (e.g. the loss), or
            the published release's ``target_func(ckpt_path, dataloader) ->
            (n_test,)`` (told apart by its parameter names: a first one naming a
            path / checkpoint, or a second one naming a loader).
        retrain_dir: folder written by ``retrain_lds``, or by the published 0.3.0
            release (``metadata.yml``, read in place; needs PyYAML).
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
    if not (root / METADATA_NAME).is_file() and (root / "metadata.yml").is_file():
        return _published_lds_ground_truth(target_func, root, test_dataloader, device, progress)
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
    check_distinct_subsets(indices, meta_file)
    row_of = {int(s["id"]): k for k, s in enumerate(subsets)}
    unknown = [e.get("file") for e in meta["models"] if int(e.get("subset", -1)) not in row_of]
    if unknown:
        msg = f"{meta_file!r} lists models of unknown subsets: {unknown[:5]}."
        raise GroundTruthError(msg)
    _check_entries(meta, meta_file, meta["models"], "lds",
                   lambda e: {"subset": subsets[row_of[int(e["subset"])]]["indices"]})
    if _published_style(target_func):  # the 0.3.0 target_func(ckpt_path, dataloader)
        for e in meta["models"]:
            load_model_file(root / e["file"], e.get("job_id"))  # verified before use
        values = _published_values(target_func, [root / e["file"] for e in meta["models"]],
                                   test_dataloader)
    else:
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
