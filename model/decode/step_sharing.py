"""Live decode states that step together: every jam on an engine with a step due, in one decoder pass.

Why: a decode step reads every weight once for the few rows it computes, so on a CPU its cost is
mostly the weights' trip from memory and on a GPU the kernel launches; a second jam stepping on
its own pays all of that again. Stepped together (`loop.decode_together`), jams share one pass
over the weights and each adds its own attention and the arithmetic of its rows (BENCHMARKS.md,
*Remote engine*: on two cores a second int8 jam costs 0.5-0.8 of a first).

Each jam keeps its own thread, its own decode state and its own chunk-by-chunk rhythm
(`LiveStream.advance`); nothing here owns a loop. A thread with a step due hands its state in
(`step`) and blocks until that step is made. The first to arrive while no step is being made
leads: it waits, briefly, for every other jam that is between two steps of a chunk to hand its
state in too, then makes one step of all of them under the engine's gate and wakes them
(flat combining). A jam that is not stepping (between chunks, or while its consumer takes a
piece) is not waited for.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from model.decode.scheduler import StepGate

# How long a leader waits for the other stepping jams to hand in their states: their work between
# two steps (the pattern's arithmetic, a piece's codes) is tens of microseconds; a jam that takes
# longer steps on its own rather than hold the others up.
GATHER_S = 0.002


@dataclass
class _Ticket:
    member: int
    state: object
    done: bool = False
    error: BaseException | None = None
    together: int = 1  # how many states its pass stepped


@dataclass
class SharingStats:
    """What the shared steps did (a replica's /v1/status reports it)."""

    steps: int = 0  # decode-state steps made in them
    passes: int = 0  # decoder passes those took (one a round where the C step joins them)
    shared_passes: int = 0  # passes that stepped more than one state
    most_together: int = 0  # the most states one pass stepped


class SharedSteps:
    """Step live decode states together; `run(states)` makes one step of each and says in how many
    decoder passes (loop.decode_together)."""

    def __init__(self, gate: StepGate, run: Callable[[list], int], gather_s: float = GATHER_S):
        self._gate, self._run, self._gather_s = gate, run, gather_s
        self._cv = threading.Condition()
        self._stepping: set[int] = set()  # members between two steps of a chunk (expected soon)
        self._pending: list[_Ticket] = []
        self._leading = False
        self.stats = SharingStats()

    @contextlib.contextmanager
    def stepping(self, member: object) -> Iterator[None]:
        """`member` (a live stream) is making steps now: a leader waits for its state."""
        with self._cv:
            self._stepping.add(id(member))
        try:
            yield
        finally:
            with self._cv:
                self._stepping.discard(id(member))
                self._cv.notify_all()  # a leader waiting for it waits no more

    @contextlib.contextmanager
    def away(self, member: object) -> Iterator[None]:
        """Within `stepping`: `member` is busy elsewhere for a while (a prefill, a consumer): no
        leader waits for it meanwhile."""
        with self._cv:
            self._stepping.discard(id(member))
            self._cv.notify_all()
        try:
            yield
        finally:
            with self._cv:
                self._stepping.add(id(member))

    def step(self, member: object, state: object) -> int:
        """One step of `state`, made together with whatever other members' states are due.
        Returns how many states its decoder pass stepped (1: alone, or the states stepped in turn)."""
        ticket = _Ticket(id(member), state)
        with self._cv:
            self._pending.append(ticket)
            self._cv.notify_all()
            while not ticket.done and self._leading:
                self._cv.wait()
            if ticket.done:
                if ticket.error is not None:
                    raise ticket.error
                return ticket.together
            self._leading = True
        batch: list[_Ticket] = []
        passes = 0
        error: BaseException | None = None
        try:
            with self._gate.step(live=True):  # taken first: states handed in while it is busy come along
                batch = self._gather()
                passes = self._run([t.state for t in batch])
        except BaseException as e:  # every state in the pass is told, each in its own thread
            error = e
        finally:
            with self._cv:
                together = len(batch) if passes == 1 else 1
                for t in batch or [ticket]:
                    t.done, t.error, t.together = True, error, together
                if not batch:
                    self._pending.remove(ticket)
                self._leading = False
                self._count(len(batch), passes, together)
                self._cv.notify_all()
        if error is not None:
            raise error
        return ticket.together

    def _gather(self) -> list[_Ticket]:
        """The tickets to step now: wait up to the gather time for every stepping member's."""
        deadline = time.monotonic() + self._gather_s
        with self._cv:
            while True:
                if self._stepping <= {t.member for t in self._pending}:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            batch, self._pending = self._pending, []
        return batch

    def _count(self, n: int, passes: int, together: int) -> None:
        """`n` states stepped in `passes` decoder passes, `together` of them in one."""
        if not n:
            return
        s = self.stats
        s.steps += n
        s.passes += passes
        s.shared_passes += together > 1
        s.most_together = max(s.most_together, together)
