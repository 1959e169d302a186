"""An out-of-core feature store that resumes: features on disk per (checkpoint, shard).

Layout of a cache folder::

    cache_dir/ckpt-0000/shard-00000/meta.json          what the features are
    cache_dir/ckpt-0000/shard-00000/batch-00000000.npy  rows of loader batch 0
    cache_dir/ckpt-0000/shard-00000/batch-00000001.npy  ...
    cache_dir/ckpt-0000/shard-00000/complete.json       all batches written

Every file is committed atomically: written to a temporary file in the same folder,
flushed and ``fsync``-ed, then renamed over its final name (``os.replace``), and the
folder is ``fsync``-ed. A batch file therefore exists only complete: it is its own
completion flag. A run killed at any point (``SIGKILL`` included) leaves committed
batches and at most one stray temporary file; :func:`featurize_to_store` run again
computes only the batches without a file and gives bit-identical features (the
arrays are stored byte for byte, ``.npy`` of the tensor's dtype).

``meta.json`` records the feature dimension and dtype, the loader fingerprint
(:func:`dattri._loader.loader_fingerprint`: number of examples and a hash of every
example), the caller's featurizer settings key and the shard's first global
row. Opening a store with other values raises :class:`dattri.errors.StoreError`
naming the folder and the fix (another ``cache_dir``, or delete the folder); so does
a store whose first rows differ from the features the caller computes for the
loader's first examples (another loss, target or model code with the same weights).

Reading (:meth:`FeatureStore.blocks`, :func:`store_blocks`) gives blocks of rows
of at most a byte budget, read from the files with ``readinto`` into one block
buffer: the features are never all in memory.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import data as tud
from tqdm.auto import tqdm

from dattri._loader import (
    LoaderFingerprint,
    batch_context,
    check_loader,
    head,
    loader_fingerprint,
    to_device,
)
from dattri.errors import DattriValueError, StoreError
from dattri.func.utils import close_per_example

__all__ = [
    "DEFAULT_BUDGET",
    "aligned_blocks",
    "FeatureStore",
    "featurize_to_store",
    "open_store",
    "shard_range",
    "shard_stores",
    "store_blocks",
    "store_folder",
]

FORMAT = "dattri-feature-store"
VERSION = 1
#: bytes of features per block read back, unless the caller says otherwise
DEFAULT_BUDGET = 64 << 20

_META, _COMPLETE = "meta.json", "complete.json"
_BATCH = re.compile(r"^batch-(\d{8})\.npy$")
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
          torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
          torch.int64: np.int64, torch.uint8: np.uint8, torch.bool: np.bool_}
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        msg = f"meta.json: unknown dtype {name!r}; the store is damaged: delete its folder."
        raise StoreError(msg)
    return dtype


def _storage_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the bytes are saved as: ``dtype`` itself where numpy has it, else an
    integer of the same width (bfloat16 -> int16), reinterpreted on reading."""
    return dtype if dtype in _NUMPY else _SAME_WIDTH[torch.empty((), dtype=dtype).element_size()]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(path: Path, write) -> None:
    """Write ``path`` atomically: ``write(file)`` on a temporary file of the same
    folder, flush, fsync, ``os.replace``, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: dict) -> None:
    _commit(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode()))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        msg = f"{path}: unreadable ({type(e).__name__}: {e}); delete the folder {path.parent} to recompute."
        raise StoreError(msg) from e


def settings_key(settings: Any) -> str:
    """The canonical text of a featurizer settings key (a string, or anything
    JSON-serialisable: dicts are sorted; other objects by ``repr``)."""
    if isinstance(settings, str):
        return settings
    return json.dumps(settings, sort_keys=True, default=repr)


def store_folder(cache_dir: str | os.PathLike, ckpt: int, shard: int = 0) -> Path:
    """The folder of checkpoint ``ckpt``'s shard ``shard`` under ``cache_dir``."""
    return Path(cache_dir) / f"ckpt-{int(ckpt):04d}" / f"shard-{int(shard):05d}"


