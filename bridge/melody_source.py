"""A track's stored melody as the live source a jam reads from: the melody looped under the jam.

A jam asks its melody source for the chroma of a stretch of wall-clock time (the jam's clock).
A track melody set over OSC (a MIDI file, a take, notes or a chroma) is not played live, so
it is laid out from the moment the jam starts and repeats for as long as the jam runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bridge.jobs import melody_chroma
from bridge.protocol import ProtocolError


def whole_melody_chroma(melody: dict[str, Any], rate: float, tempo: float) -> np.ndarray:
    """The whole melody at `rate` frames a second, as long as it naturally is."""
    kind = melody["kind"]
    if kind == "chroma":
        seconds = (len(melody["data"]) * 3 // 4) / 48 / float(melody["frame_rate"])
    elif kind == "notes":
        seconds = max(s + n for _, s, n in melody["notes"]) * 60.0 / tempo
    else:
        try:
            import model.melody as mm
        except ImportError:
            raise ProtocolError("unavailable", "this build has no melody support (model.melody is missing)") from None
        return np.asarray(mm.load_melody(melody["path"], rate), dtype=np.float32)
    return melody_chroma(melody, rate, max(seconds, 1.0 / rate), tempo)


class LoopedMelody:
    """jam MelodySource: chroma(start_s, seconds, frame_rate) of the melody looped from `t0`."""

    def __init__(self, chroma: np.ndarray, rate: float, clock: Callable[[], float] = time.monotonic):
        if chroma.ndim != 2 or chroma.shape[1] != 12 or chroma.shape[0] == 0:
            raise ProtocolError("bad_args", f"melody must be (frames, 12), got {chroma.shape}")
        self.frames, self.rate = np.ascontiguousarray(chroma, dtype=np.float32), float(rate)
        self.t0 = clock()

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        n = max(1, int(round(seconds * frame_rate)))
        t = (start_s - self.t0) + np.arange(n) / frame_rate
        idx = np.floor(t * self.rate + 1e-9).astype(np.int64) % len(self.frames)
        return self.frames[idx]
