"""OSC protocol v1: every incoming message becomes one frozen command object, or a ProtocolError.

Parsing and validation happen once, here, at the edge: the rest of the daemon only ever sees
well-typed, range-checked, immutable commands, so a bad packet can never reach the session or
the job queue half-checked. Each error carries a short stable `code` a DAW script can branch on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from bridge.state import rules as R
from bridge.osc.paths import PathPolicy
from bridge.osc.reply_budget import COOKIE_CHARS
from bridge.state.rules import (MAX_BAR_POSITION, MAX_BARS, MAX_PRIORITY, PARAM_KEYS, ProtocolError,
                                RuleError, type_tags)
from model.types import MAX_REQUEST_SECONDS
from plugin_host.tempo import DENOMINATORS, MAX_BPM, MAX_NUMERATOR, MIN_BPM

# The value rules (ranges, names) live in bridge.state.rules, shared with the session loader; this module
# adds what only a message has: addresses, argument counts and the daemon's configurable Limits.
MIDI_SUFFIXES = (".mid", ".midi")
AUDIO_SUFFIXES = (".wav", ".flac", ".aif", ".aiff", ".ogg", ".mp3")



@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may ask for; all configurable on the daemon."""

    max_string: int = 1024
    max_blob: int = 60_000
    max_notes: int = 2048
    max_tracks: int = 64
    max_queued: int = 32
    max_seconds: float = 120.0  # at most MAX_REQUEST_SECONDS, what one engine request makes

    def __post_init__(self) -> None:
        if not 0 < self.max_seconds <= MAX_REQUEST_SECONDS:
            raise ValueError(f"max_seconds must be in (0, {MAX_REQUEST_SECONDS:g}], got {self.max_seconds}")


# ---------------------------------------------------------------- field checks
#
# A command checks its own fields when it is built (as mido's messages do), so a command that
# exists is valid, whoever built it: parse() below, a test, or another part of the daemon.
# Bounds a daemon configures (Limits, the path policy) are checked by parse(), before.


def _fail(cmd: Command, what: str, code: str = "bad_args") -> ProtocolError:
    return ProtocolError(code, f"{cmd.address}: {what}; expected ({cmd.expects})")


def _set(cmd: Command, name: str, value: Any) -> None:
    object.__setattr__(cmd, name, value)  # normalising a field of a frozen dataclass in __post_init__


def _rule(cmd: Command, check: Callable[..., Any], *args: Any) -> Any:
    """One of bridge.state.rules' checks, for a command: a RuleError becomes a ProtocolError naming the address."""
    try:
        return check(*args)
    except RuleError as e:
        if e.code == "bad_track":
            raise ProtocolError("bad_track", f"{cmd.address}: {e.message}") from None
        raise _fail(cmd, e.message, e.code) from None


def check_track(cmd: Command, name: Any) -> str:
    return _rule(cmd, R.track_name, name)


