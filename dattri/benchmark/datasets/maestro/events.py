"""The 388-event performance vocabulary of Oore et al. (2018) / Huang et al. (2018).

A piano performance (a set of notes with onset, offset, pitch and velocity) is
written as one stream of events on a 10 ms grid:

==============  ==========  ==============================================
event           token ids   meaning
==============  ==========  ==============================================
NOTE_ON p       0 .. 127    pitch ``p`` starts at the current time
NOTE_OFF p      128 .. 255  pitch ``p`` stops at the current time
TIME_SHIFT k    256 .. 355  advance the clock by ``k`` steps of 10 ms,
                            ``k = 1 .. 100`` (token ``255 + k``)
VELOCITY b      356 .. 387  later NOTE_ONs get velocity bin ``b = 0 .. 31``
==============  ==========  ==============================================

Encoding (:func:`notes_to_events`): times are rounded to the grid
(``step = floor(100 t + 1/2)``), a note lasts at least one step, velocities go
to 32 equal bins (``b = v // 4``; decoded as ``4 b + 2``). Notes of the same
pitch never overlap in the stream: a re-struck pitch ends the sounding one, and
two notes struck at the same step merge into the longer one. Events at one step
are ordered NOTE_OFFs first, then NOTE_ONs, each by pitch; a VELOCITY event
precedes a NOTE_ON whose bin differs from the current one. A gap of ``d``
steps becomes ``d // 100`` shifts of 100 and one shift of ``d % 100``.

Decoding (:func:`events_to_notes`) inverts this exactly for quantised input
(times on the 10 ms grid, velocities ``4 b + 2``, no same-pitch overlaps):
``events_to_notes(notes_to_events(notes)) == notes``.

References:
    S. Oore, I. Simon, S. Dieleman, D. Eck, K. Simonyan. "This time with feeling:
    learning expressive musical performance", Neural Computing and Applications,
    2018. C.-Z. A. Huang et al. "Music Transformer", ICLR 2019 (arXiv:1809.04281).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np

from dattri.errors import DattriRuntimeError, DattriValueError

__all__ = [
    "NOTE_OFF_OFFSET",
    "NOTE_ON_OFFSET",
    "STEPS_PER_SECOND",
    "TIME_SHIFT_OFFSET",
    "VELOCITY_OFFSET",
    "VOCAB_SIZE",
    "Note",
    "event_name",
    "events_to_midi",
    "events_to_notes",
    "midi_to_events",
    "midi_to_notes",
    "notes_to_events",
    "transpose_events",
]

NOTE_ON_OFFSET = 0
NOTE_OFF_OFFSET = 128
TIME_SHIFT_OFFSET = 256
VELOCITY_OFFSET = 356
VOCAB_SIZE = 388
STEPS_PER_SECOND = 100
MAX_SHIFT = 100
VELOCITY_BINS = 32
_DEFAULT_VELOCITY_BIN = 16
_SUSTAIN_CC = 64


class Note(NamedTuple):
    """One note: onset and offset in seconds, MIDI pitch and velocity (0..127)."""

    start: float
    end: float
    pitch: int
    velocity: int


def _step(seconds: float) -> int:
    return int(np.floor(float(seconds) * STEPS_PER_SECOND + 0.5))


def _velocity_bin(velocity: int) -> int:
    return min(max(int(velocity), 0), 127) * VELOCITY_BINS // 128


def _bin_velocity(b: int) -> int:
    return b * (128 // VELOCITY_BINS) + (128 // VELOCITY_BINS) // 2


def _check_pitch(pitch: int) -> int:
    if not 0 <= int(pitch) <= 127:
        msg = f"notes: pitch {pitch} is outside the MIDI range 0..127; clip or drop the note."
        raise DattriValueError(msg)
    return int(pitch)


def _quantise(notes: Iterable[Any]) -> list[tuple[int, int, int, int]]:
    """(on_step, off_step, pitch, velocity_bin), same-pitch overlaps removed."""
    by_pitch: dict[int, list[list[int]]] = {}
    raw = sorted(
        (_step(n.start), _step(n.end), _check_pitch(n.pitch), _velocity_bin(n.velocity))
        for n in notes
    )
    for on, off, pitch, vel in sorted(raw, key=lambda t: (t[2], t[0], -t[1])):
        off = max(off, on + 1)
        kept = by_pitch.setdefault(pitch, [])
        if kept and kept[-1][0] == on:  # struck twice at one step: keep the longer
            kept[-1][1] = max(kept[-1][1], off)
            continue
        if kept and kept[-1][1] > on:  # re-struck while sounding: end the old one
            kept[-1][1] = on
        kept.append([on, off, pitch, vel])
    return sorted(tuple(n) for notes_ in by_pitch.values() for n in notes_)


def _time_shifts(steps: int) -> list[int]:
    out = [TIME_SHIFT_OFFSET + MAX_SHIFT - 1] * (steps // MAX_SHIFT)
    if steps % MAX_SHIFT:
        out.append(TIME_SHIFT_OFFSET + steps % MAX_SHIFT - 1)
    return out


def notes_to_events(notes: Iterable[Any]) -> np.ndarray:
    """Encode notes as performance events.

    Args:
        notes: objects with ``start``, ``end`` (seconds), ``pitch`` (0..127) and
            ``velocity`` attributes (:class:`Note` or ``pretty_midi.Note``).

    Returns:
        ``(n_events,)`` int64 token ids in ``0 .. 387``.

    Raises:
        DattriValueError: a pitch lies outside 0..127.
    """
    stream = []  # (step, kind 0=off / 1=on, pitch, velocity bin)
    for on, off, pitch, vel in _quantise(notes):
        stream.append((on, 1, pitch, vel))
        stream.append((off, 0, pitch, vel))
    tokens: list[int] = []
    now, velocity = 0, None
    for step, kind, pitch, vel in sorted(stream):
        tokens.extend(_time_shifts(step - now))
        now = step
        if kind == 1:
            if vel != velocity:
                tokens.append(VELOCITY_OFFSET + vel)
                velocity = vel
            tokens.append(NOTE_ON_OFFSET + pitch)
        else:
            tokens.append(NOTE_OFF_OFFSET + pitch)
    return np.asarray(tokens, dtype=np.int64)


def events_to_notes(tokens: Sequence[int] | np.ndarray) -> list[Note]:
    """Decode performance events back to notes (the inverse of :func:`notes_to_events`).

    A NOTE_ON of a sounding pitch ends that note first; a NOTE_OFF of a silent
    pitch is ignored; notes still sounding at the end stop at the final time
    (and are dropped if they have no duration). Before the first VELOCITY event
    notes get velocity 66 (bin 16).

    Args:
        tokens: ``(n_events,)`` token ids in ``0 .. 387``.

    Returns:
        Notes sorted by onset then pitch, times in seconds on the 10 ms grid.

    Raises:
        DattriValueError: a token is outside ``0 .. 387``.
    """
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= VOCAB_SIZE):
        msg = f"tokens: ids must lie in 0..{VOCAB_SIZE - 1}, got min {arr.min()} max {arr.max()}."
        raise DattriValueError(msg)
    now, vel = 0, _DEFAULT_VELOCITY_BIN
    sounding: dict[int, tuple[int, int]] = {}
    out: list[tuple[int, int, int, int]] = []

    def close(pitch: int) -> None:
        on, v = sounding.pop(pitch)
        if now > on:
            out.append((on, now, pitch, _bin_velocity(v)))

    for tok in arr.tolist():
        if tok < NOTE_OFF_OFFSET:
            if tok in sounding:
                close(tok)
            sounding[tok] = (now, vel)
        elif tok < TIME_SHIFT_OFFSET:
            if tok - NOTE_OFF_OFFSET in sounding:
                close(tok - NOTE_OFF_OFFSET)
        elif tok < VELOCITY_OFFSET:
            now += tok - TIME_SHIFT_OFFSET + 1
        else:
            vel = tok - VELOCITY_OFFSET
    for pitch in list(sounding):
        close(pitch)
    return [
        Note(on / STEPS_PER_SECOND, off / STEPS_PER_SECOND, p, v)
        for on, off, p, v in sorted(out, key=lambda n: (n[0], n[2]))
    ]


def transpose_events(tokens: np.ndarray, semitones: int) -> np.ndarray | None:
    """Shift every NOTE_ON / NOTE_OFF by ``semitones``; ``None`` if a pitch leaves 0..127.

    This is the pitch-transposition augmentation of Huang et al. (2018), done on
    tokens: time shifts and velocities are unchanged.
    """
    arr = np.asarray(tokens, dtype=np.int64)
    if semitones == 0:
        return arr.copy()
    is_note = arr < TIME_SHIFT_OFFSET
    pitch = arr % 128
    if np.any(is_note & ((pitch + semitones < 0) | (pitch + semitones > 127))):
        return None
    return np.where(is_note, arr + semitones, arr)


def event_name(token: int) -> str:
    """Readable name of a token id, e.g. ``NOTE_ON_60``, ``TIME_SHIFT_25``, ``VELOCITY_22``."""
    token = int(token)
    if not 0 <= token < VOCAB_SIZE:
        msg = f"token: {token} is outside 0..{VOCAB_SIZE - 1}."
        raise DattriValueError(msg)
    if token < NOTE_OFF_OFFSET:
        return f"NOTE_ON_{token}"
    if token < TIME_SHIFT_OFFSET:
        return f"NOTE_OFF_{token - NOTE_OFF_OFFSET}"
    if token < VELOCITY_OFFSET:
        return f"TIME_SHIFT_{token - TIME_SHIFT_OFFSET + 1}"
    return f"VELOCITY_{token - VELOCITY_OFFSET}"


def _pretty_midi() -> Any:
    try:
        import pretty_midi  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover - depends on the environment
        msg = "MIDI files need pretty_midi: run `pip install pretty_midi`."
        raise DattriRuntimeError(msg) from exc
    return pretty_midi


def _sustained(notes: list[Any], control_changes: list[Any]) -> list[Note]:
    """Extend notes released while the sustain pedal (CC 64 >= 64) is down."""
    intervals, down = [], None
    for cc in sorted(
        (c for c in control_changes if c.number == _SUSTAIN_CC), key=lambda c: c.time,
    ):
        if cc.value >= 64 and down is None:
            down = cc.time
        elif cc.value < 64 and down is not None:
            intervals.append((down, cc.time))
            down = None
    if down is not None:
        intervals.append((down, float("inf")))
    out = []
    for n in notes:
        end = n.end
        for a, b in intervals:
            if a <= n.end < b:
                end = max(end, b if np.isfinite(b) else n.end)
                break
        out.append(Note(n.start, end, n.pitch, n.velocity))
    return out


def midi_to_notes(midi: Any, sustain: bool = True) -> list[Note]:
    """Read the notes of every non-drum instrument of a MIDI file.

    Args:
        midi: a path, raw MIDI ``bytes``, a binary file object, or a
            ``pretty_midi.PrettyMIDI``.
        sustain: extend notes held by the sustain pedal (CC 64), as Oore et al.
            do for MAESTRO.

    Returns:
        Notes sorted by onset, pitch.

    Raises:
        DattriValueError: the file cannot be read as MIDI.
    """
    pm_mod = _pretty_midi()
    if isinstance(midi, pm_mod.PrettyMIDI):
        pm = midi
    else:
        src = io.BytesIO(midi) if isinstance(midi, (bytes, bytearray)) else midi
        if isinstance(src, (str, os.PathLike)):
            src = os.fspath(src)
        try:
            pm = pm_mod.PrettyMIDI(src)
        except Exception as exc:  # mido/pretty_midi raise many types
            msg = f"midi: cannot read {midi!r:.80} as a MIDI file ({exc})."
            raise DattriValueError(msg) from exc
    notes: list[Note] = []
    for inst in pm.instruments:
        if inst.is_drum:
            continue
        part = [Note(n.start, n.end, n.pitch, n.velocity) for n in inst.notes]
        notes.extend(_sustained(part, inst.control_changes) if sustain else part)
    return sorted(notes, key=lambda n: (n.start, n.pitch))


def midi_to_events(midi: Any, sustain: bool = True) -> np.ndarray:
    """Read a MIDI file and encode it: ``notes_to_events(midi_to_notes(midi, sustain))``."""
    return notes_to_events(midi_to_notes(midi, sustain=sustain))


def events_to_midi(tokens: Sequence[int] | np.ndarray, program: int = 0) -> Any:
    """Decode events to a one-instrument ``pretty_midi.PrettyMIDI`` (e.g. to listen)."""
    pm_mod = _pretty_midi()
    pm = pm_mod.PrettyMIDI()
    inst = pm_mod.Instrument(program=program)
    inst.notes = [
        pm_mod.Note(velocity=n.velocity, pitch=n.pitch, start=n.start, end=n.end)
        for n in events_to_notes(tokens)
    ]
    pm.instruments.append(inst)
    return pm
