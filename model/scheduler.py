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


class StepGate:
    """One decoder step at a time; live sessions go ahead of offline work."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._live_sessions = 0
        self._busy = False
        self.offline_waits = 0  # steps an offline call waited because live work was due (stats)

    @property
    def live_sessions(self) -> int:
        return self._live_sessions

    @contextlib.contextmanager
    def live_session(self) -> Iterator[None]:
        """Live work is due: offline steps wait until every live session has closed."""
        with self._cond:
            self._live_sessions += 1
        try:
            yield
        finally:
            with self._cond:
                self._live_sessions -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def step(self, live: bool = False, stop: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the gate for one step. Yields False (and holds nothing) when `stop()` turned true
        while an offline step was waiting, so a cancelled job does not wait for a jam to end."""
        waited = False
        with self._cond:
            while True:
                if not self._busy and (live or not self._live_sessions):
                    self._busy = got = True
                    break
                if stop is not None and stop():
                    got = False
                    break
                waited = waited or (not live and self._live_sessions > 0)
                self._cond.wait(0.05)
        if waited:
            self.offline_waits += 1
        if not got:
            yield False
            return
        try:
            yield True
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