def check_path(cmd: Command, v: Any, what: str, suffixes: Sequence[str]) -> Path:
    if not isinstance(v, Path):
        raise _fail(cmd, f"{what} must be a path, got {type(v).__name__}")
    if v.suffix.lower() not in suffixes:
        raise _fail(cmd, f"{what} {v.name!r} must end in {', '.join(suffixes)}")
    return v


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    """One OSC message. `pattern` is its address, `expects` its arguments (for error messages)."""

    address: str
    pattern: ClassVar[str] = ""
    expects: ClassVar[str] = "no arguments"

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ProtocolError if a field is out of range; normalise fields with _set."""


@dataclass(frozen=True)
class Ping(Command):
    pattern: ClassVar[str] = "/ping"


@dataclass(frozen=True)
class Status(Command):
    pattern: ClassVar[str] = "/status"


@dataclass(frozen=True)
class ListTracks(Command):
    pattern: ClassVar[str] = "/tracks"


@dataclass(frozen=True)
class TrackCommand(Command):
    track: str

    def check(self) -> None:
        check_track(self, self.track)


@dataclass(frozen=True)
class SetPrompt(TrackCommand):
    text: str
    pattern: ClassVar[str] = "/track/<name>/prompt"
    expects: ClassVar[str] = "s text"

    def check(self) -> None:
        super().check()
        _set(self, "text", _rule(self, R.text, self.text, "prompt").strip())


@dataclass(frozen=True)
class SetPreset(TrackCommand):
    name: str  # "" clears the preset
    pattern: ClassVar[str] = "/track/<name>/preset"
    expects: ClassVar[str] = "s preset name, or \"\" to clear"

    def check(self) -> None:
        super().check()
        _rule(self, R.preset_name, self.name)


@dataclass(frozen=True)
class SetParam(TrackCommand):
    key: str
    value: float | int | bool | None  # None: back to the preset's / default value
    pattern: ClassVar[str] = "/track/<name>/param"
    expects: ClassVar[str] = f"s key ({', '.join(PARAM_KEYS)}), value; or s key alone to reset it"

    def check(self) -> None:
        super().check()
        key = _rule(self, R.text, self.key, "key")
        _set(self, "value", _rule(self, R.param, key, self.value))


@dataclass(frozen=True)
class MelodyMidi(TrackCommand):
    path: Path
    pattern: ClassVar[str] = "/track/<name>/melody/midi"
    expects: ClassVar[str] = "s path to a .mid file"

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "MIDI file", MIDI_SUFFIXES)


@dataclass(frozen=True)
class MelodyAudio(TrackCommand):
    path: Path
    pattern: ClassVar[str] = "/track/<name>/melody/audio"
    expects: ClassVar[str] = "s path to a .wav/.flac file"

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "audio file", AUDIO_SUFFIXES)


@dataclass(frozen=True)
class MelodyNotes(TrackCommand):
    notes: tuple[tuple[int, float, float], ...]  # (pitch, start_beat, length_beats)
    pattern: ClassVar[str] = "/track/<name>/melody/notes"
    expects: ClassVar[str] = "i pitch, f start_beat, f length_beats, ... (one triple per note)"

    def check(self) -> None:
        super().check()
        if not self.notes or not all(isinstance(n, (tuple, list)) and len(n) == 3 for n in self.notes):
            raise _fail(self, "no notes, or a note that is not a (pitch, start, length) triple")
        _set(self, "notes", tuple(_rule(self, R.note, k, p, s, n) for k, (p, s, n) in enumerate(self.notes, 1)))


@dataclass(frozen=True)
class MelodyChroma(TrackCommand):
    data: bytes  # little-endian float32, frames x 12
    frame_rate: float
    pattern: ClassVar[str] = "/track/<name>/melody/chroma"
    expects: ClassVar[str] = "b float32 frames x 12, f frame_rate"

    def check(self) -> None:
        super().check()
        _set(self, "data", _rule(self, R.chroma, self.data))
        _set(self, "frame_rate", _rule(self, R.chroma_rate, self.frame_rate))

    @property
    def frames(self) -> int:
        return len(self.data) // R.CHROMA_FRAME_BYTES


@dataclass(frozen=True)
class MelodyClear(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/melody/clear"


@dataclass(frozen=True)
class LengthCommand(TrackCommand):
    """A stem of a given length: /generate and /play."""

    seconds: float | None  # exactly one of seconds and bars is set
    bars: int | None
    priority: int = 0
    at_bar: int | None = None  # the bar (1 = the first) the stem belongs on; None: where the transport is
    expects: ClassVar[str] = "f seconds | i bars, s \"bars\"; optional i priority 0-9; optional s \"at\", i bar"

    def check(self) -> None:
        super().check()
        if (self.seconds is None) == (self.bars is None):
            raise _fail(self, "give a length in seconds or in bars, not both or neither")
        if self.bars is not None:
            _set(self, "bars", _rule(self, R.integer, self.bars, "bars", 1, MAX_BARS))
        else:
            _set(self, "seconds", _rule(self, R.seconds, self.seconds))
        _set(self, "priority", _rule(self, R.integer, self.priority, "priority", 0, MAX_PRIORITY))
        if self.at_bar is not None:
            _set(self, "at_bar", _rule(self, R.integer, self.at_bar, "bar after \"at\"", 1, MAX_BAR_POSITION))


@dataclass(frozen=True)
class Generate(LengthCommand):
    pattern: ClassVar[str] = "/track/<name>/generate"


@dataclass(frozen=True)
class PlayGenerate(LengthCommand):
    """/generate, and the part is heard live while it generates (bridge/live/play.py)."""

    pattern: ClassVar[str] = "/track/<name>/play"


@dataclass(frozen=True)
class Continue(TrackCommand):
    path: Path
    seconds: float
    priority: int = 0
    pattern: ClassVar[str] = "/track/<name>/continue"
    expects: ClassVar[str] = "s path to a .wav/.flac take, f seconds; optional i priority 0-9"

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "take", AUDIO_SUFFIXES)
        _set(self, "seconds", _rule(self, R.seconds, self.seconds))
        _set(self, "priority", _rule(self, R.integer, self.priority, "priority", 0, MAX_PRIORITY))


@dataclass(frozen=True)
class ClearTrack(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/clear"


@dataclass(frozen=True)
class DeleteTrack(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/delete"


@dataclass(frozen=True)
class TrackState(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/state"


@dataclass(frozen=True)
class KeepTake(TrackCommand):
    """The take (a finished job of this track) that becomes the track's kept stem; the others stay on disk."""

    job_id: int | None  # None: the track keeps no take
    pattern: ClassVar[str] = "/track/<name>/keep"
    expects: ClassVar[str] = "i job id of a finished take of this track; or no argument to keep none"

    def check(self) -> None:
        super().check()
        if self.job_id is not None:
            _set(self, "job_id", _rule(self, R.job_id, self.job_id))


