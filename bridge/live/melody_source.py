"""A track's stored melody as the live source a jam reads from: the melody looped under the jam.

A track melody set over OSC (a MIDI file, a take, notes or a chroma) is not played live: it is
known ahead, so it loops on the jam's bar grid. Its bar 0 plays on the jam's first bar line, and
the jam asks it (`live = False`) for exactly the stretch each chunk plays over, in seconds from
that first bar line.

Nothing here expands the melody over its whole length: the loop is computed from the melody's
length as a number, and each chunk expands only the frames it plays over
(model.conditioning.melody.NoteMelody / ChromaMelody windows), so a melody declared 300,000 s long costs a
chunk what a short one does. A melody file is not read at /jam/start (the OSC thread): the jam
reads it on its own thread before its first chunk.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from bridge.osc.protocol import ProtocolError
from bridge.state.session_check import chroma_from_text
import model.conditioning.melody as mm

GATHER_GAP = 64  # frames: source indices closer than this are read as one window


class WindowedMelody(Protocol):
    """model.conditioning.melody.NoteMelody or ChromaMelody: a melody expanded one window at a time."""

    def frames(self, frame_rate: float) -> int: ...

    def window(self, frame_rate: float, f0: int, f1: int) -> np.ndarray: ...


def stored_melody(melody: dict[str, Any], rate: float, tempo: float,
                  inputs=None) -> WindowedMelody | Callable[[], WindowedMelody]:
    """A track's stored melody ({"kind": "notes"|"chroma"|"midi"|"audio", ...}) as a windowed
    melody; for a file, a loader that reads it when called (from the jam's thread).

    Notes and chromas come in the OSC message itself, so building them costs what the message
    holds (sorting its notes, decoding its bytes), whatever length they declare. inputs
    (bridge.osc.input_files.Inputs): a file is opened, checked and limited there (size, MIDI events,
    audio length) before it is parsed.
    """
    kind = melody["kind"]
    if kind == "notes":
        return mm.NoteMelody(mm.beats_to_seconds(melody["notes"], tempo))
    if kind == "chroma":
        data = chroma_from_text(melody["data"])
        return mm.ChromaMelody(np.frombuffer(data, dtype="<f4").reshape(-1, 12), float(melody["frame_rate"]))
    path = str(melody["path"])

    def read(p: Path) -> WindowedMelody:
        if p.suffix.lower() in (".mid", ".midi"):
            return mm.NoteMelody(mm.midi_notes(p))
        # audio (or a .npy chroma at `rate`): whole, but bounded by the input limits on its length
        return mm.ChromaMelody(mm.load_melody(p, rate), rate)

    def load() -> WindowedMelody:
        if inputs is None:
            return read(Path(path))
        with inputs.melody_file(path) as pinned:  # keeps the suffix, which picks the reader
            return read(Path(pinned))

    return load


def whole_melody_chroma(melody: dict[str, Any], rate: float, tempo: float) -> np.ndarray:
    """A track's melody at `rate` frames a second, as long as it is (no more, no less).

    Proportional to the melody's declared length: for tools and tests, never for the OSC thread
    or a chunk (LoopedMelody reads windows)."""
    src = stored_melody(melody, rate, tempo)
    if not hasattr(src, "window"):
        src = src()
    return src.window(rate, 0, src.frames(rate))


class LoopedMelody:
    """jam MelodySource: the melody looped, time 0 = the jam's first bar line (bar 0 of the melody).

    `live = False`: the jam asks for the stretch a chunk will play over, not what was just played.
    """

    live = False

    def __init__(self, melody: np.ndarray | WindowedMelody | Callable[[], WindowedMelody], rate: float,
                 bar_seconds: float | None = None):
        """melody: a (frames, 12) chroma at `rate`, a windowed melody (model.conditioning.melody), or a loader
        returning one, called on the first read (so a file is parsed on the jam's thread).
        bar_seconds: the grid's bar; the loop is the melody rounded up to whole bars (a frame's
        worth of rounding forgiven), so every repeat starts on a bar line. None: loop as long as
        the melody is."""
        self.rate, self._bar = float(rate), bar_seconds
        self._lock = threading.Lock()
        self._load: Callable[[], WindowedMelody] | None = None
        self._source: WindowedMelody | None = None
        if isinstance(melody, np.ndarray):
            if melody.ndim != 2 or melody.shape[1] != 12 or melody.shape[0] == 0:
                raise ProtocolError("bad_args", f"melody must be (frames, 12), got {melody.shape}")
            self._set(mm.ChromaMelody(melody, self.rate))
        elif hasattr(melody, "window"):
            self._set(melody)
        else:
            self._load = melody

    def _set(self, source: WindowedMelody) -> None:
        self._source = source
        self.length = source.frames(self.rate)  # frames at `rate`: the melody's own length
        natural = self.length / self.rate
        if self._bar:
            bars = max(1, math.ceil((natural - 1.0 / self.rate) / self._bar - 1e-9))
            self._seconds = bars * self._bar
        else:
            self._seconds = natural

    @property
    def loaded(self) -> bool:
        return self._source is not None

    def source(self) -> WindowedMelody:
        """The windowed melody, read now if it is a file not read yet (the caller's thread)."""
        with self._lock:
            if self._source is None:
                assert self._load is not None
                self._set(self._load())
            return self._source  # type: ignore[return-value]

    @property
    def seconds(self) -> float:
        """The loop's length (reads the melody if it is not read yet)."""
        self.source()
        return self._seconds

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        """(frames, 12): frame i is the melody at the centre of [start_s + i/rate, ...), looped
        every `self.seconds` (silence between the melody's end and the loop's last bar line)."""
        src = self.source()
        n = max(1, int(round(seconds * frame_rate)))
        # Times to the nanosecond first: one instant reached by two sums (a chunk reading from
        # another start) must land on the same side of a loop boundary, or the jam sees a
        # "changed" melody and re-prefills for nothing.
        t = np.mod(np.round(start_s + (np.arange(n) + 0.5) / frame_rate, 9), self._seconds)
        idx = np.floor(t * self.rate + 1e-9).astype(np.int64)
        # the melody's length was rounded to whole frames: its last frame lasts to the end
        idx[(idx >= self.length) & (t < (self.length + 1) / self.rate)] = self.length - 1
        out = np.zeros((n, 12), np.float32)
        inside = idx < self.length
        if inside.any():
            out[inside] = self._gather(src, idx[inside])
        return out

    def _gather(self, src: WindowedMelody, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` of the melody at `rate`, expanding only windows around them: the indices of a
        chunk form a few runs (one more at each loop wrap), each read as one window."""
        u = np.unique(idx)
        cut = np.nonzero(np.diff(u) > GATHER_GAP)[0] + 1
        firsts = np.concatenate([u[:1], u[cut]])
        lasts = np.concatenate([u[cut - 1], u[-1:]])
        tables = [src.window(self.rate, int(a), int(b) + 1) for a, b in zip(firsts, lasts)]
        offsets = np.concatenate([[0], np.cumsum([len(tb) for tb in tables])[:-1]]).astype(np.int64)
        run = np.searchsorted(firsts, idx, "right") - 1
        return np.concatenate(tables)[offsets[run] + idx - firsts[run]]
