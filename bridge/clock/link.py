"""Follow Ableton Link (through the `linkpython-extern` wheel): tempo, beat and phase, start/stop.

The bar is the quantum, so the beat read here has the same phase against the bar line as every
other peer's: bar lines fall where the session's bar lines fall. Start/stop sync is on, so a
peer pressing play starts us too. Link's clock (CLOCK_MONOTONIC_RAW microseconds on Linux) is
not time.monotonic: every poll reads both clocks together and maps Link time onto ours.
Link finds peers by multicast on the machine's network interfaces (docs/daw.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bridge.clock.follower import ClockError, Follower, PollThread
from bridge.clock.grid import MAX_BPM, MIN_BPM, Grid

POLL_SECONDS = 0.02


class LinkFollower(Follower):
    source = "link"

    def __init__(self, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(base, on_update, clock)
        self._link = None
        self._poll = PollThread("link", self.poll, POLL_SECONDS)

    def __enter__(self) -> LinkFollower:
        try:
            import link
        except ImportError:
            raise ClockError("--follow link needs the linkpython-extern package "
                             "(pip install linkpython-extern)") from None
        self._link = link.Link(self.base.tempo)
        self._link.startStopSyncEnabled = True
        self._link.enabled = True
        self.poll()
        self._poll.start()
        return self

    @property
    def peers(self) -> int:
        return int(self._link.numPeers()) if self._link is not None else 0

    def poll(self) -> None:
        lk = self._link
        state = lk.captureAppSessionState()
        micros = lk.clock().micros()
        now = self.clock()
        num, den = self.base.numerator, self.base.denominator
        quantum = num * 4.0 / den                      # Link counts quarter notes; a bar is the quantum
        beat = state.beatAtTime(micros, quantum) * den / 4.0
        tempo = min(MAX_BPM, max(MIN_BPM, float(state.tempo())))
        self.publish(tempo=tempo, playing=bool(state.isPlaying()), anchor_time=now, anchor_beat=beat)

    def close(self) -> None:
        self._poll.close()
        if self._link is not None:
            self._link.enabled = False
            self._link = None
