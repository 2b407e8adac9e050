"""What every clock follower shares: the latest grid, published whole, and an optional poll thread.

A follower turns one outside clock (JACK transport, MIDI clock, Link, a DAW's OSC feedback)
into `Grid` snapshots. It publishes each new snapshot to `on_update` (the daemon's ClockHub,
which hands it to jams and stems and feeds the session transport). The signature, where the
source has none (MIDI clock, Link, REAPER), comes from `base`: the session's typed signature.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from bridge.clock.grid import Grid, Timeline

log = logging.getLogger("musicbridge.clock")


class ClockError(RuntimeError):
    """A clock source that cannot be followed; the message says what to check."""


class Follower:
    """Base of the followers: a context manager holding the latest Grid of one source."""

    source = ""

    def __init__(self, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.base = base
        self.on_update = on_update
        self.clock = clock
        self._grid: Grid | None = None
        self._lock = threading.Lock()
        # Where each bar lies on the source's own timeline (stems are placed by it); None: the source
        # gives no more than its grid, and bars become seconds at the grid's tempo.
        self.timeline: Timeline | None = None

    @property
    def grid(self) -> Grid | None:
        """The latest snapshot, or None until the source has said anything."""
        return self._grid

    @property
    def note(self) -> str:
        """What the user should change for this clock to be followed (for the log and /status); "" when
        nothing is known to be wrong."""
        return ""

    def set_base(self, base: Grid) -> None:
        """The typed transport changed: its signature still applies where the source has none."""
        self.base = base

    def publish(self, **fields) -> Grid:
        fields.setdefault("numerator", self.base.numerator)
        fields.setdefault("denominator", self.base.denominator)
        g = Grid(source=self.source, updated=time.monotonic(), **fields)
        with self._lock:
            self._grid = g
        if self.on_update is not None:
            self.on_update(g)
        return g

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class PollThread:
    """Calls `step` every `period` seconds on its own daemon thread until closed; a failing step is
    logged (at most once a second) and the loop carries on, so a hiccup never kills following."""

    def __init__(self, name: str, step: Callable[[], None], period: float):
        self.step, self.period = step, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._last_error = 0.0

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 - logged, following goes on
                if time.monotonic() - self._last_error > 1.0:
                    self._last_error = time.monotonic()
                    log.warning("%s: %s: %s", self._thread.name, type(e).__name__, e)

    def close(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
