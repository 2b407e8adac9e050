"""The typed transport as a clock follower: tempo, signature, play state and position set over OSC.

`/transport/*` messages change the session transport; `TypedFollower.changed` then re-anchors its
grid on the output clock. It is the one model of the typed transport: it leads when `serve
--follow typed` (the default), and under any other source it is the base whose signature applies
where the source has none (MIDI clock, Link, REAPER). The hub is the only grid source for jams,
stems and replies; nothing else keeps a typed grid.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.clock.follower import Follower
from bridge.clock.grid import Grid
from plugin_host.tempo import TimeSignature


class TypedFollower(Follower):
    """The session transport as a Grid; `changed()` after every /transport/* change."""

    source = "typed"

    def __init__(self, session, clock: Callable[[], float] = time.monotonic):
        self.session = session
        t = session.transport
        self._at = clock()  # output time of the last change
        self._quarters = t.position  # where the transport was then, in quarter notes
        self._tempo, self._playing = t.tempo, t.playing  # ... and how it moved from there
        super().__init__(self._make(time.monotonic()), clock=clock)
        self._grid = self.base

    def _make(self, updated: float) -> Grid:
        t = self.session.transport
        sig = TimeSignature(t.numerator, t.denominator)
        return Grid(tempo=t.tempo, numerator=t.numerator, denominator=t.denominator, playing=t.playing,
                    source="typed", anchor_time=self._at, anchor_beat=sig.quarters_to_beats(self._quarters),
                    updated=updated)

    def _quarters_at(self, t: float) -> float:
        """Quarter notes at output time t, as the transport stood before a change."""
        if not self._playing:
            return self._quarters
        return self._quarters + (t - self._at) * self._tempo / 60.0

    def changed(self, located: float | None = None) -> Grid:
        """Re-anchor now, at `located` quarter notes when the message named a position, else where
        the transport had got to (a tempo change while playing keeps the beat that is sounding)."""
        now = self.clock()
        self._quarters = float(located) if located is not None else self._quarters_at(now)
        self._at = now
        t = self.session.transport
        self._tempo, self._playing = t.tempo, t.playing
        g = self._make(time.monotonic())
        self.base = g
        with self._lock:
            self._grid = g
        return g
