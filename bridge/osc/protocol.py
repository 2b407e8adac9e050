"""OSC protocol v1: every incoming message becomes one frozen command object, or a ProtocolError.

Parsing and validation happen once, here, at the edge: the rest of the daemon only ever sees
well-typed, range-checked, immutable commands, so a bad packet can never reach the session or
the job queue half-checked. Each error carries a short stable `code` a DAW script can branch on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, dataclass_transform

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
# a Command subclass naming its `pattern`, `expects` and builder (`build`) in its class line, and
# a handler entry in bridge.daemon.Daemon's dispatch table.

Builder = Callable[[_Args, type, tuple], "Command"]


def _no_args(a: _Args, cls: type, pre: tuple) -> Command:
    a.count(0)
    return cls(a.address, *pre)


def _any_args(a: _Args, cls: type, pre: tuple) -> Command:
    return cls(a.address)  # the arguments are padding, never read


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


# ---------------------------------------------------------------- commands


# command class -> builder; the class's `pattern` is the address it answers. Filled by the classes below.
BUILDERS: dict[type, Builder] = {}


@dataclass_transform(frozen_default=True)
@dataclass(frozen=True)
class Command:
    """One OSC message. `pattern` is its address, `expects` its arguments (for error messages).

    Every subclass is a frozen dataclass; one that names a `pattern` in its class line is a message,
    parsed by `build` (a builder above).
    """

    address: str
    pattern: ClassVar[str] = ""
    expects: ClassVar[str] = "no arguments"

    def __init_subclass__(cls, pattern: str = "", expects: str = "", build: Builder = _no_args,
                          **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if expects:
            cls.expects = expects
        dataclass(frozen=True)(cls)
        if pattern:
            cls.pattern = pattern
            BUILDERS[cls] = build

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ProtocolError if a field is out of range; normalise fields with _set."""


class Ping(Command, pattern="/ping"):
    """Is the daemon there: answered /pong."""


class Status(Command, pattern="/status"):
    """The daemon's model, jobs, jams and clock."""


class ListTracks(Command, pattern="/tracks"):
    """The session's track names."""


class TrackCommand(Command):
    track: str

    def check(self) -> None:
        check_track(self, self.track)


class SetPrompt(TrackCommand, pattern="/track/<name>/prompt", expects="s text", build=_one):
    text: str

    def check(self) -> None:
        super().check()
        _set(self, "text", _rule(self, R.text, self.text, "prompt").strip())


class SetPreset(TrackCommand,
                pattern="/track/<name>/preset",
                expects="s preset name, or \"\" to clear",
                build=_one):
    name: str  # "" clears the preset

    def check(self) -> None:
        super().check()
        _rule(self, R.preset_name, self.name)


class SetParam(TrackCommand,
               pattern="/track/<name>/param",
               expects=f"s key ({', '.join(PARAM_KEYS)}), value; or s key alone to reset it",
               build=_param):
    key: str
    value: float | int | bool | None  # None: back to the preset's / default value

    def check(self) -> None:
        super().check()
        key = _rule(self, R.text, self.key, "key")
        _set(self, "value", _rule(self, R.param, key, self.value))


class MelodyMidi(TrackCommand,
                 pattern="/track/<name>/melody/midi",
                 expects="s path to a .mid file",
                 build=_path_of("MIDI file", MIDI_SUFFIXES)):
    path: Path

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "MIDI file", MIDI_SUFFIXES)


class MelodyAudio(TrackCommand,
                  pattern="/track/<name>/melody/audio",
                  expects="s path to a .wav/.flac file",
                  build=_path_of("audio file", AUDIO_SUFFIXES)):
    path: Path

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "audio file", AUDIO_SUFFIXES)


class MelodyNotes(TrackCommand,
                  pattern="/track/<name>/melody/notes",
                  expects="i pitch, f start_beat, f length_beats, ... (one triple per note)",
                  build=_notes):
    notes: tuple[tuple[int, float, float], ...]  # (pitch, start_beat, length_beats)

    def check(self) -> None:
        super().check()
        if not self.notes or not all(isinstance(n, (tuple, list)) and len(n) == 3 for n in self.notes):
            raise _fail(self, "no notes, or a note that is not a (pitch, start, length) triple")
        _set(self, "notes", tuple(_rule(self, R.note, k, p, s, n) for k, (p, s, n) in enumerate(self.notes, 1)))


