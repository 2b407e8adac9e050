"""The bar grid every clock source produces: one immutable snapshot of tempo, signature and position.

A follower replaces its snapshot whenever its source says something new; readers (the daemon,
jams, stems) never see one half-updated. Between updates the position is extrapolated from the
anchor (an output-clock time and the beat there) at the snapshot's tempo.

Units (the bar grid of docs/daw.md): `tempo` is quarter notes per minute, as
REAPER, MIDI clock, Link and the session transport count it; beats are the signature's
denominator notes, counted from 0 at bar 1, so bar N starts at beat (N-1)*numerator. In x/4
the two are the same thing; in 6/8 one quarter note is two beats.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from plugin_host.tempo import DENOMINATORS, MAX_BPM, MAX_NUMERATOR, MIN_BPM, TimeSignature  # the one home of these

__all__ = ["SOURCES", "MIN_BPM", "MAX_BPM", "Grid", "beat_of_bbt"]

SOURCES = ("typed", "jack", "link", "midi-clock", "osc")


@dataclass(frozen=True)
class Grid:
    """One snapshot of a clock source; satisfies the grid interface jams and stems read."""

    tempo: float = 120.0
    numerator: int = 4
    denominator: int = 4
    playing: bool = False
    source: str = "typed"
    anchor_time: float = 0.0   # output-clock seconds at which the position was `anchor_beat`
    anchor_beat: float = 0.0   # beats (denominator notes) from bar 1
    updated: float = 0.0       # time.monotonic() of the source's last word, for the age in replies

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"clock source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if not (math.isfinite(self.tempo) and MIN_BPM <= self.tempo <= MAX_BPM):
            raise ValueError(f"tempo must be in [{MIN_BPM:g}, {MAX_BPM:g}] bpm, got {self.tempo}")
        if not 1 <= self.numerator <= MAX_NUMERATOR or self.denominator not in DENOMINATORS:
            raise ValueError(f"time signature {self.numerator}/{self.denominator} is not one musicbridge "
                             f"follows (numerator 1-{MAX_NUMERATOR}, denominator "
                             f"{'/'.join(map(str, DENOMINATORS))})")
        if not (math.isfinite(self.anchor_beat) and math.isfinite(self.anchor_time)):
            raise ValueError("grid anchor must be finite")

    # ------------------------------------------------------------ the grid interface

    @property
    def time_signature(self) -> TimeSignature:
        return TimeSignature(self.numerator, self.denominator)

    @property
    def beats_per_second(self) -> float:
        return self.tempo / 60.0 / self.time_signature.quarters_per_beat

    @property
    def bar_seconds(self) -> float:
        return self.numerator / self.beats_per_second

    @property
    def signature(self) -> str:
        return f"{self.numerator}/{self.denominator}"

    def beat_at(self, t: float) -> float:
        """Position in beats at output time t; a stopped transport stays where it stopped."""
        if not self.playing:
            return self.anchor_beat
        return self.anchor_beat + (t - self.anchor_time) * self.beats_per_second

    def next_bar_time(self, t: float) -> float:
        """First bar line at or after t. Stopped, the grid counts on from where it stands at t,
        so a jam started while the DAW is stopped still starts on a bar line."""
        beat = self.beat_at(t)
        bars = math.ceil(beat / self.numerator - 1e-9)
        return t + (bars * self.numerator - beat) / self.beats_per_second

    # ------------------------------------------------------------ helpers

    def bar_line_at_or_before(self, beat: float) -> float:
        """The beat of the bar line at or before `beat` (a stem's place on the timeline)."""
        return math.floor(beat / self.numerator + 1e-9) * self.numerator

    def bar_start_beat(self, bar: int) -> float:
        """Bar N (1 = the first bar) starts at beat (N-1)*numerator."""
        return (bar - 1) * self.numerator

    def beats_to_seconds(self, beats: float) -> float:
        """Timeline seconds of a beat position, at this grid's tempo (a constant-tempo project)."""
        return beats / self.beats_per_second

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.monotonic() if now is None else now) - self.updated)

    def moved(self, **changes) -> Grid:
        return replace(self, **changes)


def beat_of_bbt(bar: int, beat: int, tick: float, ticks_per_beat: float, numerator: int) -> float:
    """Bar|beat|tick (all counting from 1 for bar and beat) -> beats from bar 1."""
    return (bar - 1) * numerator + (beat - 1) + tick / ticks_per_beat