@dataclass(frozen=True)
class Note(TrackCommand):
    pitch: int  # MIDI 0-127
    velocity: int  # 0 = note off
    pattern: ClassVar[str] = "/track/<name>/note"
    expects: ClassVar[str] = "i pitch 0-127, i velocity 0-127 (0 = off)"

    def check(self) -> None:
        super().check()
        _set(self, "pitch", _rule(self, R.integer, self.pitch, "pitch", 0, 127))
        _set(self, "velocity", _rule(self, R.integer, self.velocity, "velocity", 0, 127))


@dataclass(frozen=True)
class NotesOff(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/notes/off"


@dataclass(frozen=True)
class MidiChannel(TrackCommand):
    channel: int  # 1-16; 0 = route this track's channels back to the default
    pattern: ClassVar[str] = "/track/<name>/midi/channel"
    expects: ClassVar[str] = "i MIDI channel 1-16, or 0 to route it back to the default"

    def check(self) -> None:
        super().check()
        _set(self, "channel", _rule(self, R.integer, self.channel, "channel", 0, 16))


@dataclass(frozen=True)
class JobCommand(Command):
    job_id: int

    def check(self) -> None:
        if isinstance(self.job_id, bool) or not isinstance(self.job_id, int) or not 1 <= self.job_id <= R.MAX_JOB_ID:
            raise ProtocolError("bad_address", f"{self.address}: job id must be a positive whole number, "
                                               "as in /job/3/cancel")


@dataclass(frozen=True)
class CancelJob(JobCommand):
    pattern: ClassVar[str] = "/job/<id>/cancel"


@dataclass(frozen=True)
class JobStatus(JobCommand):
    pattern: ClassVar[str] = "/job/<id>/status"


@dataclass(frozen=True)
class SetTempo(Command):
    bpm: float
    pattern: ClassVar[str] = "/transport/tempo"
    expects: ClassVar[str] = f"f bpm in [{MIN_BPM:g}, {MAX_BPM:g}]"

    def check(self) -> None:
        _set(self, "bpm", _rule(self, R.tempo, self.bpm))


@dataclass(frozen=True)
class SetSignature(Command):
    numerator: int
    denominator: int
    pattern: ClassVar[str] = "/transport/signature"
    expects: ClassVar[str] = (f"i numerator 1-{MAX_NUMERATOR}, "
                              f"i denominator {'/'.join(str(d) for d in DENOMINATORS)}")

    def check(self) -> None:
        num, den = _rule(self, R.signature, self.numerator, self.denominator)
        _set(self, "numerator", num)
        _set(self, "denominator", den)


@dataclass(frozen=True)
class TransportMove(Command):
    quarter_notes: float | None  # the position in quarter notes from bar 1; None: stay where it is

    def check(self) -> None:
        if self.quarter_notes is not None:
            _set(self, "quarter_notes", _rule(self, R.beat_position, self.quarter_notes))


@dataclass(frozen=True)
class Play(TransportMove):
    pattern: ClassVar[str] = "/transport/play"
    expects: ClassVar[str] = "optional f position in quarter notes"


@dataclass(frozen=True)
class Stop(TransportMove):
    pattern: ClassVar[str] = "/transport/stop"
    expects: ClassVar[str] = "optional f position in quarter notes"


@dataclass(frozen=True)
class Locate(TransportMove):
    quarter_notes: float
    pattern: ClassVar[str] = "/transport/locate"
    expects: ClassVar[str] = "f position in quarter notes"

    def check(self) -> None:
        _set(self, "quarter_notes", _rule(self, R.beat_position, self.quarter_notes))


@dataclass(frozen=True)
class TransportState(Command):
    pattern: ClassVar[str] = "/transport/state"


@dataclass(frozen=True)
class JamCommand(Command):
    track: str
    expects: ClassVar[str] = "s track"

    def check(self) -> None:
        _rule(self, R.text, self.track, "track")
        check_track(self, self.track)


@dataclass(frozen=True)
class Hello(Command):
    """A sender introducing its host with the daemon's --key (bridge.osc.access)."""

    key: str
    pattern: ClassVar[str] = "/hello"
    expects: ClassVar[str] = "s key"

    def check(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise _fail(self, "the key must be a non-empty string (s)")


@dataclass(frozen=True)
class Pad(Command):
    """Bytes that earn the sender reply credit (bridge.osc.reply_budget); any arguments, never answered."""

    pattern: ClassVar[str] = "/pad"
    expects: ClassVar[str] = "anything"


@dataclass(frozen=True)
class Cookie(Command):
    """Asks for the cookie that proves the sender's address (bridge.osc.reply_budget); any arguments,
    so a client pads it to pay for the answer."""

    pattern: ClassVar[str] = "/cookie"
    expects: ClassVar[str] = "anything (pad it to 64 bytes or more: the answer is paid from its bytes)"


@dataclass(frozen=True)
class Prove(Command):
    """Sends back the cookie /cookie answered, proving the sender receives at its address."""

    cookie: str
    pattern: ClassVar[str] = "/prove"
    expects: ClassVar[str] = "s cookie (the one /cookie answered)"

    def check(self) -> None:
        if not isinstance(self.cookie, str) or len(self.cookie) != COOKIE_CHARS:
            got = f"{len(self.cookie)} characters" if isinstance(self.cookie, str) else type_tags([self.cookie])
            raise _fail(self, f"the cookie is the {COOKIE_CHARS}-character string (s) /cookie answers, got {got}")


@dataclass(frozen=True)
class JamStart(JamCommand):
    pattern: ClassVar[str] = "/jam/start"


@dataclass(frozen=True)
class JamStop(JamCommand):
    pattern: ClassVar[str] = "/jam/stop"


@dataclass(frozen=True)
class JamStatus(JamCommand):
    pattern: ClassVar[str] = "/jam/status"


# ---------------------------------------------------------------- argument checks


class _Args:
    """One message's arguments: counts and the daemon's own bounds (Limits, paths); every failure names the address.

    Types and ranges are the commands' own business (they check themselves when built).
    """

    def __init__(self, address: str, args: Sequence[Any], expects: str, limits: Limits,
                 policy: PathPolicy | None = None):
        self.address, self.args, self.expects, self.limits = address, list(args), expects, limits
        self.policy = policy

    def fail(self, what: str, code: str = "bad_args") -> ProtocolError:
        return ProtocolError(code, f"{self.address}: {what}; expected ({self.expects})")

    def count(self, *allowed: int) -> int:
        n = len(self.args)
        if n not in allowed:
            got = f"({type_tags(self.args)})" if n else "no arguments"
            raise self.fail(f"got {got}")
        return n

    def text(self, i: int, what: str) -> Any:
        """Argument i, refused with `limit` when it is text longer than the daemon allows."""
        v = self.args[i]
        if isinstance(v, str) and len(v) > self.limits.max_string:
            raise self.fail(f"{what} is {len(v)} characters, the limit is {self.limits.max_string}", "limit")
        return v

    def path(self, i: int, what: str, policy: PathPolicy | None, suffixes: Sequence[str]) -> Path:
        text = self.text(i, what)
        if not isinstance(text, str) or not text.strip():
            raise self.fail(f"{what} must be a non-empty string (s), got {type_tags([text])}")
        if policy is None:
            raise ProtocolError("bad_path", f"{self.address}: this daemon accepts no paths")
        return policy.check(text, suffixes, what=f"{self.address}: {what}")

    def seconds(self, cmd: Generate | Continue) -> Generate | Continue:
        """The command, unless it asks for more seconds than this daemon allows one job."""
        if cmd.seconds is not None and cmd.seconds > self.limits.max_seconds:
            raise self.fail(f"{cmd.seconds:g} s is over this daemon's limit of {self.limits.max_seconds:g} s "
                            "per job", "limit")
        return cmd


# ---------------------------------------------------------------- OSC arguments -> constructors
#
# A builder takes the message's arguments and the fields its address carries (the track name,
# the job id) and calls the command's constructor, which checks every field. To add a message:
# a frozen Command subclass with `pattern` and `expects`, a builder entry in BUILDERS below, and a
# handler entry in bridge.daemon.Daemon's dispatch table.

Builder = Callable[[_Args, type, tuple], Command]


def _no_args(a: _Args, cls: type, pre: tuple) -> Command:
    a.count(0)
    return cls(a.address, *pre)


def _one(a: _Args, cls: type, pre: tuple) -> Command:
    a.count(1)
    return cls(a.address, *pre, a.text(0, fields(cls)[1 + len(pre)].name))


def _two(a: _Args, cls: type, pre: tuple) -> Command:
    a.count(2)
    return cls(a.address, *pre, *a.args)


def _optional_one(a: _Args, cls: type, pre: tuple) -> Command:
    return cls(a.address, *pre, a.args[0] if a.count(0, 1) else None)


def _path_of(what: str, suffixes: Sequence[str]) -> Builder:
    def build(a: _Args, cls: type, pre: tuple) -> Command:
        a.count(1)
        return cls(a.address, *pre, a.path(0, what, a.policy, suffixes))
    return build


def _param(a: _Args, cls: type, pre: tuple) -> Command:
    n = a.count(1, 2)
    value = a.args[1] if n == 2 else None
    if a.args[0] == "seed" and value == -1 and not isinstance(value, bool):
        value = None  # seed -1: back to a fresh seed
    return cls(a.address, *pre, a.args[0], value)


def _generate(a: _Args, cls: type, pre: tuple) -> Command:
    """(f seconds) | (i bars, s "bars") | (f n, s "seconds"), each with an optional trailing i priority,
    then optionally s "at", i bar (a string, so it can never be taken for the priority)."""
    at_bar = None
    if len(a.args) >= 2 and a.args[-2] == "at":
        at_bar, a.args = a.args[-1], list(a.args[:-2])
    n = a.count(1, 2, 3)
    unit = a.args[1] if n >= 2 and isinstance(a.args[1], str) else None
    if unit is not None and unit not in ("bars", "seconds"):
        raise a.fail(f"unit must be \"bars\" or \"seconds\", got {unit[:20]!r}")
    prio_at = 2 if unit is not None else 1
    if n > prio_at + 1:
        raise a.fail(f"got ({type_tags(a.args)})")
    priority = a.args[prio_at] if n == prio_at + 1 else 0
    if unit == "bars":
        return cls(a.address, *pre, None, a.args[0], priority, at_bar)
    return a.seconds(cls(a.address, *pre, a.args[0], None, priority, at_bar))


def _continue(a: _Args, cls: type, pre: tuple) -> Command:
    n = a.count(2, 3)
    path = a.path(0, "take", a.policy, AUDIO_SUFFIXES)
    return a.seconds(cls(a.address, *pre, path, a.args[1], a.args[2] if n == 3 else 0))


def _notes(a: _Args, cls: type, pre: tuple) -> Command:
    n = len(a.args)
    if n == 0 or n % 3:
        raise a.fail(f"got {n} arguments, not a whole number of (pitch, start, length) triples")
    if n // 3 > a.limits.max_notes:
        raise a.fail(f"{n // 3} notes, the limit is {a.limits.max_notes}", "limit")
    return cls(a.address, *pre, tuple(tuple(a.args[k:k + 3]) for k in range(0, n, 3)))


def _chroma(a: _Args, cls: type, pre: tuple) -> Command:
    a.count(2)
    blob = a.args[0]
    if isinstance(blob, (bytes, bytearray)) and len(blob) > a.limits.max_blob:
        raise a.fail(f"blob is {len(blob)} bytes, the limit is {a.limits.max_blob}", "limit")
    return cls(a.address, *pre, blob, a.args[1])


# command class -> builder; the class's `pattern` is the address it answers.
BUILDERS: dict[type, Builder] = {
    Ping: _no_args, Status: _no_args, ListTracks: _no_args,
    SetPrompt: _one, SetPreset: _one, SetParam: _param,
    MelodyMidi: _path_of("MIDI file", MIDI_SUFFIXES), MelodyAudio: _path_of("audio file", AUDIO_SUFFIXES),
    MelodyNotes: _notes, MelodyChroma: _chroma, MelodyClear: _no_args,
    Generate: _generate, PlayGenerate: _generate, Continue: _continue,
    Note: _two, NotesOff: _no_args, MidiChannel: _one,
    ClearTrack: _no_args, DeleteTrack: _no_args, TrackState: _no_args, KeepTake: _optional_one,
    CancelJob: _no_args, JobStatus: _no_args,
    SetTempo: _one, SetSignature: _two, Play: _optional_one, Stop: _optional_one, Locate: _one,
    TransportState: _no_args,
    JamStart: _one, JamStop: _one, JamStatus: _one,
    Hello: _one, Pad: lambda a, cls, pre: cls(a.address),
    Cookie: lambda a, cls, pre: cls(a.address), Prove: _one,
}


def _route(address: str) -> tuple[str, tuple]:
    """The pattern an address matches and the fields its path carries: /track/a/prompt -> (.., ("a",))."""
    parts = address.split("/")
    if len(parts) >= 4 and parts[1] == "track":
        return "/track/<name>/" + "/".join(parts[3:]), (parts[2],)
    if len(parts) == 4 and parts[1] == "job":
        text = parts[2]
        return f"/job/<id>/{parts[3]}", (R.job_id_in(text),)
    return address, ()


def parse(address: Any, args: Sequence[Any], *, limits: Limits = Limits(),
          paths: PathPolicy | None = None) -> Command:
    """One OSC message -> its frozen command; ProtocolError with a stable code otherwise."""
    if not isinstance(address, str) or not address.startswith("/") or len(address) > 256:
        raise ProtocolError("bad_address", "address must be text starting with '/', at most 256 characters")
    pattern, pre = _route(address)
    cls = _BY_PATTERN.get(pattern)
    if cls is None:
        raise ProtocolError("bad_address", f"unknown address {address[:80]!r}; see docs/osc.md")
    a = _Args(address, args, cls.expects, limits, paths)
    return BUILDERS[cls](a, cls, pre)


_BY_PATTERN: dict[str, type] = {cls.pattern: cls for cls in BUILDERS}
