"""The one leading clock of a running daemon, and what it drives.

Exactly one source leads: the one `serve --follow` names (default `typed`: the session
transport as /transport/* messages set it). The hub owns that source's follower, answers
"where is the DAW now" for /status, /transport/state, `generate ... bars`, stems' BWF time
references and jams, and copies the followed transport into the session (a background thread
writes it when the tempo, signature, play state or position really change, never from a JACK
or MIDI thread, so no file write can stall them).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.clock import FollowSpec
from bridge.clock import osc_dialects as od
from bridge.clock.follower import Follower, PollThread
from bridge.clock.grid import Grid
from bridge.clock.jack import JackFollower
from bridge.clock.link import LinkFollower
from bridge.clock.midi_clock import MidiClockFollower
from bridge.clock.osc_dialects import OscDialectFollower
from bridge.clock.typed import TypedFollower
from bridge.osc.udp import TracebackLog
from bridge.state.rules import MAX_BEAT_POSITION
from plugin_host.tempo import TimeSignature

log = logging.getLogger("musicbridge.clock")

FEED_SECONDS = 0.1


def output_clock(audio) -> Callable[[], float]:
    """Seconds on the output clock: frames played / rate with a live output, else time.monotonic."""
    if audio is None:
        return time.monotonic
    rate = float(audio.samplerate)
    return lambda: audio.position / rate


@dataclass(frozen=True)
class ClockState:
    """The leading clock at one moment. `beat` counts signature beats from 0 at bar 1 (bar N starts
    at beat (N-1) x numerator); `quarter_notes` is the same position in quarter notes."""

    source: str
    tempo: float  # quarter notes a minute
    signature: TimeSignature
    playing: bool
    beat: float
    age: float  # seconds since the clock last said something; -1: never

    @property
    def quarter_notes(self) -> float:
        return self.signature.beats_to_quarters(self.beat)

    @property
    def bar(self) -> int:
        """The bar sounding now, counting from 1."""
        return int(math.floor(self.beat / self.signature.numerator + 1e-9)) + 1

    def to_json(self) -> dict:
        return {"source": self.source, "tempo": self.tempo, "signature": str(self.signature),
                "playing": self.playing, "beat": self.beat, "quarter_notes": self.quarter_notes,
                "bar": self.bar, "age": self.age}


class ClockHub:
    """A context manager: starts the follower on enter, stops it on exit."""

    def __init__(self, session, spec: FollowSpec = FollowSpec(), *, clock: Callable[[], float] = time.monotonic,
                 ardour: tuple[str, int] | None = None, send: Callable[..., None] | None = None):
        self.session, self.spec, self.clock = session, spec, clock
        self.ardour, self.send = ardour, send
        self.typed = TypedFollower(session, clock)
        self.follower: Follower | None = None  # the followed source, when it is not the typed transport
        self._fed: Grid | None = None
        self._feeder: PollThread | None = None
        self._ignored_logged: set[str] = set()
        self.tracebacks = TracebackLog(log)
        self._free: Grid | None = None
        self._free_key: tuple | None = None

    # ------------------------------------------------------------ lifetime

    def __enter__(self) -> ClockHub:
        src = self.spec.source
        base = self.typed.grid
        if src == "jack":
            self.follower = JackFollower(base, clock=self.clock)
        elif src == "link":
            self.follower = LinkFollower(base, clock=self.clock)
        elif src == "midi-clock":
            self.follower = MidiClockFollower(self.spec.port, base, clock=self.clock)
        elif src == "osc":
            self.follower = OscDialectFollower(base, clock=self.clock, ardour=self.ardour, send=self.send)
        if self.follower is not None:
            self.follower.__enter__()
            self._feeder = PollThread("clock-feed", self.feed_session, FEED_SECONDS)
            self._feeder.start()
            log.info("following the %s clock", self.spec)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._feeder is not None:
            self._feeder.close()
            self._feeder = None
        if self.follower is not None:
            self.follower.close()
            self.follower = None

    # ------------------------------------------------------------ the grid

    def typed_changed(self, located: float | None = None) -> None:
        """A /transport/* message changed the session transport (`located`: the position it named,
        in quarter notes). A follower whose source has no signature takes the typed one."""
        g = self.typed.changed(located)
        if self.follower is not None:
            self.follower.set_base(g)

    def grid(self) -> Grid:
        """The leading grid. Before a followed source has said anything it is the typed transport
        under the followed source's name, with an age of infinity ("never heard")."""
        if self.follower is None:
            return self.typed.grid
        g = self.follower.grid
        if g is None:
            return self.typed.grid.moved(source=self.follower.source, updated=-math.inf)
        return g

    def now(self) -> float:
        return self.clock()

    def jam_grid(self) -> Grid:
        """The grid a jam plays on: the leading one while the DAW plays; while it is stopped, one that
        runs on from where it stopped (a jam needs bar lines that move with time), fixed until the
        DAW says something new, so every chunk lands on the same lattice."""
        g = self.grid()
        if g.playing:
            return g
        key = (g.source, g.anchor_beat, g.tempo, g.numerator, g.denominator)
        if self._free_key != key:
            self._free, self._free_key = g.moved(playing=True), key
        return self._free

    def state(self) -> ClockState:
        """The leading clock now, as /status, /transport/state and the panel report it."""
        g = self.grid()
        age = g.age()
        return ClockState(g.source, g.tempo, g.time_signature, g.playing, g.beat_at(self.clock()),
                          age if math.isfinite(age) else -1.0)

    def note(self) -> str:
        """What to change for the followed clock to be heard ("" when nothing is known to be wrong)."""
        return self.follower.note if self.follower is not None else ""

    def stem_start(self, at_bar: int | None = None) -> tuple[float, float]:
        """(beat, timeline seconds) where a stem asked for now belongs: bar `at_bar` if named, else the
        bar line at or before the leading transport's position. The seconds come from the followed
        clock's own timeline where it has one (a tempo or meter map is honoured), else from the
        grid's tempo (the typed transport: one tempo)."""
        g = self.grid()
        if at_bar is not None:
            beat = g.bar_start_beat(at_bar)
        else:
            beat = g.bar_line_at_or_before(max(0.0, g.beat_at(self.clock())))
        timeline = self.follower.timeline if self.follower is not None else None
        seconds = timeline.seconds_at_bar(beat / g.numerator) if timeline is not None else None
        return beat, max(0.0, seconds) if seconds is not None else g.beats_to_seconds(beat)

    # ------------------------------------------------------------ DAW feedback on the daemon's port

    def feedback(self, address: str, args, sender) -> bool:
        """True when `address` is DAW feedback (consumed here, never answered: a DAW does not want
        replies to its feedback); False for everything else (the protocol's own messages)."""

        if od.is_dialect(address):
            f = self.follower
            if isinstance(f, od.OscDialectFollower):
                try:
                    f.feed(od.parse(address, args), sender)
                except od.DialectError as e:
                    self._log_once(f"bad:{address}", "ignored DAW feedback: %s", e)
                except Exception:  # noqa: BLE001 - a bug in following must not answer the DAW or flood the log
                    self.tracebacks.exception("feedback", "internal error following DAW feedback %r; ignored",
                                              address[:80])
            else:
                self._log_once(address, "ignoring DAW feedback %s: this daemon follows the %s clock "
                                        "(serve --follow osc follows it)", address, self.spec)
            return True
        if self.spec.source == "osc" and od.is_quiet(address):
            return True
        return False

    def _log_once(self, key: str, fmt: str, *args) -> None:
        if key not in self._ignored_logged and len(self._ignored_logged) < 100:
            self._ignored_logged.add(key)
            log.info(fmt, *args)

    # ------------------------------------------------------------ the session transport

    def feed_session(self) -> None:
        """Copy the followed transport into the session when it really changed (restarts resume it)."""
        f = self.follower
        g = f.grid if f is not None else None
        if g is None:
            return
        last = self._fed
        t = self.clock()
        if last is not None and abs(g.tempo - last.tempo) < 0.05 and g.numerator == last.numerator \
                and g.denominator == last.denominator and g.playing == last.playing \
                and abs(g.beat_at(t) - last.beat_at(t)) < 0.25:
            return
        self._fed = g
        # The session holds positions up to MAX_BEAT_POSITION quarter notes (what its loader accepts);
        # a followed clock that runs past it (a DAW playing on at the end, a far locate) is saved there.
        quarters = min(MAX_BEAT_POSITION, round(g.time_signature.beats_to_quarters(max(0.0, g.beat_at(t))), 4))
        try:
            self.session.update_transport(tempo=round(g.tempo, 3), time_signature=g.time_signature,
                                          playing=g.playing, position=quarters)
        except Exception as e:  # noqa: BLE001 - a full disk must not stop following
            log.warning("could not save the followed transport to the session: %s", e)


class JamGridSource:
    """The leading clock as a jam reads its grid (call it for the current one, at every chunk).

    Stands in for the typed grid source of bridge.live.control when a DAW clock leads; typed
    /transport/* changes reach the hub itself (ClockHub.typed_changed), so update() has nothing
    to do here."""

    def __init__(self, hub: ClockHub):
        self.hub = hub

    def __call__(self) -> Grid:
        return self.hub.jam_grid()

    def update(self, **_changes) -> Grid:
        return self.hub.jam_grid()
