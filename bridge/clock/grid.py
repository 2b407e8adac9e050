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
import threading
import time
from dataclasses import dataclass, replace

from plugin_host.tempo import DENOMINATORS, MAX_BPM, MAX_NUMERATOR, MIN_BPM, TimeSignature  # the one home of these

__all__ = ["SOURCES", "MIN_BPM", "MAX_BPM", "Grid", "Span", "Timeline", "beat_of_bbt"]

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


# ------------------------------------------------------------ the followed clock's own timeline


@dataclass(frozen=True)
class Span:
    """A stretch of the followed timeline at one tempo and meter, as observed.

    Bars are counted from 0 at bar 1 (bar N starts at bar position N-1), so they mean the same
    under any meter. `start`/`end`: the first and furthest bar positions observed in it. `line`:
    where the bar line `ref` lies on the DAW's timeline, in seconds (None when the source has no
    timeline seconds: MIDI clock, Link, Ardour's bar/beat feedback; the span then counts only for
    its tempo)."""

    start: float
    end: float
    tempo: float
    numerator: int
    denominator: int
    ref: int = 0
    line: float | None = None   # the earliest place any reading put the bar line `ref` (it is not later)
    lo: float | None = None     # the latest place it can be, from readings within a tick of `line`
    width: float = 0.0          # one reading's rounding (a tick), in seconds

    @property
    def bar_seconds(self) -> float:
        return self.numerator * 240.0 / (self.tempo * self.denominator)

    @property
    def anchored(self) -> bool:
        return self.line is not None

    def seconds_at(self, bar: float) -> float:
        """Timeline seconds of bar position `bar` at this span's tempo (anchored spans only). The bar
        line is the middle of [lo, line] once readings at other phases of the tick have narrowed it
        to a quarter tick; before that `line`: a position read at one phase only (a locate, the
        transport standing at bar 1) is usually on a tick, where rounding down changes nothing."""
        assert self.line is not None
        at = self.line
        if self.lo is not None and self.line - self.lo <= self.width / 4.0:
            at = (self.lo + self.line) / 2.0
        return at + (bar - self.ref) * self.bar_seconds


# A reading that puts a span's bar line this much later than the earliest one means the map under
# the span changed (far more than a late timebase master's few periods): start its line over.
RELINE_SECONDS = 0.25


class Timeline:
    """The followed clock's own timeline: where each bar lies, under a tempo or meter map.

    A follower feeds it what its source says about one moment: the bar position, the tempo and
    meter there and, where the source has one, the DAW's timeline seconds at that moment (JACK:
    the transport frame / rate). Stems are placed by it (`seconds_at_bar`), so a stem asked at
    bar 9 after a meter change lands on bar 9's true time, not on 8 bars at today's tempo.

    Each reading implies where its span's bar line lies: the seconds minus the bars since it.
    A reading can only put that line too late, never too early: JACK's tick is rounded down
    (whole ticks, 1920 a beat), and a timebase master that missed cycles on a busy machine leaves
    its bar/beat/tick a few periods behind the frame. So the line kept is the earliest any
    reading implied; readings at many phases bring it to within a small part of a tick (a
    reading exactly on a tick, such as a locate or the transport standing at bar 1, gives it
    exactly). A bar in a stretch never observed is extrapolated from the observed span in effect
    there (the DAW's map there is unknown until it plays or locates there). Thread-safe: fed by a
    follower's thread, read by the daemon's.
    """

    def __init__(self, tempo_tolerance: float = 1e-6, max_spans: int = 256):
        self.tempo_tolerance, self.max_spans = tempo_tolerance, max_spans
        self._spans: list[Span] = []   # sorted by start, not overlapping
        self._lock = threading.Lock()

    @property
    def spans(self) -> tuple[Span, ...]:
        return tuple(self._spans)

    def observe(self, bar: float, tempo: float, numerator: int, denominator: int,
                seconds: float | None = None, resolution: float = 0.0) -> None:
        """At bar position `bar` (0 = bar 1's line) the clock ran at `tempo` in numerator/denominator;
        with `seconds`, the DAW's timeline stood at `seconds`, the position being rounded down to
        whole units `resolution` bars wide (0: exact) or lagging behind it (a late master)."""
        with self._lock:
            i = self._span_index(bar)
            s = self._spans[i] if i is not None else None
            if s is None or s.numerator != numerator or s.denominator != denominator \
                    or abs(s.tempo - tempo) > self.tempo_tolerance or (seconds is None) == s.anchored:
                s = self._start_span(bar, tempo, numerator, denominator)
                i = self._spans.index(s)
            line = lo = None
            width = resolution * s.bar_seconds
            if seconds is not None:
                implied = seconds - (bar - s.ref) * s.bar_seconds
                line, lo = implied, implied - width
                if s.line is not None and implied - s.line < RELINE_SECONDS:
                    line = min(implied, s.line)
                    # Only a reading within a tick of the earliest is on time (a late one is whole periods
                    # late); such a reading says the line is no earlier than a tick before it.
                    lo = s.lo if s.lo is not None and s.lo <= line else line - width
                    if implied <= line + width:
                        lo = min(line, max(lo, implied - width))
            self._spans[i] = replace(s, start=min(s.start, bar), end=max(s.end, bar), line=line, lo=lo,
                                     width=width, tempo=tempo if s.line is None else s.tempo)

    def _span_index(self, bar: float) -> int | None:
        """The span whose observed stretch holds `bar` (or that it continues, within a bar)."""
        for i, s in enumerate(self._spans):
            nxt = self._spans[i + 1].start if i + 1 < len(self._spans) else math.inf
            if s.start - 1.0 <= bar < nxt and bar <= s.end + 1.0:
                return i
        return None

    def _start_span(self, bar: float, tempo: float, numerator: int, denominator: int) -> Span:
        """A new span from `bar` on. Whatever was observed from `bar` to the next span no longer holds
        (the DAW's map changed there, or the transport moved into a part it had not played yet)."""
        new = Span(bar, bar, tempo, numerator, denominator, ref=math.floor(bar + 1e-9))
        kept: list[Span] = []
        for s in self._spans:
            if s.end < bar or s.start > bar:
                kept.append(s)
            elif s.start < bar:
                kept.append(replace(s, end=bar))  # the span ran up to here
        kept.append(new)
        kept.sort(key=lambda s: s.start)
        if len(kept) > self.max_spans:  # keep the newest memory bounded: drop the span furthest from here
            kept.remove(max((s for s in kept if s is not new), key=lambda s: abs(s.start - bar)))
        self._spans = kept
        return new

    def seconds_at_bar(self, bar: float) -> float | None:
        """Timeline seconds of bar position `bar`, or None before anything was observed.

        Anchored spans (the source has timeline seconds): from the span in effect at `bar` (the
        last that starts at or before it; else the first), so a bar line where the map changes is
        reached at the tempo before the change. Unanchored: the observed tempos summed from bar 1
        (the first span's tempo back to bar 1, each span's until the next one starts)."""
        with self._lock:
            spans = list(self._spans)
        if not spans:
            return None
        before = [s for s in spans if s.start <= bar + 1e-9]
        s = before[-1] if before else spans[0]
        if s.anchored:
            return s.seconds_at(bar)
        t, at = 0.0, 0.0
        for i, sp in enumerate(spans):
            nxt = spans[i + 1].start if i + 1 < len(spans) else math.inf
            if bar <= nxt:
                return t + (bar - at) * sp.bar_seconds
            t += (nxt - at) * sp.bar_seconds
            at = nxt
        return t  # not reached: the last span runs on for ever

    def clear(self) -> None:
        with self._lock:
            self._spans = []
