"""The bar grid typed over OSC (tempo, signature, position), on the output clock.

Why a grid object: a jam places its chunks and reads a stored melody on bar lines, and where
those bar lines are may come from the user typing a tempo (this module) or from a followed DAW
clock (bridge/clock/, the same shape). Both speak the interface of `bridge.clock.grid.Grid` (units in docs/daw.md): times are
seconds on the OUTPUT clock (frames played / rate), beats are denominator notes counted from 0 at
bar 1, and the tempo is read at each chunk (a change takes effect at the next chunk).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class TypedGrid:
    """A constant-tempo grid whose beat 0 falls at output time `origin` (seconds)."""

    tempo: float
    numerator: int = 4
    denominator: int = 4
    playing: bool = True
    origin: float = 0.0
    source: str = "typed"

    def __post_init__(self) -> None:
        from plugin_host.tempo import TempoError, TimeSignature, check_bpm  # the one home of these rules

        try:
            check_bpm(self.tempo)
            TimeSignature(self.numerator, self.denominator)
        except TempoError as e:
            raise ValueError(str(e)) from None

    @property
    def beat_seconds(self) -> float:
        return 60.0 / self.tempo * 4.0 / self.denominator

    @property
    def bar_seconds(self) -> float:
        return self.beat_seconds * self.numerator

    def beat_at(self, t: float) -> float:
        return (t - self.origin) / self.beat_seconds

    def next_bar_time(self, t: float) -> float:
        bars = math.ceil(self.beat_at(t) / self.numerator - 1e-9)
        return self.origin + bars * self.bar_seconds


class TypedGridSource:
    """The session transport as a grid: call it for the current TypedGrid (thread-safe).

    clock: the output clock in seconds. A tempo or signature change keeps the beat that is
    sounding now where it is; `locate(beat)` puts `beat` at now.
    """

    def __init__(self, tempo: float, numerator: int = 4, denominator: int = 4, playing: bool = True,
                 position: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        g = TypedGrid(tempo, numerator, denominator, playing)
        self._grid = _replace(g, origin=clock() - position * g.beat_seconds)

    def __call__(self) -> TypedGrid:
        return self._grid

    def update(self, tempo: float | None = None, numerator: int | None = None, denominator: int | None = None,
               playing: bool | None = None, position: float | None = None) -> TypedGrid:
        with self._lock:
            old = self._grid
            now = self.clock()
            beat = old.beat_at(now) if position is None else float(position)
            new = TypedGrid(old.tempo if tempo is None else float(tempo),
                            old.numerator if numerator is None else int(numerator),
                            old.denominator if denominator is None else int(denominator),
                            old.playing if playing is None else bool(playing))
            self._grid = _replace(new, origin=now - beat * new.beat_seconds)
            return self._grid


def _replace(g: TypedGrid, **kw) -> TypedGrid:
    from dataclasses import replace

    return replace(g, **kw)
