"""Music data for the Music Transformer setting (paper, Table 3 and Appendix C).

Every piece becomes a stream of the 388 performance events of
:mod:`dattri.benchmark.datasets.maestro.events`; each stream is cut into
training examples of ``seq_len + 1`` consecutive events,
``x = e[s : s + seq_len]``, ``y = e[s + 1 : s + seq_len + 1]`` (next-event
prediction), for window starts ``s = 0, stride, 2 stride, ...`` inside one
piece (windows never cross pieces; shorter pieces are dropped). The split into
training and test pieces is made per piece, so no piece is on both sides.

Sources:

1. ``path=``: the MAESTRO data set (Hawthorne et al., ICLR 2019; v2.0.0 in the
   paper; CC BY-NC-SA 4.0) on disk: the ``maestro-v2.0.0`` folder (or a folder
   containing it) with ``maestro-v*.csv`` / ``.json`` metadata, whose
   ``split`` column gives train / test (validation pieces are not used), or any
   folder of ``.mid`` / ``.midi`` files (every tenth piece, evenly spread, is a
   test piece). Read with ``pretty_midi``; the sustain pedal extends notes.
2. ``path=None``: OFFLINE STAND-IN, NOT MAESTRO. The 371 Bach chorales of the
   ``music21`` corpus (``pip install music21==10.5.1 pretty_midi``; licence:
   music21's ``corpus/license.txt``): real four-voice scores, written to MIDI
   by music21 and read by the same MIDI reader. They have constant velocity,
   quantised timing (quarter = 0.5 s) and about 800 events each, so by default
   every piece is also transposed into all twelve keys (-5..+6 semitones; the
   pitch-transposition augmentation of Huang et al. 2018, who use -3..+3 on
   MAESTRO), which gives about 8,200 disjoint training windows of 256 events,
   enough for the paper's 5,000 (-3..+3 would give about 4,800), and 420
   test prompts (the 35 test chorales of 257+ events, in 12 keys). Parsing
   all chorales takes one to five minutes, so the event streams are cached
   (see ``cache_dir``).

Paper sizes: 5,000 training and 178 test examples (``n_train``, ``n_test``),
sampled with a fixed seed from all training windows and from the first window
of every test piece (MAESTRO v2.0.0 has 178 test performances: one prompt
each); smaller values give reduced runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from dattri.benchmark.datasets.maestro.events import midi_to_events, transpose_events
from dattri.errors import DattriRuntimeError, DattriValueError

__all__ = [
    "CHORALES_LICENCE",
    "MAESTRO_LICENCE",
    "MAX_SEQUENCE",
    "EventDataset",
    "create_maestro_datasets",
    "default_cache_dir",
]

MAESTRO_LICENCE = "MAESTRO (Hawthorne et al. 2019): CC BY-NC-SA 4.0"
#: events per training window (the published name; the default ``seq_len``)
MAX_SEQUENCE = 256
CHORALES_LICENCE = "Bach chorales from the music21 corpus: see music21/corpus/license.txt"
_CACHE_VERSION = "events-v1"
_MIDI_SUFFIXES = (".mid", ".midi")
_OFFLINE_WARNING = (
    "create_maestro_datasets(path=None) uses the OFFLINE STAND-IN: Bach chorales from "
    "the music21 corpus (in all 12 keys), NOT the MAESTRO piano performances of the "
    "paper. Pass path= a MAESTRO v2.0.0 folder for the paper's data."
)


class EventDataset(TensorDataset):
    """Fixed-length event windows: ``dataset[i] = (x (seq_len,), y (seq_len,))`` int64.

    Attributes:
        pieces: piece names; ``piece[i]`` indexes it for example ``i``.
        piece: ``(n,)`` int64 piece index of every example.
        transposition: ``(n,)`` int64 semitone shift applied to every example.
        source: where the data came from.
        licence: licence of the data.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        pieces: Sequence[str],
        piece: torch.Tensor,
        transposition: torch.Tensor,
        source: str,
        licence: str,
    ) -> None:
        super().__init__(x, y)
        self.pieces, self.piece, self.transposition = list(pieces), piece, transposition
        self.source, self.licence = source, licence

    def __repr__(self) -> str:
        seq = self.tensors[0].shape[1] if self.tensors[0].ndim == 2 else 0
        return f"EventDataset(n={len(self)}, seq_len={seq}, source={self.source!r})"


def default_cache_dir() -> Path:
    """``$DATTRI_CACHE_DIR`` if set, else ``~/.cache/dattri``."""
    return Path(os.environ.get("DATTRI_CACHE_DIR", "~/.cache/dattri")).expanduser()


