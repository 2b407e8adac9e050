"""Follow MIDI clock: 24 clocks per quarter note, Start / Stop / Continue and Song Position Pointer.

Tempo is the slope of a line under the arrival times of the last 96 clocks (a bar of 4/4), not
the last interval: a clock jittered by a millisecond or two (and JACK MIDI delivers events once per
period, a few milliseconds apart) then moves the tempo by hundredths of a bpm instead of several
bpm. A real tempo change is seen by a shorter line through the last quarter note; the long line
then restarts from there. A source that loses time (its clocks all later from one on, by the
cycles it missed) moves the phase, not the tempo (see TempoFit).

Each clock is stamped with the time the MIDI system gave it, not the time Python got to it. The
port is read by bridge.midi.ports.MidiReader (no Python in JACK's process thread; rtmidi queues the
messages in C++), which passes rtmidi's own timestamps (the driver's deltas, summed). Those are
mapped onto the follower's clock by the smallest offset between when a message was read and its
driver time over the last STAMP_WINDOW seconds (30 s: the driver's clock and ours are both the
system's monotonic clock, so the offset does not drift; a 2 s window let a reader starved for 2 s
on a busy machine raise the offset, and the tempo with it, by 10 bpm): a message is never read before it arrives, so
the smallest offset is the one with no delay on our side, and a stall of the daemon (a generate
holding the CPU) delays reading without moving any clock's time. Before, each clock was stamped
when the Python callback ran, and one 100-200 ms stall moved the fitted tempo by 40-313 bpm for
about 0.4 s.

The port is opened through python-rtmidi: the JACK API when a JACK server runs, else ALSA.
PORT names an existing MIDI output (exactly, or a unique part of its name) to connect to; when
no port matches, a new input port called PORT is made for the DAW to connect its clock to.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import rtmidi

from bridge.clock.follower import ClockError, Follower, log
from bridge.clock.grid import MAX_BPM, MIN_BPM, Grid, Timeline
from bridge.midi.ports import QUEUE_MESSAGES, MidiReader

CLOCK, START, CONTINUE, STOP, SPP = 0xF8, 0xFA, 0xFB, 0xFC, 0xF2
PPQN = 24
STAMP_WINDOW = 30.0  # seconds of driver time over which the smallest read offset is taken (see below)
STEP_MIN = 0.1  # a step in the source's time smaller than this part of a clock moves the tempo by < 0.2 bpm


class TempoFit:
    """Tempo from clock arrival times; robust to jitter and to late, bunched deliveries, quick to
    follow a real change.

    A busy machine delivers clocks late, never early: a starved JACK cycle or MIDI driver hands
    over everything it held at once, stamped at the same moment. So the tempo is the slope of the
    line under the arrivals, not through them (the lower envelope, as one-way network delay
    measurements estimate clock skew): the on-time clocks set it and late ones cannot move it.
    A JACK period's rounding lifts each clock by up to a period; over a bar the clocks that came
    just after a cycle boundary lie within a fraction of a millisecond of the true line.

    The line through the last `window` clocks gives the tempo. A second line through the last
    quarter note (24 clocks) watches for a real change: when the two disagree by more than 5 % for
    half a quarter note in a row (one disagreeing line can be a run of stalls covering most of the
    quarter note; a real change keeps disagreeing), the long line restarts from the clocks of that
    half quarter note, all of the new tempo. A change from 97 to 120 bpm is followed within 0.5 bpm
    0.5 s after it with a 256-frame JACK period, 1.25 s with 1024 frames (whose 21 ms rounding
    needs the longer line).

    A source that loses time moves the phase, not the tempo: a JACK client that misses cycles
    resumes counting where it stopped, so every clock from one on comes later by the cycles it
    missed, for good. A line under a bar that spans such a step bridges it and reads slow (2 bpm at
    97 for a 22 ms step), and a larger step looks like a change and restarts the line. So
    once half a quarter note of clocks after the largest gap in the newer half of a full bar all
    lie above the line by the same step, the clocks before the gap are moved up by it
    (_absorb_step), before the change watch looks. The period's rounding also lifts clocks by whole
    periods (at 93.75 bpm every clock is five 256-frame periods, and the deliveries run along
    treads a period apart), so a step counts only where it is more than 1.5 times the most any
    other interval in the bar strays from the line: a full bar holds several of the rounding's
    risers, a lost cycle shows as one.
    """

    def __init__(self, window: int = 96, recent: int = PPQN, min_points: int = 12):
        self.window, self.recent, self.min_points = window, recent, min_points
        self.times: deque[float] = deque(maxlen=window)
        self.interval: float | None = None  # seconds per clock from the fit
        self.last: float | None = None      # the fitted time of the newest clock (jitter removed)
        self.confirm = recent // 2  # consecutive clocks the recent line must disagree for
        self._disagreed = 0

    @staticmethod
    def _line(ts: list[float]) -> tuple[float, float, float]:
        """(seconds per clock, time of the first point, of the last) of the line under the points
        that lies highest at their middle: the edge of their lower convex hull over the middle index.

        That line keeps every point on or above it and is as close to all of them as such a line can
        be (it minimises the summed distance), so late points cannot move it, however late."""
        hull: list[int] = []
        for i, t in enumerate(ts):
            # pop the last vertex while it lies on or above the segment from the one before to this point
            while len(hull) >= 2:
                i0, i1 = hull[-2], hull[-1]
                if (ts[i1] - ts[i0]) * (i - i0) >= (t - ts[i0]) * (i1 - i0):
                    hull.pop()
                else:
                    break
            hull.append(i)
        middle = (len(ts) - 1) / 2.0
        k = next(k for k in range(len(hull) - 1) if hull[k + 1] >= middle)
        i0, i1 = hull[k], hull[k + 1]
        slope = (ts[i1] - ts[i0]) / (i1 - i0)
        first = ts[i0] - slope * i0
        return slope, first, first + slope * (len(ts) - 1)

    def add(self, t: float) -> None:
        self.times.append(t)
        n = len(self.times)
        if n < self.min_points:
            self.interval = (t - self.times[0]) / (n - 1) if n >= 2 else None
            self.last = t
            return
        ts = list(self.times)
        line = self._line(ts)  # the long line, fitted once unless the clocks under it change
        if n == self.window and self._absorb_step(ts, line[0], line[1]):
            ts = list(self.times)
            line = self._line(ts)
        if n > self.recent:
            recent, _first, last = self._line(ts[-self.recent:])
            disagree = bool(self.interval) and abs(recent - self.interval) > 0.05 * self.interval
            self._disagreed = self._disagreed + 1 if disagree else 0
            if self._disagreed >= self.confirm:  # a change, not jitter or a run of stalls
                # The clocks since the first disagreement are all of the new tempo; the lower line
                # must not span clocks of the old one (they would hold it under them).
                self._disagreed = 0
                self.times.clear()
                self.times.extend(ts[-self.confirm:])
                line = self._line(ts[-self.confirm:])
        self.interval, self.last = line[0], line[2]

    def _absorb_step(self, ts: list[float], slope: float, first: float) -> bool:
        """Moves the clocks before a step in the source's time up by the step; True if there was one.

        The step is looked for at the largest gap in the newer half of the bar, where the line
        still lies under the clocks before it alone, with at least `confirm` clocks after it."""
        n = len(ts)
        if slope <= 0:
            return False
        k = max(range(n // 2, n - self.confirm + 1), key=lambda i: ts[i] - ts[i - 1])
        above = [ts[i] - (first + slope * i) for i in range(k, n)]
        step = min(above)
        # the most any other interval strays from the line: the period's rounding, or a bunch
        rounding = max(abs(ts[i] - ts[i - 1] - slope) for i in range(1, n) if i != k)
        if step < STEP_MIN * slope or step <= 1.5 * rounding:
            return False
        half = len(above) // 2
        if abs(min(above[half:]) - min(above[:half])) > max(rounding, 0.25 * step):
            return False  # the clocks after the gap drift away from the line: a tempo change
        for i in range(k):
            self.times[i] += step
        return True

    def reset(self) -> None:
        self.times.clear()
        self._disagreed = 0
        self.interval = self.last = None

    @property
    def bpm(self) -> float | None:
        if not self.interval or self.interval <= 0:
            return None
        return 60.0 / (PPQN * self.interval)


class MidiClockFollower(Follower):
    source = "midi-clock"

    def __init__(self, port: str, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, api: str | None = None):
        super().__init__(base, on_update, clock)
        if not port:
            raise ClockError("--follow midi-clock:PORT needs a port name after the colon")
        self.port, self.api = port, api
        self._in = None
        self._reader: MidiReader | None = None
        self._offsets: deque[tuple[float, float]] = deque()  # (driver time, read offset), offsets increasing
        self.fit = TempoFit()
        self.clocks = 0            # clocks (1/24 quarter) from bar 1
        self.playing = False
        self._first_after_start = False
        self.port_name = ""
        # MIDI clock has positions (Song Position Pointer, clocks) but no timeline seconds: the tempos
        # seen are summed from bar 1; a fitted tempo moves by hundredths, a change by far more.
        self.timeline = Timeline(tempo_tolerance=0.5)

    def __enter__(self) -> MidiClockFollower:
        apis = {"jack": rtmidi.API_UNIX_JACK, "alsa": rtmidi.API_LINUX_ALSA}
        order = [apis[self.api]] if self.api else [rtmidi.API_UNIX_JACK, rtmidi.API_LINUX_ALSA]
        errors = []
        for api in order:
            if api not in rtmidi.get_compiled_api():
                continue
            try:
                self._in = rtmidi.MidiIn(api, name="musicbridge", queue_size_limit=QUEUE_MESSAGES)
                break
            except (rtmidi.SystemError, rtmidi.RtMidiError) as e:
                errors.append(f"{rtmidi.get_api_name(api)}: {e}")
        if self._in is None:
            raise ClockError("cannot follow MIDI clock: no MIDI system to open (" + "; ".join(errors) +
                             "); start a JACK server or load the ALSA sequencer")
        self._in.ignore_types(sysex=True, timing=False, active_sense=True)
        names = self._in.get_ports()
        matches = [i for i, n in enumerate(names) if n == self.port] or \
                  [i for i, n in enumerate(names) if self.port in n]
        if len(matches) > 1:
            self._in.delete()
            raise ClockError(f"MIDI port {self.port!r} matches {len(matches)} ports "
                             f"({', '.join(names[i] for i in matches)}); name one exactly")
        if matches:
            self._in.open_port(matches[0], "clock-in")
            self.port_name = names[matches[0]]
            log.info("following MIDI clock from %s", self.port_name)
        else:
            self._in.open_virtual_port(self.port)
            self.port_name = self.port
            log.info("following MIDI clock on a new input port %r: connect your DAW's clock output to it",
                     self.port)
        self._reader = MidiReader(self._in, self._message, self.port_name).__enter__()
        return self

    def _message(self, msg: list[int], driver_t: float) -> None:
        if msg:
            self.feed(msg, self.stamp(driver_t, self.clock()))

    def stamp(self, driver_t: float, read_at: float) -> float:
        """A message's time on the follower's clock from its driver time and when it was read: the
        driver time plus the smallest read offset of the last STAMP_WINDOW seconds (a sliding
        minimum, kept as a deque of increasing offsets)."""
        offset, q = read_at - driver_t, self._offsets
        while q and q[-1][1] >= offset:
            q.pop()
        q.append((driver_t, offset))
        while q[0][0] < driver_t - STAMP_WINDOW:
            q.popleft()
        return driver_t + q[0][1]

    def feed(self, msg, t: float) -> None:
        """One MIDI message that arrived at output time t."""
        status = msg[0]
        if status == CLOCK:
            self.fit.add(t)
            if self._first_after_start:  # the first clock after Start/Continue is the downbeat itself
                self._first_after_start = False
            elif self.playing:
                self.clocks += 1
        elif status == START:
            self.clocks, self.playing, self._first_after_start = 0, True, True
        elif status == CONTINUE:
            self.playing, self._first_after_start = True, True
        elif status == STOP:
            self.playing = False
        elif status == SPP and len(msg) >= 3:
            self.clocks = ((msg[2] & 0x7F) << 7 | (msg[1] & 0x7F)) * (PPQN // 4)  # sixteenths -> clocks
        else:
            return
        bpm = self.fit.bpm
        tempo = min(MAX_BPM, max(MIN_BPM, bpm)) if bpm else self.base.tempo
        den = self.base.denominator
        at = self.fit.last if status == CLOCK and self.fit.last is not None else t
        num = self.base.numerator
        if status == CLOCK and self.playing and bpm:
            self.timeline.observe(self.clocks / PPQN * den / 4.0 / num, tempo, num, den)
        self.publish(tempo=tempo, playing=self.playing, anchor_time=at,
                     anchor_beat=self.clocks / PPQN * den / 4.0)

    def close(self) -> None:
        if self._reader is not None:  # stops reading, then closes and deletes the port
            self._reader.__exit__(None, None, None)
            self._reader = None
        elif self._in is not None:
            self._in.close_port()
            self._in.delete()
        self._in = None
