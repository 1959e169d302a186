"""Files of a retrain folder: atomic, self-verifying model files and metadata (private).

Every model file carries a SHA-256 digest of its tensors (names, dtypes, shapes,
bytes) and the identity of the job that produced it (``job_id``: a hash of the
mode, seed, subset and training settings). A file is *finished* only if it loads,
its digest matches its tensors and its ``job_id`` matches the metadata; anything
else (missing, truncated, from another run) is not. Files are written to a
temporary name in the same folder, flushed to disk, then renamed, so a killed
writer never leaves a half-written file under the final name.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dattri.errors import DattriValueError, GroundTruthError

__all__ = [
    "FORMAT_VERSION",
    "METADATA_NAME",
    "ModelFileError",
    "SEED_SCHEME",
    "check_writable_folder",
    "describe_job",
    "file_status",
    "job_id",
    "load_metadata",
    "load_model_file",
    "remove_stale_temporaries",
    "save_model_file",
    "write_json_atomic",
]

FORMAT_VERSION = 1
#: metadata["seed_scheme"] of folders whose model seeds are below 2**32 and whose
#: training data are fingerprinted (folders without it are from earlier versions)
SEED_SCHEME = 2
METADATA_NAME = "metadata.json"
_TMP_MARK = ".tmp-"
_DIGEST_KEY = "dattri_sha256"
_JOB_KEY = "dattri_job_id"


class ModelFileError(GroundTruthError):
    """A model file of a retrain folder is missing, corrupt or from another job."""


def job_id(description: Mapping[str, Any]) -> str:
    """Stable 16-hex-digit identity of a training job (JSON of its description)."""
    blob = json.dumps(description, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def describe_job(mode: str, n: int, seed: int, settings: Any,
                 fingerprint: Mapping[str, Any] | None = None, **what: Any) -> str:
    """The ``job_id`` of one retraining model: its mode, data size, seed, what it
    leaves out or trains on (``removed=`` / ``subset=``), the training settings and
    (folders of ``SEED_SCHEME``) the data / training-function fingerprint."""
    desc = {"mode": mode, "n": n, "seed": seed, **what, "settings": settings}
    if fingerprint is not None:
        desc["fingerprint"] = fingerprint
    return job_id(desc)


def tensor_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and raw bytes of ``state``."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _replace_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_model_file(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    job: str,
    save_format: str = "safetensors",
) -> None:
    """Write ``state`` atomically to ``path`` with its digest and ``job`` id.

    Args:
        state: name -> tensor (a state dict).
        path: final file name (``.safetensors`` or ``.pt``).
        job: the job id recorded in the metadata for this file.
        save_format: ``"safetensors"`` or ``"torch"`` (``torch.save`` of a dict,
            loadable with ``weights_only=True``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    digest = tensor_digest(clean)
    tmp = _tmp_name(path)
    try:
        if save_format == "safetensors":
            from safetensors.torch import save_file

            save_file(clean, str(tmp), metadata={_DIGEST_KEY: digest, _JOB_KEY: job})
        else:
            torch.save({"state_dict": clean, _DIGEST_KEY: digest, _JOB_KEY: job}, tmp)
        _replace_atomic(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_model_file(path: str | os.PathLike, job: str | None = None) -> dict[str, torch.Tensor]:
    """Load and verify a model file written by :func:`save_model_file`.

    Args:
        path: the file.
        job: if given, the job id the file must carry.

    Returns:
        The state dict (CPU tensors).

    Raises:
        ModelFileError: the file is missing, unreadable, fails its digest, or was
            written for another job; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"model file {str(path)!r} is missing; rerun the retraining (it resumes) to create it."
        raise ModelFileError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            meta = {k: obj.get(k) for k in (_DIGEST_KEY, _JOB_KEY)} if isinstance(obj, dict) else {}
            state = obj.get("state_dict") if isinstance(obj, dict) else None
            if not isinstance(state, dict):
                raise TypeError("no 'state_dict' entry")
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        msg = (
            f"model file {str(path)!r} is corrupt or half-written ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); delete it and rerun the "
            "retraining (it resumes)."
        )
        raise ModelFileError(msg) from e
    if meta.get(_DIGEST_KEY) is None or meta.get(_DIGEST_KEY) != tensor_digest(state):
        msg = (
            f"model file {str(path)!r} fails its checksum (corrupt, or not written by "
            "dattri's retraining); delete it and rerun the retraining (it resumes)."
        )
        raise ModelFileError(msg)
    if job is not None and meta.get(_JOB_KEY) != job:
        msg = (
            f"model file {str(path)!r} was trained for job {meta.get(_JOB_KEY)!r} but "
            f"the folder's metadata expects job {job!r} (different seed, subset or "
            "settings): the file does not belong to this retrain folder."
        )
        raise ModelFileError(msg)
    return state


def file_status(path: str | os.PathLike, job: str) -> str:
    """``"ok"`` (finished and verified), ``"missing"`` or ``"corrupt"``."""
    if not Path(path).is_file():
        return "missing"
    try:
        load_model_file(path, job)
    except ModelFileError:
        return "corrupt"
    return "ok"


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Delete temporary files left by killed writers under ``root``; return the count."""
    count = 0
    for p in Path(root).rglob(f".*{_TMP_MARK}*"):
        if p.is_file():
            p.unlink(missing_ok=True)
            count += 1
    return count


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, separators=(",", ":"))
        _replace_atomic(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_metadata(retrain_dir: str | os.PathLike, mode: str | None = None) -> dict[str, Any]:
    """Read and check the metadata of a retrain folder.

    Args:
        retrain_dir: the folder given to ``retrain_lds`` / ``retrain_loo``.
        mode: the expected mode (``"lds"``, ``"loo"``, ``"ensemble"``), or None.

    Raises:
        GroundTruthError: no folder or metadata, unreadable JSON, wrong version or
            mode, or entries missing; the message names the file.
    """
    folder = Path(retrain_dir)
    meta_path = folder / METADATA_NAME
    if not meta_path.is_file():
        msg = (
            f"retrain_dir {str(folder)!r} has no {METADATA_NAME}; pass the folder "
            "written by dattri.model_util.retrain.retrain_lds / retrain_loo."
        )
        raise GroundTruthError(msg)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        msg = f"{str(meta_path)!r} is not valid JSON ({e}); rerun the retraining to rewrite it."
        raise GroundTruthError(msg) from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        msg = (
            f"{str(meta_path)!r} is not a dattri retrain metadata file of format "
            f"version {FORMAT_VERSION}."
        )
        raise GroundTruthError(msg)
    if mode is not None and meta.get("mode") != mode:
        msg = (
            f"{str(meta_path)!r} describes a {meta.get('mode')!r} retraining, not "
            f"{mode!r}; use calculate_{meta.get('mode')}_ground_truth or the right folder."
        )
        raise GroundTruthError(msg)
    for key in ("models", "data_length"):
        if key not in meta:
            msg = f"{str(meta_path)!r} lacks the entry {key!r}; the file is damaged."
            raise GroundTruthError(msg)
    return meta


def check_writable_folder(path: str | os.PathLike, option: str = "path") -> Path:
    """Make sure ``path`` is (or can be created as) a folder this process can write
    to, by creating it and a probe file in it; return it.

    Raises:
        DattriValueError: one line naming ``option``, the folder and what is wrong.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        msg = f"{option} {str(folder)!r} is a file, not a folder; pass a folder (created if missing)."
        raise DattriValueError(msg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dattri-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = {errno.EACCES: "is not writable (permission denied)",
               errno.EPERM: "is not writable (permission denied)",
               errno.EROFS: "is on a read-only file system",
               errno.ENOTDIR: "lies under a file, not a folder"}.get(
            e.errno, f"cannot be written ({e.strerror or e})")
        msg = f"{option} {str(folder)!r} {why}; pass a folder you can write to."
        raise DattriValueError(msg) from e
    return folder