class MelodyChroma(TrackCommand,
                   pattern="/track/<name>/melody/chroma",
                   expects="b float32 frames x 12, f frame_rate",
                   build=_chroma):
    data: bytes  # little-endian float32, frames x 12
    frame_rate: float

    def check(self) -> None:
        super().check()
        _set(self, "data", _rule(self, R.chroma, self.data))
        _set(self, "frame_rate", _rule(self, R.chroma_rate, self.frame_rate))

    @property
    def frames(self) -> int:
        return len(self.data) // R.CHROMA_FRAME_BYTES


class MelodyClear(TrackCommand, pattern="/track/<name>/melody/clear"):
    """The track's melody is forgotten."""


class LengthCommand(TrackCommand,
                    expects="f seconds | i bars, s \"bars\"; optional i priority 0-9; optional s \"at\", i bar"):
    """A stem of a given length: /generate and /play."""

    seconds: float | None  # exactly one of seconds and bars is set
    bars: int | None
    priority: int = 0
    at_bar: int | None = None  # the bar (1 = the first) the stem belongs on; None: where the transport is

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


class Generate(LengthCommand, pattern="/track/<name>/generate", build=_generate):
    """A stem of the given length, written to disk."""


class PlayGenerate(LengthCommand, pattern="/track/<name>/play", build=_generate):
    """/generate, and the part is heard live while it generates (bridge/live/play.py)."""


class Continue(TrackCommand,
               pattern="/track/<name>/continue",
               expects="s path to a .wav/.flac take, f seconds; optional i priority 0-9",
               build=_continue):
    path: Path
    seconds: float
    priority: int = 0

    def check(self) -> None:
        super().check()
        check_path(self, self.path, "take", AUDIO_SUFFIXES)
        _set(self, "seconds", _rule(self, R.seconds, self.seconds))
        _set(self, "priority", _rule(self, R.integer, self.priority, "priority", 0, MAX_PRIORITY))


class ClearTrack(TrackCommand, pattern="/track/<name>/clear"):
    """The track's settings back to their defaults; the track stays."""


class DeleteTrack(TrackCommand, pattern="/track/<name>/delete"):
    """The track leaves the session."""


class TrackState(TrackCommand, pattern="/track/<name>/state"):
    """The track's prompt, preset, params, melody and takes."""


class KeepTake(TrackCommand,
               pattern="/track/<name>/keep",
               expects="i job id of a finished take of this track; or no argument to keep none",
               build=_optional_one):
    """The take (a finished job of this track) that becomes the track's kept stem; the others stay on disk."""

    job_id: int | None  # None: the track keeps no take

    def check(self) -> None:
        super().check()
        if self.job_id is not None:
            _set(self, "job_id", _rule(self, R.job_id, self.job_id))


class Note(TrackCommand,
           pattern="/track/<name>/note",
           expects="i pitch 0-127, i velocity 0-127 (0 = off)",
           build=_two):
    pitch: int  # MIDI 0-127
    velocity: int  # 0 = note off

    def check(self) -> None:
        super().check()
        _set(self, "pitch", _rule(self, R.integer, self.pitch, "pitch", 0, 127))
        _set(self, "velocity", _rule(self, R.integer, self.velocity, "velocity", 0, 127))


class NotesOff(TrackCommand, pattern="/track/<name>/notes/off"):
    """Every held note of the track is released."""


class MidiChannel(TrackCommand,
                  pattern="/track/<name>/midi/channel",
                  expects="i MIDI channel 1-16, or 0 to route it back to the default",
                  build=_one):
    channel: int  # 1-16; 0 = route this track's channels back to the default

    def check(self) -> None:
        super().check()
        _set(self, "channel", _rule(self, R.integer, self.channel, "channel", 0, 16))


