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

from bridge.protocol import ProtocolError
from bridge.stem_request import melody_chroma, session_melody_record


def whole_melody_chroma(melody: dict[str, Any], rate: float, tempo: float) -> np.ndarray:
    """A live track's melody at `rate` frames a second, as long as it is (no more, no less)."""
    return melody_chroma(session_melody_record(melody, tempo), rate, None, "jam melody")


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
