"""Who may run the next decoder step: live work first, offline jobs between live work.

Why: a jam chunk that waits behind a queued render is a dropout the player hears. The engine
used to run one call at a time under a lock held for the whole call (and across every yield
to a streaming consumer). Now each decoder step (or prefill) of any call passes through one
`StepGate`:

- a live stream (a jam, a track playing while it generates) marks itself `live_session()`
  while it has a chunk to make; while any live session is open, offline steps wait *between
  steps* (an offline job pauses, it is never cancelled and never re-started);
- the gate is held for exactly one step, never across a yield to a consumer, so a slow
  consumer (a full ring, a chain) never blocks another caller;
- live steps from several live sessions interleave step by step.

Decode states are independent (each has its own KV cache), so interleaving steps of different
calls is safe; the gate only orders them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class LiveShare:
    """What a live session shared the decoder with: offline steps that ran while it was open
    (one already running when it opened counts; by design there is never more)."""

    offline_steps: int = 0


class StepGate:
    """One decoder step at a time; live sessions go ahead of offline work."""

    def __init__(self) -> None:
        lock = threading.Lock()
        # Two conditions on one lock: a live step never wakes a waiting offline step (a woken
        # thread would take the GIL from the live one just to go back to sleep).
        self._live_cv = threading.Condition(lock)
        self._offline_cv = threading.Condition(lock)
        self._lock = lock
        self._live_sessions = 0
        self._live_waiting = 0
        self._busy = False
        self.offline_waits = 0  # offline steps that waited because live work was due (stats)
        self.offline_steps = 0  # offline steps granted, ever
        self._offline_running = False

    @property
    def live_sessions(self) -> int:
        return self._live_sessions

    @contextlib.contextmanager
    def live_session(self) -> Iterator[LiveShare]:
        """Live work is due: offline steps wait until every live session has closed. The yielded
        share is filled in when the session closes."""
        share = LiveShare()
        with self._lock:
            self._live_sessions += 1
            first = self.offline_steps - int(self._offline_running)
        try:
            yield share
        finally:
            with self._lock:
                self._live_sessions -= 1
                share.offline_steps = self.offline_steps - first
                if not self._live_sessions and not self._busy:
                    self._offline_cv.notify()

    def offline_turn(self, stop: Callable[[], bool] | None = None) -> None:
        """Wait (holding nothing, not even the GIL) until no live session is open: offline work
        that is not a decoder step (decoding a finished job's codes, writing its stem) runs
        between live chunks too. A thread of lower CPU priority would not do: holding the GIL
        while descheduled, it would stall the live thread it yields to."""
        with self._lock:
            while self._live_sessions and not (stop is not None and stop()):
                self._offline_cv.wait(0.05)

    @contextlib.contextmanager
    def step(self, live: bool = False, stop: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the gate for one step. Yields False (and holds nothing) when `stop()` turned true
        while an offline step was waiting, so a cancelled job does not wait for a jam to end."""
        waited = False
        with self._lock:
            if live:
                self._live_waiting += 1
                while self._busy:
                    self._live_cv.wait()
                self._live_waiting -= 1
                self._busy = got = True
            else:
                while True:
                    if not self._busy and not self._live_sessions and not self._live_waiting:
                        self._busy = got = self._offline_running = True
                        self.offline_steps += 1
                        break
                    if stop is not None and stop():
                        got = False
                        break
                    waited = waited or self._live_sessions > 0
                    self._offline_cv.wait(0.05)
        if waited:
            self.offline_waits += 1
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            with self._lock:
                self._busy = self._offline_running = False
                if self._live_waiting:
                    self._live_cv.notify()
                elif not self._live_sessions:
                    self._offline_cv.notify()