class JobCommand(Command):
    job_id: int

    def check(self) -> None:
        if isinstance(self.job_id, bool) or not isinstance(self.job_id, int) or not 1 <= self.job_id <= R.MAX_JOB_ID:
            raise ProtocolError("bad_address", f"{self.address}: job id must be a positive whole number, "
                                               "as in /job/3/cancel")


class CancelJob(JobCommand, pattern="/job/<id>/cancel"):
    """The job stops."""


class JobStatus(JobCommand, pattern="/job/<id>/status"):
    """The job's state and progress."""


class SetTempo(Command,
               pattern="/transport/tempo",
               expects=f"f bpm in [{MIN_BPM:g}, {MAX_BPM:g}]",
               build=_one):
    bpm: float

    def check(self) -> None:
        _set(self, "bpm", _rule(self, R.tempo, self.bpm))


class SetSignature(Command,
                   pattern="/transport/signature",
                   expects=(f"i numerator 1-{MAX_NUMERATOR}, "
                             f"i denominator {'/'.join(str(d) for d in DENOMINATORS)}"),
                   build=_two):
    numerator: int
    denominator: int

    def check(self) -> None:
        num, den = _rule(self, R.signature, self.numerator, self.denominator)
        _set(self, "numerator", num)
        _set(self, "denominator", den)


class TransportMove(Command):
    quarter_notes: float | None  # the position in quarter notes from bar 1; None: stay where it is

    def check(self) -> None:
        if self.quarter_notes is not None:
            _set(self, "quarter_notes", _rule(self, R.beat_position, self.quarter_notes))


class Play(TransportMove,
           pattern="/transport/play",
           expects="optional f position in quarter notes",
           build=_optional_one):
    """The daemon's own transport rolls, from a position or where it is."""


class Stop(TransportMove,
           pattern="/transport/stop",
           expects="optional f position in quarter notes",
           build=_optional_one):
    """The daemon's own transport stops, at a position or where it is."""


class Locate(TransportMove, pattern="/transport/locate", expects="f position in quarter notes", build=_one):
    quarter_notes: float

    def check(self) -> None:
        _set(self, "quarter_notes", _rule(self, R.beat_position, self.quarter_notes))


class TransportState(Command, pattern="/transport/state"):
    """The grid the daemon follows: tempo, signature, position, playing."""


class JamCommand(Command, expects="s track"):
    track: str

    def check(self) -> None:
        _rule(self, R.text, self.track, "track")
        check_track(self, self.track)


class Hello(Command, pattern="/hello", expects="s key", build=_one):
    """A sender introducing its host with the daemon's --key (bridge.osc.access)."""

    key: str

    def check(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise _fail(self, "the key must be a non-empty string (s)")


class Pad(Command, pattern="/pad", expects="anything", build=_any_args):
    """Bytes that earn the sender reply credit (bridge.osc.reply_budget); any arguments, never answered."""


class Cookie(Command,
             pattern="/cookie",
             expects="anything (pad it to 64 bytes or more: the answer is paid from its bytes)",
             build=_any_args):
    """Asks for the cookie that proves the sender's address (bridge.osc.reply_budget); any arguments,
    so a client pads it to pay for the answer."""


class Prove(Command, pattern="/prove", expects="s cookie (the one /cookie answered)", build=_one):
    """Sends back the cookie /cookie answered, proving the sender receives at its address."""

    cookie: str

    def check(self) -> None:
        if not isinstance(self.cookie, str) or len(self.cookie) != COOKIE_CHARS:
            got = f"{len(self.cookie)} characters" if isinstance(self.cookie, str) else type_tags([self.cookie])
            raise _fail(self, f"the cookie is the {COOKIE_CHARS}-character string (s) /cookie answers, got {got}")


class JamStart(JamCommand, pattern="/jam/start", build=_one):
    """A live jam starts on the track."""


class JamStop(JamCommand, pattern="/jam/stop", build=_one):
    """The track's jam fades out over one beat, ending on a bar line."""


class JamStatus(JamCommand, pattern="/jam/status", build=_one):
    """The track's jam: how it keeps up."""


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