def _atomic_save(file: Path, arrays: dict[str, np.ndarray]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _hidden(progress: bool | None) -> bool | None:
    """tqdm's ``disable`` for a ``progress`` flag (``None``: only on a terminal)."""
    return None if progress is None else not progress


def _load_streams(
    names: list[str],
    read: Callable[[int], np.ndarray],
    key: str,
    cache_file: Path | None,
    progress: bool | None,
) -> list[np.ndarray]:
    """Event streams of all pieces, from the cache or by reading (then caching)."""
    if cache_file is not None and cache_file.is_file():
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                if str(z["key"]) == key:
                    bounds = np.concatenate([[0], np.cumsum(z["lengths"])])
                    tokens = z["tokens"].astype(np.int64)
                    return [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        except (OSError, KeyError, ValueError):
            pass  # unreadable cache: rebuild it
    streams = [
        read(i) for i in tqdm(range(len(names)), desc="MIDI -> events", disable=_hidden(progress))
    ]
    if cache_file is not None:
        _atomic_save(cache_file, {
            "key": np.asarray(key),
            "lengths": np.asarray([len(s) for s in streams], dtype=np.int64),
            "tokens": np.concatenate([*streams, np.zeros(0, np.int64)]).astype(np.int16),
        })
    return streams


def _every_tenth_is_test(n: int) -> list[bool]:
    """Evenly spread test pieces: positions 9, 19, 29, ... (the last one if n < 10)."""
    test = [i % 10 == 9 for i in range(n)]
    if n >= 2 and not any(test):
        test[-1] = True
    return test


class _Source:
    """Pieces to read: names, test flags, a reader, a cache key, provenance."""

    def __init__(
        self, names: list[str], is_test: list[bool], read: Callable[[int], np.ndarray],
        key: str, source: str, licence: str,
    ) -> None:
        self.names, self.is_test, self.read = names, is_test, read
        self.key, self.source, self.licence = key, source, licence

    def limit(self, max_pieces: int | None) -> _Source:
        """Keep the first ``max_pieces`` pieces of each split."""
        if max_pieces is None:
            return self
        keep, counts = [], {False: 0, True: 0}
        for i, t in enumerate(self.is_test):
            if counts[t] < max_pieces:
                keep.append(i)
                counts[t] += 1
        read = self.read
        return _Source(
            [self.names[i] for i in keep], [self.is_test[i] for i in keep],
            lambda j: read(keep[j]), self.key, self.source, self.licence,
        )


def _score_to_midi(score: object, name: str) -> bytes:
    """MIDI bytes of a music21 score; repeats that music21 cannot expand are dropped."""
    from music21 import bar, repeat  # noqa: PLC0415
    from music21.midi import translate  # noqa: PLC0415

    try:
        return translate.streamToMidiFile(score).writestr()
    except repeat.ExpanderException:
        for m in score.recurse().getElementsByClass("Measure"):
            if isinstance(m.leftBarline, bar.Repeat):
                m.leftBarline = bar.Barline()
            if isinstance(m.rightBarline, bar.Repeat):
                m.rightBarline = bar.Barline()
        for r in list(score.recurse().getElementsByClass(repeat.RepeatExpression)):
            r.activeSite.remove(r)
        try:
            return translate.streamToMidiFile(score).writestr()
        except repeat.ExpanderException:
            warnings.warn(f"{name}: badly formed repeats; piece skipped.", stacklevel=2)
            return b""


def _chorale_source(sustain: bool) -> _Source:
    try:
        import music21  # noqa: PLC0415
        from music21 import corpus  # noqa: PLC0415
    except ImportError as exc:
        msg = (
            "create_maestro_datasets(path=None) needs the offline stand-in: run "
            "`pip install music21==10.5.1 pretty_midi`, or pass path= a MAESTRO folder."
        )
        raise DattriRuntimeError(msg) from exc
    names = [str(n) for n in corpus.chorales.Iterator(returnType="filename")]

    def read(i: int) -> np.ndarray:
        midi = _score_to_midi(corpus.parse(names[i]), names[i])
        return midi_to_events(midi, sustain=sustain) if midi else np.zeros(0, np.int64)

    key = f"music21 {music21.__version__} chorales"
    return _Source(
        names, _every_tenth_is_test(len(names)), read, key,
        "Bach chorales (music21 corpus) - offline stand-in for MAESTRO", CHORALES_LICENCE,
    )


def _metadata_rows(root: Path) -> tuple[Path, list[tuple[str, str]]] | None:
    """``(folder, [(midi_filename, split)])`` from MAESTRO's csv / json metadata."""
    metas = sorted(root.glob("maestro-v*.csv")) + sorted(root.glob("*/maestro-v*.csv"))
    metas += sorted(root.glob("maestro-v*.json")) + sorted(root.glob("*/maestro-v*.json"))
    for meta in metas:
        try:
            if meta.suffix == ".csv":
                with meta.open(newline="", encoding="utf-8") as fh:
                    rows = [(r["midi_filename"], r["split"]) for r in csv.DictReader(fh)]
            else:
                table = json.loads(meta.read_text(encoding="utf-8"))
                if isinstance(table, list):  # v2 json: a list of records
                    rows = [(r["midi_filename"], r["split"]) for r in table]
                else:  # v3 json: columns -> {row id: value}
                    files, splits = table["midi_filename"], table["split"]
                    rows = [(files[k], splits[k]) for k in files]
        except (KeyError, TypeError, ValueError, csv.Error):
            continue
        if rows:
            return meta.parent, rows
    return None


def _midi_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _MIDI_SUFFIXES)


def _file_source(path: Path, generated_music: bool, sustain: bool) -> _Source:
    if not path.is_dir():
        msg = (
            f"path: {str(path)!r} is not a folder; pass the maestro-v2.0.0 folder (or "
            "one containing it, or any folder of .mid files), or path=None for the "
            "offline stand-in."
        )
        raise DattriValueError(msg)
    meta = _metadata_rows(path)
    if meta is not None:
        base, rows = meta
        pairs = [(base / f, s == "test") for f, s in rows if s in ("train", "test")]
    else:
        files = [f for f in _midi_files(path) if "generated_music" not in f.parts]
        pairs = list(zip(files, _every_tenth_is_test(len(files))))
    if generated_music:
        gen = _midi_files(path / "generated_music")
        if not gen:
            msg = (
                f"generated_music: True needs MIDI files in {str(path / 'generated_music')!r} "
                "(nothing is downloaded here); put the generated pieces there or pass "
                "generated_music=False."
            )
            raise DattriValueError(msg)
        pairs = [(f, False) for f, t in pairs if not t] + [(f, True) for f in gen]
    missing = [str(f) for f, _ in pairs if not f.is_file()]
    if missing or not pairs:
        msg = (
            f"path: {str(path)!r} lists {len(missing)} missing MIDI files (first: "
            f"{missing[:1]}) or holds none; pass a complete MAESTRO folder."
        )
        raise DattriValueError(msg)
    files = [f for f, _ in pairs]
    stats = [f"{f.relative_to(path) if f.is_relative_to(path) else f} {f.stat().st_size} "
             f"{f.stat().st_mtime_ns}" for f in files]
    return _Source(
        [str(f) for f in files], [t for _, t in pairs],
        lambda i: midi_to_events(files[i], sustain=sustain),
        f"{path.resolve()}\n" + "\n".join(stats), f"MIDI files in {path}", MAESTRO_LICENCE,
    )


def _windows(
    streams: list[np.ndarray],
    pieces: list[int],
    shifts: Sequence[int],
    seq_len: int,
    stride: int,
    first_only: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows of ``seq_len + 1`` events: ``(windows, piece ids, transpositions)``."""
    wins, owner, moved = [], [], []
    for p in pieces:
        for t in shifts:
            s = transpose_events(streams[p], t)
            if s is None or len(s) < seq_len + 1:
                continue
            w = np.lib.stride_tricks.sliding_window_view(s, seq_len + 1)[::stride]
            w = w[:1] if first_only else w
            wins.append(w)
            owner += [p] * len(w)
            moved += [t] * len(w)
    if not wins:
        return np.zeros((0, seq_len + 1), np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(wins), np.asarray(owner), np.asarray(moved)


def _pick(available: int, wanted: int | None, seed: int, name: str) -> torch.Tensor:
    """Seeded sample of ``wanted`` of ``available`` positions, in increasing order."""
    if wanted is None or wanted >= available:
        if wanted is not None and wanted > available:
            warnings.warn(
                f"{name}={wanted} but only {available} windows exist; using all {available} "
                "(lower stride=, add transpositions, or read more pieces for more).",
                stacklevel=3,
            )
        return torch.arange(available)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(available, generator=gen)[:wanted].sort().values


def _check_int(name: str, value: object, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        none = " or None" if allow_none else ""
        msg = f"{name}: expected an int >= {low}{none}, got {value!r}."
        raise DattriValueError(msg)


def _check_args(
    seq_len: int, stride: int | None, n_train: int | None, n_test: int | None,
    max_pieces: int | None, transpose: Sequence[int] | None,
) -> None:
    _check_int("seq_len", seq_len, 1)
    _check_int("stride", stride, 1, allow_none=True)
    _check_int("n_train", n_train, 1, allow_none=True)
    _check_int("n_test", n_test, 1, allow_none=True)
    _check_int("max_pieces", max_pieces, 1, allow_none=True)
    if transpose is not None and (
        isinstance(transpose, (str, bytes))
        or not all(isinstance(t, (int, np.integer)) and abs(t) <= 127 for t in transpose)
        or len(transpose) == 0
    ):
        msg = f"transpose: expected a non-empty sequence of ints (semitones), got {transpose!r}."
        raise DattriValueError(msg)


def create_maestro_datasets(  # noqa: PLR0913
    path: str | os.PathLike | None = None,
    generated_music: bool = False,
    *,
    seq_len: int = MAX_SEQUENCE,
    n_train: int | None = 5000,
    n_test: int | None = 178,
    stride: int | None = None,
    transpose: Sequence[int] | None = None,
    max_pieces: int | None = None,
    one_test_window_per_piece: bool = True,
    sustain: bool = True,
    cache_dir: str | os.PathLike | bool | None = None,
    seed: int = 0,
    progress: bool | None = None,
    dataset_path: str | os.PathLike | None = None,
) -> tuple[EventDataset, EventDataset]:
    """Create the training and test sets of the Music Transformer setting.

    Args:
        path: a MAESTRO folder (see the module docstring); ``None`` uses the
            offline stand-in (Bach chorales from music21) and warns.
        generated_music: use the MIDI files in ``path/generated_music`` as the
            test set (the published setting's generated prompts; not downloaded).
        seq_len: events per example (the published setting uses 256).
        n_train: training examples sampled (seeded) from all training windows
            (paper: 5,000); ``None`` keeps all.
        n_test: test examples likewise (paper: 178); ``None`` keeps all.
        stride: distance between window starts; default ``seq_len`` (disjoint).
        transpose: semitone shifts applied to every piece (copies that leave
            0..127 are skipped); default ``-5..6`` offline, ``(0,)`` with ``path``.
        max_pieces: read only the first ``max_pieces`` pieces of each split
            (reduced runs and tests).
        one_test_window_per_piece: the test set holds the first window of each
            test piece (and transposition) only, as the paper's one prompt per
            test performance (MAESTRO v2.0.0 has 178); ``False``: all windows.
        sustain: extend notes held by the sustain pedal.
        cache_dir: folder for the cached event streams (atomic writes);
            default :func:`default_cache_dir`; ``False`` disables caching.
        seed: seed of the sampling of ``n_train`` / ``n_test`` examples.
        progress: show a progress bar while reading MIDI (``None``: on a terminal).
        dataset_path: the published keyword for ``path``.

    Returns:
        ``(train, test)``: :class:`EventDataset` of ``(x, y)`` int64 pairs of
        shape ``(seq_len,)``, ``y[t] = x[t + 1]`` within the piece.

    Raises:
        DattriValueError: bad arguments or an unusable folder.
        DattriRuntimeError: ``path=None`` and music21 / pretty_midi are missing.
    """
    if dataset_path is not None:
        if path is not None:
            msg = "path / dataset_path: give one of them, not both (dataset_path is the old name)."
            raise DattriValueError(msg)
        path = dataset_path
    _check_args(seq_len, stride, n_train, n_test, max_pieces, transpose)
    if path is None:
        if generated_music:
            msg = "generated_music: True needs path= a folder with generated_music/; got path=None."
            raise DattriValueError(msg)
        warnings.warn(_OFFLINE_WARNING, UserWarning, stacklevel=2)
        src = _chorale_source(sustain)
        shifts = tuple(range(-5, 7)) if transpose is None else tuple(transpose)
    else:
        src = _file_source(Path(path).expanduser(), generated_music, sustain)
        shifts = (0,) if transpose is None else tuple(transpose)
    src = src.limit(max_pieces)
    key = f"{_CACHE_VERSION}\nsustain={bool(sustain)}\n{src.key}\n" + "\n".join(src.names)
    if cache_dir is False:
        cache_file = None
    else:
        folder = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir).expanduser()
        digest = hashlib.sha256(key.encode()).hexdigest()[:24]
        cache_file = folder / "maestro" / f"events_{digest}.npz"
    streams = _load_streams(src.names, src.read, key, cache_file, progress)
    stride = seq_len if stride is None else stride
    out = []
    for test, wanted, name in ((False, n_train, "n_train"), (True, n_test, "n_test")):
        ids = [i for i, t in enumerate(src.is_test) if t == test]
        first_only = test and one_test_window_per_piece
        wins, owner, moved = _windows(streams, ids, shifts, seq_len, stride, first_only)
        keep = _pick(len(wins), wanted, seed, name)
        w = torch.from_numpy(np.ascontiguousarray(wins)).long()[keep]
        out.append(EventDataset(
            w[:, :-1].contiguous(), w[:, 1:].contiguous(), pieces=src.names,
            piece=torch.from_numpy(owner).long()[keep],
            transposition=torch.from_numpy(moved).long()[keep],
            source=src.source, licence=src.licence,
        ))
    return out[0], out[1]
