"""Follow JACK transport: poll `transport_query()` for rolling/stopped, BBT and tempo.

The position describes the current JACK cycle's start, so it is anchored there: now minus the
frames since the cycle started. (The position's own `usecs` stamp is not usable for this: on the
dummy driver it ran 144 ms behind CLOCK_MONOTONIC, see docs/daw.md.) A
transport without a timebase master has frames but no BBT: the position then counts from
the frame at the typed tempo and signature.

Every poll also feeds the follower's Timeline with the transport frame (the DAW's timeline, in
samples) and the bar position there, so a stem asked at a bar gets that bar's frame under the
master's tempo and meter map (klick, Ardour), not bars times today's tempo. JACK's tick is a
whole number (rounded down) and a master that missed cycles leaves its BBT behind the frame, so
a reading only ever puts a bar line late: the timeline keeps the earliest (bridge.clock.grid).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.clock.follower import ClockError, Follower, PollThread
from bridge.clock.grid import MAX_BPM, MIN_BPM, Grid, Timeline, beat_of_bbt

POLL_SECONDS = 0.01


class JackFollower(Follower):
    source = "jack"

    def __init__(self, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, client_name: str = "musicbridge-clock",
                 server: str | None = None):
        super().__init__(base, on_update, clock)
        self.client_name, self.server = client_name, server
        self._client = None
        self._poll = PollThread("jack-transport", self.poll, POLL_SECONDS)
        self.timeline = Timeline()

    def __enter__(self) -> JackFollower:
        try:
            import jack  # optional: JACK-Client needs libjack, only for --follow jack
        except ImportError:
            raise ClockError("--follow jack needs the JACK-Client package (pip install JACK-Client)") from None
        try:
            self._client = jack.Client(self.client_name, no_start_server=True, servername=self.server)
            self._client.activate()
        except jack.JackError as e:
            raise ClockError(f"cannot follow JACK transport: no JACK server to connect to ({e}); "
                             "start jackd (or your DAW's JACK) first") from None
        self._rolling = jack.ROLLING
        self.poll()
        self._poll.start()
        return self

    def poll(self) -> None:
        client = self._client
        state, pos = client.transport_query()
        since = client.frames_since_cycle_start
        now = self.clock()
        rolling = state == self._rolling
        anchor_time = now - since / float(pos["frame_rate"])  # the cycle start the position describes
        num, den = self.base.numerator, self.base.denominator
        tempo = self.base.tempo
        if "bar" in pos:
            n, d = int(round(pos["beats_per_bar"])), int(round(pos["beat_type"]))
            if 1 <= n <= 32 and d in (1, 2, 4, 8, 16, 32):
                num, den = n, d
            bpm = float(pos["beats_per_minute"]) * 4.0 / den  # JACK counts beat_type notes; we count quarters
            if MIN_BPM <= bpm <= MAX_BPM:
                tempo = bpm
            ticks_per_beat = float(pos["ticks_per_beat"]) or 1920.0
            beat = beat_of_bbt(int(pos["bar"]), int(pos["beat"]), float(pos["tick"]), ticks_per_beat, num)
            resolution = 1.0 / (ticks_per_beat * num)  # one tick, in bars: JACK's tick is a whole number
        else:
            beat = pos["frame"] / pos["frame_rate"] * tempo / 60.0 * den / 4.0
            resolution = 0.0
        self.timeline.observe(beat / num, tempo, num, den, seconds=pos["frame"] / float(pos["frame_rate"]),
                              resolution=resolution)
        self.publish(tempo=tempo, numerator=num, denominator=den, playing=rolling,
                     anchor_time=anchor_time, anchor_beat=beat)

    def close(self) -> None:
        self._poll.close()
        if self._client is not None:
            try:
                self._client.deactivate()
                self._client.close()
            finally:
                self._client = None
