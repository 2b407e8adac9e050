"""Follow a DAW's own OSC feedback: REAPER's default pattern, Bitwig's DrivenByMoss, Ardour.

These messages arrive on the daemon's own port (the DAW sends its feedback there). Each is
parsed into a frozen `DawMessage`, checked at construction, then applied to the follower:

  REAPER (Default.ReaperOSC, or daw/reaper/musicbridge.ReaperOSC):
      /tempo/raw f bpm    /play f 1|0    /stop f 1|0    /beat/str s "5.1.00"    /time f seconds
  Bitwig + DrivenByMoss: the same names, plus /time/signature s "4 / 4"
  Ardour (after /set_surface/port 0 and /set_surface/feedback 48 = 16 transport + 32 bar/beat, sent
  to Ardour's port):
      /transport_play f|i 1|0    /transport_stop f|i 1|0    /position/bbt s "005|01|0000"

Ardour's OSC default "Port Mode: Manual" sends feedback to the sender's host on port 8000 (its
"Reply Manual Port"), not to the port the request came from (Ardour's osc.cc, get_address). So
the handshake first sends /set_surface/port 0, which switches this host to "auto": Ardour then
replies to the port the daemon sends from, its own port (osc.cc, set_surface_port). That also
takes feedback away from another surface on the same host at another port. If Ardour still says
nothing, the follower's `note` says what to change, for the log and /status.

Ardour reports /position/bbt only when its playhead moves (osc_global_observer.cc, `tick`), about
every 100 ms while it rolls, and a locate that stops a rolling transport sends no /transport_stop
(Ardour 7.3, seen by tests/bridge/clock/test_ardour_real.py). So with Ardour, playing with no report
for HELD_AFTER seconds means its playhead stands still: the follower stops at the last reported
position, and plays again when Ardour says /transport_play 1 or reports a moving playhead (two
reports in a row, each a little ahead of the one before; one report alone may be a locate).

Ardour's feedback carries no tempo (and REAPER's flooding-free pattern may leave it out), so
when no /tempo/raw has come the tempo is derived: a least-squares line through the last few
seconds of (arrival time, beat) points while playing; a jump (locate, loop) restarts the line.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bridge.clock.follower import Follower, PollThread, log
from bridge.clock.grid import MAX_BPM, MIN_BPM, Grid, Timeline, beat_of_bbt
from bridge.state.rules import MAX_BEAT_POSITION, RuleError, signature

# DAW feedback addresses this follower understands -> the kind of message.
ADDRESSES = {
    "/tempo/raw": "tempo", "/play": "play", "/stop": "stop", "/beat/str": "beat", "/time": "time",
    "/time/signature": "signature", "/transport_play": "play", "/transport_stop": "stop",
    "/position/bbt": "bbt",
}
# Other feedback Ardour sends a surface with bits 16|32 (transport and master section): dropped quietly.
ARDOUR_QUIET = ("/loop_toggle", "/toggle_roll", "/rewind", "/ffwd", "/record_tally", "/rec_enable_toggle",
                "/session_name", "/marker", "/heartbeat", "/master/", "/monitor/", "/click/", "/group/list",
                "/jog/", "/cancel_all_solos", "/toggle_punch_in", "/toggle_punch_out", "/toggle_click",
                "/position/")
ARDOUR_FEEDBACK = 16 | 32      # transport state (master section) + /position/bbt
ARDOUR_TICKS_PER_BEAT = 1920.0
HANDSHAKE_EVERY = 5.0          # re-send the handshake while Ardour has been silent this long
NOTE_AFTER = 3.0               # no feedback this long after the first handshake: say what to change
HELD_AFTER = 0.5               # Ardour playing, yet no /position/bbt this long (5 reports): its playhead is still


class DialectError(ValueError):
    """A DAW feedback message with arguments this follower cannot read."""


@dataclass(frozen=True)
class DawMessage:
    address: str
    kind: str                   # one of ADDRESSES' values
    number: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind in ("tempo", "play", "stop", "time"):
            if self.number is None or not math.isfinite(self.number):
                raise DialectError(f"{self.address}: expected a number")
        elif self.text is None:
            raise DialectError(f"{self.address}: expected a string")


def is_dialect(address: str) -> bool:
    return address in ADDRESSES


def is_quiet(address: str) -> bool:
    return any(address == q or (q.endswith("/") and address.startswith(q)) for q in ARDOUR_QUIET)


def parse(address: str, args) -> DawMessage:
    kind = ADDRESSES[address]
    if len(args) < 1:
        raise DialectError(f"{address}: no argument")
    v = args[0]
    if kind in ("tempo", "play", "stop", "time"):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise DialectError(f"{address}: expected a number, got {type(v).__name__}")
        return DawMessage(address, kind, number=float(v))
    if not isinstance(v, str) or len(v) > 64:
        raise DialectError(f"{address}: expected a short string")
    return DawMessage(address, kind, text=v)


# ASCII digits only, a few at a time: `\d` and str.isdigit also take "²" or "٣", which int() refuses
# or reads as a number the DAW never sent.
_SIG = re.compile(r"\s*([0-9]{1,4})\s*/\s*([0-9]{1,4})\s*")
_NUMS = re.compile(r"[0-9]+")
_BEAT_STRING = re.compile(r"\s*[0-9]{1,9}(?:[.:| ]{1,3}[0-9]{1,9}){1,3}\s*")
_BBT_FIELD = re.compile(r"\s*[0-9]{1,9}\s*")


def parse_signature(text: str) -> tuple[int, int]:
    m = _SIG.fullmatch(text)
    if not m:
        raise DialectError(f"time signature {text!r} is not like \"4 / 4\"")
    try:
        return signature(int(m.group(1)), int(m.group(2)), "time signature")
    except RuleError as e:
        raise DialectError(f"time signature {text!r} is out of range: {e}") from None


def parse_beat_string(text: str, numerator: int) -> float:
    """REAPER "5.1.00" (bar.beat.hundredths of a beat) or Bitwig "5.1.1.00" / "005:01:01:00"
    (bar.beat.sixteenth.ticks of a sixteenth, 0-99) -> beats from bar 1."""
    if not _BEAT_STRING.fullmatch(text):
        raise DialectError(f"beat position {text!r} is not like \"5.1.00\"")
    parts = [int(p) for p in _NUMS.findall(text)]
    if len(parts) not in (2, 3, 4) or parts[0] < 1 or parts[1] < 1:
        raise DialectError(f"beat position {text!r} is not like \"5.1.00\"")
    bar, beat = parts[0], parts[1]
    frac = 0.0
    if len(parts) == 3:
        frac = parts[2] / 100.0
    elif len(parts) == 4:
        frac = (max(parts[2], 1) - 1) / 4.0 + parts[3] / 400.0
    return (bar - 1) * numerator + (beat - 1) + frac


def parse_bbt(text: str, numerator: int) -> float:
    """Ardour "BBB|bb|tttt" (ticks of 1920 per beat) -> beats from bar 1."""
    parts = text.strip().split("|")
    if len(parts) != 3 or not all(_BBT_FIELD.fullmatch(p) for p in parts):
        raise DialectError(f"bar/beat position {text!r} is not like \"005|01|0000\"")
    bar, beat, tick = (int(p) for p in parts)
    if bar < 1 or beat < 1:
        raise DialectError(f"bar/beat position {text!r} counts from 1")
    return beat_of_bbt(bar, beat, tick, ARDOUR_TICKS_PER_BEAT, numerator)


class BeatTempo:
    """Tempo from how a reported position advances: least squares over the last `window` seconds."""

    def __init__(self, window: float = 3.0):
        self.window = window
        self.points: deque[tuple[float, float]] = deque(maxlen=512)

    def add(self, t: float, beat: float, beats_per_second: float) -> None:
        if self.points:
            t0, b0 = self.points[-1]
            expected = b0 + (t - t0) * beats_per_second
            if beat < b0 - 1e-6 or abs(beat - expected) > 1.0:  # a locate or a loop: start over
                self.points.clear()
        self.points.append((t, beat))
        while self.points and self.points[0][0] < t - self.window:
            self.points.popleft()

    def reset(self) -> None:
        self.points.clear()

    def beats_per_second(self) -> float | None:
        if len(self.points) < 4 or self.points[-1][0] - self.points[0][0] < 0.4:
            return None
        n = len(self.points)
        mt = sum(p[0] for p in self.points) / n
        mb = sum(p[1] for p in self.points) / n
        var = sum((p[0] - mt) ** 2 for p in self.points)
        slope = sum((p[0] - mt) * (p[1] - mb) for p in self.points) / var
        return slope if slope > 0 else None


class OscDialectFollower(Follower):
    """Fed from the daemon's OSC thread (no thread of its own) plus, with `ardour`, a handshake
    thread that asks Ardour for transport and bar/beat feedback until Ardour answers."""

    source = "osc"

    def __init__(self, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 ardour: tuple[str, int] | None = None, send: Callable[..., None] | None = None):
        super().__init__(base, on_update, clock)
        self.ardour, self.send = ardour, send
        self.tempo: float | None = None          # from /tempo/raw; None: derived
        self.signature: tuple[int, int] | None = None
        self.playing = False
        self.beat = 0.0
        self.beat_time = clock()
        self.derived = BeatTempo()
        self.last_ardour = -math.inf
        self._handshake = PollThread("ardour-handshake", self._poll, 0.25) if ardour else None
        self._last_handshake = -math.inf
        self._first_handshake: float | None = None
        self._noted = False
        self._beat_string_at = -math.inf
        # Fed by the daemon's OSC thread, checked for a still playhead by the handshake thread.
        self._state_lock = threading.Lock()
        self._note_lock = threading.Lock()  # the note is logged once, by whichever thread reads it first
        self._moved_at = -math.inf        # Ardour's last /position/bbt, or when it started playing
        self._reported_beat = 0.0         # the position that report gave
        self._held = False                # stopped because Ardour's playhead stood still, not by its word
        self._held_steps = 0              # reports since, each a little ahead of the one before
        # The DAW's reported positions with the tempo there, summed from bar 1 (a derived tempo wavers by
        # tenths of a bpm; a real change moves it further)
        self.timeline = Timeline(tempo_tolerance=0.5)

    def __enter__(self) -> OscDialectFollower:
        if self._handshake is not None:
            self.handshake()
            self._handshake.start()
        return self

    def handshake(self) -> None:
        """/set_surface/port 0 (reply to the port we send from) and /set_surface/feedback to Ardour,
        again whenever it has been silent HANDSHAKE_EVERY seconds (Ardour may start after us, or
        restart); after NOTE_AFTER seconds of silence, a note on what to change, logged once."""
        now = time.monotonic()
        _ = self.note  # logs it, once, when it first applies
        if now - self.last_ardour < HANDSHAKE_EVERY or now - self._last_handshake < HANDSHAKE_EVERY:
            return
        self._last_handshake = now
        if self._first_handshake is None:
            self._first_handshake = now
        assert self.send is not None and self.ardour is not None
        self.send(self.ardour, "/set_surface/port", (0,))  # 0 = "auto": reply to the sender's own port
        self.send(self.ardour, "/set_surface/feedback", (ARDOUR_FEEDBACK,))
        log.info("asked Ardour at %s:%d for transport and bar/beat feedback, sent to this port", *self.ardour)

    def _poll(self) -> None:
        self.handshake()
        self.hold_if_still()

    def hold_if_still(self) -> None:
        """With Ardour: playing, yet no /position/bbt for HELD_AFTER seconds (Ardour sends one about every
        100 ms while its playhead moves, and a locate that stops it sends no /transport_stop): stop at
        the position Ardour last reported."""
        with self._state_lock:
            t = self.clock()
            if self.ardour is None or not self.playing or t - self._moved_at < HELD_AFTER:
                return
            self.playing, self._held, self._held_steps = False, True, 0
            self.derived.reset()
            self.beat, self.beat_time = self._reported_beat, t
            self._publish(t)
        log.info("Ardour's playhead has not moved for %.1f s: stopped at beat %.3f", HELD_AFTER,
                 self._reported_beat)

    @property
    def note(self) -> str:
        """What to change when Ardour, asked for feedback, has said nothing for NOTE_AFTER seconds
        (for the log and /status); "" otherwise. Logged once, by whichever reads it first, so the
        log never says it later than /status does."""
        if self.ardour is None or self._first_handshake is None or self.last_ardour >= self._first_handshake \
                or time.monotonic() - self._first_handshake < NOTE_AFTER:
            return ""
        text = self._note_text()
        with self._note_lock:
            if not self._noted:
                self._noted = True
                log.warning("%s", text)
        return text

    def _note_text(self) -> str:
        host, port = self.ardour
        return (f"no feedback from Ardour at {host}:{port}: in Ardour, Edit > Preferences > Control Surfaces, "
                f"enable Open Sound Control on port {port}; in its settings set Port Mode to Auto (or keep "
                "Manual and set Reply Manual Port to this daemon's port); Ardour before 6 ignores "
                "/set_surface/port, which asks for that")

    def _numerator(self) -> int:
        return self.signature[0] if self.signature else self.base.numerator

    def _denominator(self) -> int:
        return self.signature[1] if self.signature else self.base.denominator

    def current_tempo(self) -> float:
        if self.tempo is not None:
            return self.tempo
        bps = self.derived.beats_per_second()
        if bps is None:
            g = self._grid
            return g.tempo if g is not None else self.base.tempo
        return min(MAX_BPM, max(MIN_BPM, bps * 60.0 * 4.0 / self._denominator()))

    def feed(self, msg: DawMessage, sender: tuple[str, int] | None = None) -> None:
        with self._state_lock:
            self._feed(msg)

    def _feed(self, msg: DawMessage) -> None:
        t = self.clock()
        if msg.kind in ("play", "stop") and msg.address.startswith("/transport_") or msg.kind == "bbt":
            self.last_ardour = time.monotonic()
        g = self._grid
        if msg.kind == "tempo":
            if not MIN_BPM <= msg.number <= MAX_BPM:
                raise DialectError(f"{msg.address}: tempo {msg.number:g} is outside [{MIN_BPM:g}, {MAX_BPM:g}]")
            self._move_to(t)
            self.tempo = msg.number
        elif msg.kind == "signature":
            self._move_to(t)
            self.signature = parse_signature(msg.text)
        elif msg.kind == "play":
            self._move_to(t)
            now_playing = msg.number >= 0.5
            if now_playing != self.playing:
                self.derived.reset()
                self._moved_at = t  # Ardour's first report of a rolling playhead follows within ~100 ms
            self.playing, self._held = now_playing, False
        elif msg.kind == "stop":
            if msg.number >= 0.5:
                self._move_to(t)
                self.playing, self._held = False, False
                self.derived.reset()
        elif msg.kind in ("beat", "bbt"):
            fn = parse_beat_string if msg.kind == "beat" else parse_bbt
            beat = fn(msg.text, self._numerator())
            if self._held:
                # A playhead that moves again (a locate and roll sends no /transport_play) reports a
                # little ahead each time; a locate while stopped reports once.
                self._held_steps = self._held_steps + 1 if 0.0 < beat - self._reported_beat <= 1.0 else 0
                if self._held_steps >= 2:
                    self.playing, self._held = True, False
                    self.derived.reset()
            self._at(t, beat)
            self._beat_string_at = t
            self._moved_at, self._reported_beat = t, beat
        elif msg.kind == "time":
            if msg.number < 0:
                raise DialectError(f"{msg.address}: time must be >= 0 seconds")
            if g is None or not self._recent_beat_string(t):
                bps = self.current_tempo() / 60.0 * self._denominator() / 4.0
                self._at(t, msg.number * bps)
            else:
                return  # /beat/str is the better position; /time only fills in without it
        self._publish(t)

    def _recent_beat_string(self, t: float) -> bool:
        return self._beat_string_at > t - 1.0

    def _at(self, t: float, beat: float) -> None:
        # Refused at the edge: a position the session could not save (and load again) is never taken.
        quarters = beat * 4.0 / self._denominator()
        if not 0.0 <= quarters <= MAX_BEAT_POSITION:
            raise DialectError(f"position {quarters:g} quarter notes is beyond the session's "
                               f"[0, {MAX_BEAT_POSITION:g}]")
        if self.playing:
            self.derived.add(t, beat, self.current_tempo() / 60.0 * self._denominator() / 4.0)
        self.beat, self.beat_time = beat, t
        self.timeline.observe(beat / self._numerator(), self.current_tempo(), self._numerator(), self._denominator())

    def _move_to(self, t: float) -> None:
        """Carry the position forward to t before the tempo or the play state changes."""
        g = self._grid
        if g is not None:
            self.beat, self.beat_time = g.beat_at(t), t

    def _publish(self, t: float) -> None:
        self.publish(tempo=self.current_tempo(), numerator=self._numerator(), denominator=self._denominator(),
                     playing=self.playing, anchor_time=self.beat_time, anchor_beat=self.beat)

    def close(self) -> None:
        if self._handshake is not None:
            self._handshake.close()