def shard_range(n: int, world_size: int, rank: int) -> range:
    """The contiguous training rows of ``rank`` among ``world_size`` shards of ``n``
    rows (sizes differ by at most one; the first ``n % world_size`` ranks get one more)."""
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size):
        msg = (f"world_size={world_size!r}, rank={rank!r}: need world_size >= 1 and "
               "0 <= rank < world_size.")
        raise DattriValueError(msg)
    base, extra = divmod(int(n), world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class FeatureStore:
    """The features of one (checkpoint, shard): one ``.npy`` file per loader batch.

    Writers construct it with what identifies the run (it creates the folder and
    ``meta.json``, or checks an existing one); readers of a finished run use
    :meth:`load`.

    Args:
        folder: the store's folder (:func:`store_folder` gives the standard one).
        fingerprint: the loader's :func:`~dattri._loader.loader_fingerprint`
            (``None``: not recorded, not checked).
        settings: the featurizer settings key (method, projection, layers, ...);
            a store written with another key is refused.
        row_offset: the global training row of this shard's first example.
        dim, dtype: the feature dimension and dtype when known in advance (else
            taken from the first batch written).

    Raises:
        StoreError: the folder holds a store of other data, settings, row offset,
            dimension or dtype (the message names the folder and the fix).
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: LoaderFingerprint | None = None,
                 settings: Any = None, row_offset: int = 0, dim: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        self.folder = Path(folder)
        self._sizes: dict[int, int] = {}
        want = {"format": FORMAT, "version": VERSION, "settings": settings_key(settings),
                "fingerprint": None if fingerprint is None else [int(fingerprint.n),
                                                                  str(fingerprint.digest)],
                "row_offset": int(row_offset), "dim": None if dim is None else int(dim),
                "dtype": None if dtype is None else _dtype_name(dtype)}
        path = self.folder / _META
        if not path.exists():
            if self.folder.exists() and self._files():
                msg = (f"{self.folder}: batch files without meta.json (not written by "
                       "dattri.store); pass another cache_dir, or delete the folder.")
                raise StoreError(msg)
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_json(path, want)
            self.meta = want
            return
        self.meta = _read_json(path)
        self._check_format()
        for key in ("settings", "fingerprint", "row_offset", "dim", "dtype"):
            have, new = self.meta.get(key), want[key]
            if key in ("dim", "dtype") and (have is None or new is None):
                continue  # not known yet on one side
            if have != new:
                self._mismatch(key, have, new)
        if want["dim"] is not None and self.meta["dim"] is None:
            self._set_layout(want["dim"], want["dtype"])

    @classmethod
    def load(cls, folder: str | os.PathLike) -> FeatureStore:
        """Open an existing store to read it (nothing is checked against a run)."""
        self = cls.__new__(cls)
        self.folder, self._sizes = Path(folder), {}
        if not (self.folder / _META).exists():
            msg = (f"{self.folder}: no feature store here (no meta.json); pass the cache_dir "
                   "of a featurize run.")
            raise StoreError(msg)
        self.meta = _read_json(self.folder / _META)
        self._check_format()
        return self

    def _check_format(self) -> None:
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            msg = (f"{self.folder}: meta.json is not a {FORMAT} v{VERSION} store (format "
                   f"{self.meta.get('format')!r}, version {self.meta.get('version')!r}); pass "
                   "another cache_dir, or delete the folder.")
            raise StoreError(msg)

    def _mismatch(self, key: str, have: Any, new: Any) -> None:
        what = {"fingerprint": "another training loader ([examples, hash of every example])",
                "rows": "another loss, target function or model code (its first rows differ "
                        "from this run's features of the same examples)",
                "settings": "other featurizer settings", "row_offset": "another shard",
                "dim": "another feature dimension", "dtype": "another feature dtype"}[key]
        msg = (f"{self.folder}: this feature store was written for {what}: stored {key} "
               f"{have!r}, this run {new!r}. Pass a different cache_dir, or delete the folder "
               f"{self.folder} to recompute its features.")
        raise StoreError(msg)

    def _set_layout(self, dim: int, dtype: str) -> None:
        self.meta = {**self.meta, "dim": int(dim), "dtype": dtype}
        _write_json(self.folder / _META, self.meta)

    # -- what is there -------------------------------------------------------------

    @property
    def dim(self) -> int | None:
        """Feature dimension (``None`` before the first batch)."""
        return self.meta.get("dim")

    @property
    def dtype(self) -> torch.dtype | None:
        """Feature dtype (``None`` before the first batch)."""
        name = self.meta.get("dtype")
        return None if name is None else _dtype_of(name)

    @property
    def row_offset(self) -> int:
        """Global training row of the shard's first example."""
        return int(self.meta["row_offset"])

    def _files(self) -> dict[int, Path]:
        out = {}
        for entry in os.scandir(self.folder):
            hit = _BATCH.match(entry.name)
            if hit:
                out[int(hit.group(1))] = Path(entry.path)
        return out

    def done(self) -> set[int]:
        """Indices of the committed batches."""
        return set(self._files())

    @property
    def complete(self) -> bool:
        """Whether every batch of the loader is committed (:meth:`finish` ran)."""
        return (self.folder / _COMPLETE).exists()

    def _completion(self) -> dict:
        if not self.complete:
            msg = (f"{self.folder}: the feature store is not complete (a featurize run stopped "
                   "before its end); run featurize_to_store again to finish it.")
            raise StoreError(msg)
        return _read_json(self.folder / _COMPLETE)

    @property
    def num_batches(self) -> int:
        """Batches of the finished store."""
        return int(self._completion()["num_batches"])

    @property
    def n(self) -> int:
        """Rows (examples) of the finished store."""
        return int(self._completion()["n"])

    # -- writing -------------------------------------------------------------------

    def _path(self, i: int) -> Path:
        return self.folder / f"batch-{int(i):08d}.npy"

    def write_batch(self, i: int, rows: torch.Tensor) -> None:
        """Commit the features ``(b, d)`` of loader batch ``i`` (atomically)."""
        rows = rows.detach()
        if rows.ndim != 2:
            msg = f"rows: features of batch {i} have shape {tuple(rows.shape)}; expected (b, d)."
            raise DattriValueError(msg)
        if self.dim is None or self.meta.get("dtype") is None:  # first batch: what is unknown
            self._set_layout(rows.shape[1] if self.dim is None else self.dim,
                             self.meta.get("dtype") or _dtype_name(rows.dtype))
        if rows.shape[1] != self.dim:
            self._mismatch("dim", self.dim, int(rows.shape[1]))
        if rows.dtype != self.dtype:
            self._mismatch("dtype", self.meta["dtype"], _dtype_name(rows.dtype))
        arr = rows.cpu().contiguous().view(_storage_dtype(rows.dtype)).numpy()
        _commit(self._path(i), lambda f: np.save(f, arr, allow_pickle=False))
        self._sizes[int(i)] = int(rows.shape[0])

    def finish(self, num_batches: int) -> None:
        """Mark the store complete: batches ``0 .. num_batches - 1`` are all committed."""
        have = self.done()
        missing = sorted(set(range(num_batches)) - have)
        if missing or (have and max(have) >= num_batches):
            msg = (f"{self.folder}: cannot finish with {num_batches} batches: missing "
                   f"{missing[:10]}, present {len(have)}; the loader changed during the run? "
                   "Delete the folder to recompute.")
            raise StoreError(msg)
        n = sum(self._size(i) for i in range(num_batches))
        _write_json(self.folder / _COMPLETE, {"num_batches": int(num_batches), "n": int(n)})
        for entry in os.scandir(self.folder):  # temporary files of killed writers
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                os.remove(entry.path)

    # -- reading -------------------------------------------------------------------

    def _header(self, i: int) -> tuple[tuple[int, ...], int]:
        """Shape and data offset of batch ``i``'s ``.npy`` file."""
        with open(self._path(i), "rb") as f:
            fmt = np.lib.format
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, _ = read(f)
            return shape, f.tell()

    def _size(self, i: int) -> int:
        if i not in self._sizes:
            self._sizes[i] = int(self._header(i)[0][0])
        return self._sizes[i]

    def read_batch(self, i: int) -> torch.Tensor:
        """The committed features of batch ``i``."""
        arr = np.load(self._path(i), allow_pickle=False)
        return torch.from_numpy(arr).view(self.dtype)

    def block_rows(self, budget_bytes: int = DEFAULT_BUDGET) -> int:
        """Rows per block of at most ``budget_bytes`` (at least one row)."""
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 1:
            msg = f"budget_bytes={budget_bytes!r} must be a positive int (bytes per block)."
            raise DattriValueError(msg)
        row = max(1, (self.dim or 1) * torch.empty((), dtype=self.dtype or torch.float32).element_size())
        return max(1, budget_bytes // row)

    def blocks(self, budget_bytes: int = DEFAULT_BUDGET, device: torch.device | str = "cpu",
               rows: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """``(global_row_start, features (b, d))`` over the finished store, in order.

        Each block holds ``rows`` rows (default: as many as fit in ``budget_bytes``)
        and is read from the batch files into one fresh buffer: memory is one block.
        """
        step = self.block_rows(budget_bytes) if rows is None else max(1, int(rows))
        num, dim = self.num_batches, self.dim
        store_dtype = _storage_dtype(self.dtype)
        np_dtype = np.dtype(_NUMPY[store_dtype])
        width = dim * np_dtype.itemsize
        buf, filled, start = None, 0, self.row_offset
        for i in range(num):
            shape, offset = self._header(i)
            todo = shape[0]
            with open(self._path(i), "rb") as f:
                f.seek(offset)
                while todo:
                    if buf is None:
                        buf, filled = np.empty((step, dim), dtype=np_dtype), 0
                    take = min(todo, step - filled)
                    view = memoryview(buf[filled:filled + take].reshape(-1).view(np.uint8))
                    if f.readinto(view) != take * width:
                        msg = f"{self._path(i)}: shorter than its header; delete {self.folder}."
                        raise StoreError(msg)
                    filled, todo = filled + take, todo - take
                    if filled == step:
                        yield start, torch.from_numpy(buf).view(self.dtype).to(device)
                        start, buf = start + step, None
        if buf is not None and filled:
            yield start, torch.from_numpy(buf[:filled]).view(self.dtype).to(device)

    def delete(self) -> None:
        """Remove the store's files and folder."""
        for entry in os.scandir(self.folder):
            os.remove(entry.path)
        self.folder.rmdir()


def open_store(cache_dir: str | os.PathLike, loader: Iterable, ckpt: int = 0, *, shard: int = 0,
               settings: Any = None, row_offset: int = 0, name: str = "train_loader",
               fingerprint: LoaderFingerprint | None = None) -> FeatureStore:
    """The store of ``loader``'s features at checkpoint ``ckpt`` (shard ``shard``)
    under ``cache_dir``, created or checked against the loader's fingerprint (given,
    for the stores of several checkpoints of one loader: one pass over the data)
    and ``settings``."""
    if fingerprint is None:
        fingerprint = loader_fingerprint(loader, name)
    store = FeatureStore(store_folder(cache_dir, ckpt, shard), fingerprint, settings, row_offset)
    store._opened_with = loader  # checked against this loader: featurize_to_store trusts it
    return store


class _Unfinished(tud.Sampler):
    """The index batches of a batch sampler whose loader batch is not committed."""

    def __init__(self, batch_sampler: Iterable, todo: Sequence[int]) -> None:
        self.batch_sampler, self.todo = batch_sampler, set(todo)
        self.count = len(todo)

    def __iter__(self) -> Iterator[list[int]]:
        for i, idx in enumerate(self.batch_sampler):
            if i in self.todo:
                yield idx

    def __len__(self) -> int:
        return self.count


def _sub_loader(loader: tud.DataLoader, todo: Sequence[int]) -> tud.DataLoader:
    """A loader collating only the batches ``todo`` of a map-style ``loader``."""
    extra = {"prefetch_factor": loader.prefetch_factor,
             "persistent_workers": loader.persistent_workers} if loader.num_workers else {}
    return tud.DataLoader(loader.dataset, batch_sampler=_Unfinished(loader.batch_sampler, todo),
                          collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                          pin_memory=loader.pin_memory, timeout=loader.timeout,
                          worker_init_fn=loader.worker_init_fn,
                          multiprocessing_context=loader.multiprocessing_context,
                          generator=loader.generator, **extra)


def _map_style(loader: Iterable) -> bool:
    return (type(loader) is tud.DataLoader and loader.batch_sampler is not None
            and not isinstance(loader.dataset, tud.IterableDataset))


def featurize_to_store(features: Any, loader: Iterable, ckpt: int, store: FeatureStore,
                       desc: str = "", show_progress: bool | None = None,
                       name: str = "train_loader") -> int:
    """Featurize ``loader`` at checkpoint ``ckpt`` into ``store``, skipping the
    batches already committed, and mark the store complete.

    Args:
        features: anything with ``batch(batch_on_device, ckpt_idx) -> (B, d)`` and a
            ``device`` (e.g. :class:`dattri.algorithm._engine.Featurizer`).
        loader: the loader the store was opened for (fixed order); a plain
            ``torch.utils.data.DataLoader`` over a map-style data set loads and
            collates only the unfinished batches, any other loader is iterated
            whole and its finished batches are skipped unfeaturized.
        ckpt: the checkpoint index passed to ``features.batch``.
        store: the (checkpoint, shard) store.
        desc: progress bar label (tqdm; ``show_progress`` None = auto).
        name: the loader's argument name, for errors.

    Returns:
        The number of batches featurized by this call (0 when already complete).

    Raises:
        StoreError: the loader is not the one the store was written for.
    """
    check_loader(loader, name, empty=False)
    have = store.meta.get("fingerprint")
    if have is not None and getattr(store, "_opened_with", None) is not loader:
        now = loader_fingerprint(loader, name)
        if [int(now.n), str(now.digest)] != have:
            store._mismatch("fingerprint", have, [int(now.n), str(now.digest)])
    done = store.done()
    if 0 in done:  # written before: by this run's loss, target and model code?
        _check_first_rows(features, loader, ckpt, store, name)
    if store.complete:
        return 0
    if _map_style(loader):
        total = len(loader.batch_sampler)
        todo = [i for i in range(total) if i not in done]
        pairs: Iterable[tuple[int, Any]] = zip(todo, _sub_loader(loader, todo))
    else:
        try:
            total = len(loader)  # type: ignore[arg-type]
        except TypeError:
            total = None
        pairs = ((i, b) for i, b in enumerate(loader) if i not in done)
    bar = tqdm(pairs, desc=desc or f"featurize ckpt {ckpt}", total=total, initial=len(done),
               leave=False, disable=None if show_progress is None else not show_progress)
    computed, last = 0, -1
    device = getattr(features, "device", "cpu")
    for i, batch in bar:
        with batch_context(name, i):
            rows = features.batch(to_device(batch, device), ckpt)
        store.write_batch(i, rows)
        computed, last = computed + 1, i
    # every batch index is either committed before or computed now
    store.finish(max([last, *done], default=-1) + 1)
    return computed


#: examples whose features are computed again to check a store written before
CHECK_ROWS = 2


def _check_first_rows(features: Any, loader: Iterable, ckpt: int, store: FeatureStore,
                      name: str) -> None:
    """Compute the features of the loader's first ``CHECK_ROWS`` examples and compare
    them with the store's first rows (:func:`~dattri.func.utils.close_per_example`:
    two batch sizes round differently, another loss or model differs by O(1)). The settings
    key and the weights' digest cannot tell a loss function, a target function or
    the model's code apart; this can."""
    first = head(loader, CHECK_ROWS)
    with batch_context(name, 0):
        now = features.batch(to_device(first, getattr(features, "device", "cpu")), ckpt)
    k = now.shape[0]
    have = store.read_batch(0)[:k].to(torch.float64)
    now = now.detach().to("cpu", torch.float64).reshape(have.shape) if now.numel() == have.numel() else None
    if now is None:
        store._mismatch("rows", "stored rows", "features of another shape")
    if not close_per_example(now, have):
        store._mismatch("rows", [round(float(v), 6) for v in have[:, :3].reshape(-1)],
                        [round(float(v), 6) for v in now[:, :3].reshape(-1)])


def shard_stores(cache_dir: str | os.PathLike, ckpt: int = 0) -> list[FeatureStore]:
    """The finished shard stores of checkpoint ``ckpt`` under ``cache_dir``, by row."""
    root = Path(cache_dir) / f"ckpt-{int(ckpt):04d}"
    if not root.is_dir():
        msg = f"cache_dir: {root} does not exist; pass the cache_dir of a featurize run."
        raise StoreError(msg)
    stores = [FeatureStore.load(p) for p in sorted(root.glob("shard-*")) if p.is_dir()]
    stores.sort(key=lambda s: s.row_offset)
    start = 0
    for s in stores:
        if s.row_offset != start:
            msg = (f"{s.folder}: starts at row {s.row_offset}, the shards before it end at "
                   f"{start}; a shard is missing or stale: rerun the featurize run.")
            raise StoreError(msg)
        start += s.n
    return stores


def store_blocks(cache_dir: str | os.PathLike, checkpoints: Sequence[int] = (0,),
                 budget_bytes: int = DEFAULT_BUDGET, device: torch.device | str = "cpu",
                 ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """``(global_row_start, [features of each checkpoint (b, d_c)])`` over every
    shard of ``cache_dir``, in row order; the budget is shared by the checkpoints."""
    per_ckpt = [shard_stores(cache_dir, c) for c in checkpoints]
    layout = [[(s.row_offset, s.n) for s in stores] for stores in per_ckpt]
    if any(lay != layout[0] for lay in layout):
        msg = (f"cache_dir: {cache_dir}: the checkpoints {list(checkpoints)} have different "
               "shards; featurize every checkpoint with the same sharding.")
        raise StoreError(msg)
    for shards in zip(*per_ckpt):
        rows = min(s.block_rows(max(1, budget_bytes // len(shards))) for s in shards)
        yield from aligned_blocks(shards, rows, device)


def aligned_blocks(stores: Sequence[Any], rows: int, device: torch.device | str = "cpu",
                   ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """``(global_row_start, [block of each store])`` of stores holding the same rows
    (one per checkpoint), ``rows`` rows a block, in row order. Anything with
    ``blocks(rows=, device=)`` serves (a :class:`FeatureStore`, rows in memory)."""
    for parts in zip(*(s.blocks(device=device, rows=rows) for s in stores)):
        yield parts[0][0], [block for _, block in parts]
