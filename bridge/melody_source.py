"""A track's stored melody as the live source a jam reads from: the melody looped under the jam.

A track melody set over OSC (a MIDI file, a take, notes or a chroma) is not played live: it is
known ahead, so it loops on the jam's bar grid. Its bar 0 plays on the jam's first bar line, and
the jam asks it (`live = False`) for exactly the stretch each chunk plays over, in seconds from
that first bar line.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from bridge.protocol import ProtocolError
from bridge.stem_request import melody_chroma, session_melody_record


def whole_melody_chroma(melody: dict[str, Any], rate: float, tempo: float) -> np.ndarray:
    """A live track's melody at `rate` frames a second, as long as it is (no more, no less)."""
    return melody_chroma(session_melody_record(melody, tempo), rate, None, "jam melody")


class LoopedMelody:
    """jam MelodySource: the melody looped, time 0 = the jam's first bar line (bar 0 of the melody).

    `live = False`: the jam asks for the stretch a chunk will play over, not what was just played.
    """

    live = False

    def __init__(self, chroma: np.ndarray, rate: float, bar_seconds: float | None = None):
        """bar_seconds: the grid's bar; the loop is the melody rounded up to whole bars (a frame's
        worth of rounding forgiven), so every repeat starts on a bar line. None: loop as long as
        the chroma is."""
        if chroma.ndim != 2 or chroma.shape[1] != 12 or chroma.shape[0] == 0:
            raise ProtocolError("bad_args", f"melody must be (frames, 12), got {chroma.shape}")
        self.frames, self.rate = np.ascontiguousarray(chroma, dtype=np.float32), float(rate)
        natural = len(self.frames) / self.rate
        if bar_seconds:
            bars = max(1, math.ceil((natural - 1.0 / self.rate) / bar_seconds - 1e-9))
            self.seconds = bars * bar_seconds
        else:
            self.seconds = natural

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        """(frames, 12): frame i is the melody at the centre of [start_s + i/rate, ...), looped
        every `self.seconds` (silence between the melody's end and the loop's last bar line)."""
        n = max(1, int(round(seconds * frame_rate)))
        # Times to the nanosecond first: one instant reached by two sums (a chunk reading from
        # another start) must land on the same side of a loop boundary, or the jam sees a
        # "changed" melody and re-prefills for nothing.
        t = np.mod(np.round(start_s + (np.arange(n) + 0.5) / frame_rate, 9), self.seconds)
        idx = np.floor(t * self.rate + 1e-9).astype(np.int64)
        # the chroma's length was rounded down to whole frames: its last frame lasts to the end
        idx[(idx >= len(self.frames)) & (t < (len(self.frames) + 1) / self.rate)] = len(self.frames) - 1
        out = np.zeros((n, 12), np.float32)
        inside = idx < len(self.frames)
        out[inside] = self.frames[idx[inside]]
        return out
