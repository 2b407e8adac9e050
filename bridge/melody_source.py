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

from bridge.jobs import melody_chroma
from bridge.protocol import ProtocolError


def natural_chroma(melody: dict[str, Any], rate: float, tempo: float) -> np.ndarray:
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
        t = np.mod(start_s + (np.arange(n) + 0.5) / frame_rate, self.seconds)
        idx = np.floor(t * self.rate + 1e-9).astype(np.int64)
        # the chroma's length was rounded down to whole frames: its last frame lasts to the end
        idx[(idx >= len(self.frames)) & (t < (len(self.frames) + 1) / self.rate)] = len(self.frames) - 1
        out = np.zeros((n, 12), np.float32)
        inside = idx < len(self.frames)
        out[inside] = self.frames[idx[inside]]
        return out
