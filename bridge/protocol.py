"""OSC protocol v1: every incoming message becomes one frozen command object, or a ProtocolError.

Parsing and validation happen once, here, at the edge: the rest of the daemon only ever sees
well-typed, range-checked, immutable commands, so a bad packet can never reach the session or
the job queue half-checked. Each error carries a short stable `code` a DAW script can branch on.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from bridge.paths import PathPolicy

TRACK_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
PRESET_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MIN_BPM, MAX_BPM = 20.0, 400.0
MAX_PRIORITY = 9
MAX_CHROMA_RATE = 1000.0
MIDI_SUFFIXES = (".mid", ".midi")
AUDIO_SUFFIXES = (".wav", ".flac", ".aif", ".aiff", ".ogg", ".mp3")
PARAM_KEYS = ("guidance", "temperature", "top_k", "top_p", "seed", "greedy")

ERROR_CODES = (
    "bad_packet",   # not an OSC packet at all
    "bad_address",  # no such address
    "bad_track",    # track name outside [A-Za-z0-9_-]{1,32}
    "bad_args",     # wrong count, type or value of arguments
    "bad_path",     # a path outside the stems folder and every --allow-dir
    "not_found",    # a file, preset, track or job that does not exist
    "limit",        # over a size limit: string, blob, notes, seconds, tracks
    "busy",         # the job queue is full, or the daemon is shutting down
    "model",        # the loaded model cannot do it (e.g. melody on a text-only model)
    "unavailable",  # a feature this daemon was started without (live audio)
    "failed",       # a job that failed while running; the message says why
    "internal",     # a bug: the daemon logged a traceback and carried on
)


class ProtocolError(Exception):
    """A message the daemon refuses; `code` is one of ERROR_CODES, the message says what is expected."""

    def __init__(self, code: str, message: str, job_id: int = 0):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


@dataclass(frozen=True)
class Limits:
    """Bounds on what one message may ask for; all configurable on the daemon."""

    max_string: int = 1024
    max_blob: int = 60_000
    max_notes: int = 2048
    max_tracks: int = 64
    max_queued: int = 32
    max_seconds: float = 120.0


# ---------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    address: str
    pattern: ClassVar[str] = ""


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


@dataclass(frozen=True)
class SetPrompt(TrackCommand):
    text: str
    pattern: ClassVar[str] = "/track/<name>/prompt"


@dataclass(frozen=True)
class SetPreset(TrackCommand):
    name: str  # "" clears the preset
    pattern: ClassVar[str] = "/track/<name>/preset"


@dataclass(frozen=True)
class SetParam(TrackCommand):
    key: str
    value: float | int | bool | None  # None: back to the preset's / default value
    pattern: ClassVar[str] = "/track/<name>/param"


@dataclass(frozen=True)
class MelodyMidi(TrackCommand):
    path: Path
    pattern: ClassVar[str] = "/track/<name>/melody/midi"


@dataclass(frozen=True)
class MelodyAudio(TrackCommand):
    path: Path
    pattern: ClassVar[str] = "/track/<name>/melody/audio"


@dataclass(frozen=True)
class MelodyNotes(TrackCommand):
    notes: tuple[tuple[int, float, float], ...]  # (pitch, start_beat, length_beats)
    pattern: ClassVar[str] = "/track/<name>/melody/notes"


@dataclass(frozen=True)
class MelodyChroma(TrackCommand):
    data: bytes  # little-endian float32, frames x 12
    frame_rate: float
    pattern: ClassVar[str] = "/track/<name>/melody/chroma"

    @property
    def frames(self) -> int:
        return len(self.data) // 48


@dataclass(frozen=True)
class MelodyClear(TrackCommand):
    pattern: ClassVar[str] = "/track/<name>/melody/clear"


@dataclass(frozen=True)
class Generate(TrackCommand):
    seconds: float | None  # exactly one of seconds and bars is set
    bars: int | None
    priority: int = 0
    at_bar: int | None = None  # the bar (1 = first) the stem belongs on; None: where the transport is
    pattern: ClassVar[str] = "/track/<name>/generate"


@dataclass(frozen=True)
class Continue(TrackCommand):
    path: Path
    seconds: float
    priority: int = 0
    pattern: ClassVar[str] = "/track/<name>/continue"


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
class CancelJob(Command):
    job_id: int
    pattern: ClassVar[str] = "/job/<id>/cancel"


@dataclass(frozen=True)
class JobStatus(Command):
    job_id: int
    pattern: ClassVar[str] = "/job/<id>/status"


@dataclass(frozen=True)
class SetTempo(Command):
    bpm: float
    pattern: ClassVar[str] = "/transport/tempo"


@dataclass(frozen=True)
class SetSignature(Command):
    numerator: int
    denominator: int
    pattern: ClassVar[str] = "/transport/signature"


@dataclass(frozen=True)
class Play(Command):
    beat: float | None
    pattern: ClassVar[str] = "/transport/play"


@dataclass(frozen=True)
class Stop(Command):
    beat: float | None
    pattern: ClassVar[str] = "/transport/stop"


@dataclass(frozen=True)
class Locate(Command):
    beat: float
    pattern: ClassVar[str] = "/transport/locate"


@dataclass(frozen=True)
class TransportState(Command):
    pattern: ClassVar[str] = "/transport/state"


@dataclass(frozen=True)
class JamStart(Command):
    track: str
    pattern: ClassVar[str] = "/jam/start"


@dataclass(frozen=True)
class JamStop(Command):
    track: str
    pattern: ClassVar[str] = "/jam/stop"


@dataclass(frozen=True)
class JamStatus(Command):
    track: str
    pattern: ClassVar[str] = "/jam/status"


# ---------------------------------------------------------------- argument checks


def type_tags(args: Sequence[Any]) -> str:
    """OSC-style tags of parsed arguments, for error messages: (1, 'a') -> 'is'."""
    out = []
    for a in args:
        if a is True:
            out.append("T")
        elif a is False:
            out.append("F")
        elif a is None:
            out.append("N")
        elif isinstance(a, int):
            out.append("i")
        elif isinstance(a, float):
            out.append("f")
        elif isinstance(a, str):
            out.append("s")
        elif isinstance(a, (bytes, bytearray)):
            out.append("b")
        else:
            out.append("?")
    return "".join(out)


class _Args:
    """Typed access to one message's arguments; every failure is a bad_args naming the address."""

    def __init__(self, address: str, args: Sequence[Any], expects: str, limits: Limits):
        self.address, self.args, self.expects, self.limits = address, list(args), expects, limits

    def fail(self, what: str, code: str = "bad_args") -> ProtocolError:
        return ProtocolError(code, f"{self.address}: {what}; expected ({self.expects})")

    def count(self, *allowed: int) -> int:
        n = len(self.args)
        if n not in allowed:
            got = f"({type_tags(self.args)})" if n else "no arguments"
            raise self.fail(f"got {got}")
        return n

    def text(self, i: int, what: str, allow_empty: bool = False) -> str:
        v = self.args[i]
        if not isinstance(v, str):
            raise self.fail(f"{what} must be a string (s), got {type_tags([v])}")
        if len(v) > self.limits.max_string:
            raise self.fail(f"{what} is {len(v)} characters, the limit is {self.limits.max_string}", "limit")
        if "\x00" in v or any(ord(c) < 32 and c not in "\t\n" for c in v):
            raise self.fail(f"{what} contains control characters")
        if not allow_empty and not v.strip():
            raise self.fail(f"{what} is empty")
        return v

    def number(self, i: int, what: str, lo: float, hi: float, lo_open: bool = False) -> float:
        v = self.args[i]
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.fail(f"{what} must be a number (f or i), got {type_tags([v])}")
        v = float(v)
        if not math.isfinite(v):
            raise self.fail(f"{what} must be a finite number, got {v}")
        if v < lo or (lo_open and v == lo) or v > hi:
            raise self.fail(f"{what} must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {v:g}")
        return v

    def integer(self, i: int, what: str, lo: int, hi: int) -> int:
        v = self.args[i]
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.fail(f"{what} must be a whole number (i), got {type_tags([v])}")
        if not lo <= v <= hi:
            raise self.fail(f"{what} must be in [{lo}, {hi}], got {v}")
        return v

    def path(self, i: int, what: str, policy: PathPolicy | None, suffixes: Sequence[str]) -> Path:
        text = self.text(i, what)
        if policy is None:
            raise ProtocolError("bad_path", f"{self.address}: this daemon accepts no paths")
        return policy.check(text, suffixes, what=f"{self.address}: {what}")


def _track(name: str, address: str) -> str:
    if not TRACK_RE.match(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise ProtocolError("bad_track", f"{address}: track name {shown!r} must be 1-32 letters, digits, "
                                         "'_' or '-'")
    return name


def _job_id(text: str, address: str) -> int:
    if not text.isdigit() or len(text) > 12 or int(text) < 1:
        raise ProtocolError("bad_address", f"{address}: job id must be a positive whole number, "
                                           f"as in /job/3/cancel")
    return int(text)


def _param(a: _Args, key: str) -> float | int | bool | None:
    if len(a.args) == 1:
        return None
    if key in ("guidance", "temperature"):
        return a.number(1, key, 0.0, 20.0 if key == "guidance" else 10.0, lo_open=True)
    if key == "top_p":
        return a.number(1, key, 0.0, 1.0)
    if key == "top_k":
        return a.integer(1, key, 0, 100_000)
    if key == "seed":
        v = a.integer(1, key, -1, 2**63 - 1)
        return None if v == -1 else v
    v = a.args[1]  # greedy
    if isinstance(v, bool):
        return v
    return bool(a.integer(1, key, 0, 1))


def _at_bar(a: _Args) -> int | None:
    """A trailing (s "at", i bar) names the bar a stem belongs on; it is removed from a.args."""
    if len(a.args) >= 2 and a.args[-2] == "at":
        bar = a.integer(len(a.args) - 1, "bar after \"at\"", 1, 100_000)
        a.args = a.args[:-2]
        return bar
    return None


def _generate(a: _Args, track: str) -> Generate:
    """(f seconds) | (i bars, s "bars") | (f n, s "seconds"), each with an optional trailing i priority,
    then optionally s "at", i bar."""
    at_bar = _at_bar(a)
    n = a.count(1, 2, 3)
    unit = a.args[1] if n >= 2 and isinstance(a.args[1], str) else None
    if unit is not None and unit not in ("bars", "seconds"):
        raise a.fail(f"unit must be \"bars\" or \"seconds\", got {unit[:20]!r}")
    prio_at = 2 if unit is not None else 1
    if n > prio_at + 1:
        raise a.fail(f"got ({type_tags(a.args)})")
    priority = a.integer(prio_at, "priority", 0, MAX_PRIORITY) if n == prio_at + 1 else 0
    if unit == "bars":
        bars = a.integer(0, "bars", 1, 1024)
        return Generate(a.address, track, None, bars, priority, at_bar)
    seconds = a.number(0, "seconds", 0.0, 1e9, lo_open=True)
    if seconds > a.limits.max_seconds:
        raise a.fail(f"{seconds:g} s is over this daemon's limit of {a.limits.max_seconds:g} s per job", "limit")
    return Generate(a.address, track, seconds, None, priority, at_bar)


def _notes(a: _Args, track: str) -> MelodyNotes:
    n = len(a.args)
    if n == 0 or n % 3:
        raise a.fail(f"got {n} arguments, not a whole number of (pitch, start, length) triples")
    if n // 3 > a.limits.max_notes:
        raise a.fail(f"{n // 3} notes, the limit is {a.limits.max_notes}", "limit")
    notes = []
    for k in range(0, n, 3):
        notes.append((a.integer(k, f"note {k // 3 + 1} pitch", 0, 127),
                      a.number(k + 1, f"note {k // 3 + 1} start beat", 0.0, 100_000.0),
                      a.number(k + 2, f"note {k // 3 + 1} length", 0.0, 100_000.0, lo_open=True)))
    return MelodyNotes(a.address, track, tuple(notes))


def _chroma(a: _Args, track: str) -> MelodyChroma:
    a.count(2)
    blob = a.args[0]
    if not isinstance(blob, (bytes, bytearray)):
        raise a.fail(f"chroma must be a blob (b), got {type_tags([blob])}")
    if len(blob) > a.limits.max_blob:
        raise a.fail(f"blob is {len(blob)} bytes, the limit is {a.limits.max_blob}", "limit")
    if len(blob) == 0 or len(blob) % 48:
        raise a.fail(f"blob of {len(blob)} bytes is not whole frames of 12 float32 values (48 bytes)")
    values = struct.unpack(f"<{len(blob) // 4}f", blob)
    if not all(math.isfinite(v) for v in values):
        raise a.fail("chroma contains NaN or inf")
    rate = a.number(1, "frame rate", 0.0, MAX_CHROMA_RATE, lo_open=True)
    return MelodyChroma(a.address, track, bytes(blob), rate)


def _track_command(address: str, name: str, verb: str, args: Sequence[Any], limits: Limits,
                   paths: PathPolicy | None) -> Command:
    track = _track(name, address)

    def A(expects: str) -> _Args:
        return _Args(address, args, expects, limits)

    if verb == "prompt":
        a = A("s text")
        a.count(1)
        return SetPrompt(address, track, a.text(0, "prompt").strip())
    if verb == "preset":
        a = A("s preset name, or \"\" to clear")
        a.count(1)
        v = a.text(0, "preset name", allow_empty=True)
        if v and not PRESET_RE.match(v):
            raise a.fail(f"preset name {v[:40]!r} must be 1-64 letters, digits, '_' or '-'")
        return SetPreset(address, track, v)
    if verb == "param":
        a = A(f"s key ({', '.join(PARAM_KEYS)}), value; or s key alone to reset it")
        a.count(1, 2)
        key = a.text(0, "key")
        if key not in PARAM_KEYS:
            raise a.fail(f"unknown parameter {key[:40]!r}")
        return SetParam(address, track, key, _param(a, key))
    if verb == "melody/midi":
        a = A("s path to a .mid file")
        a.count(1)
        return MelodyMidi(address, track, a.path(0, "MIDI file", paths, MIDI_SUFFIXES))
    if verb == "melody/audio":
        a = A("s path to a .wav/.flac file")
        a.count(1)
        return MelodyAudio(address, track, a.path(0, "audio file", paths, AUDIO_SUFFIXES))
    if verb == "melody/notes":
        return _notes(A("i pitch, f start_beat, f length_beats, ... (one triple per note)"), track)
    if verb == "melody/chroma":
        return _chroma(A("b float32 frames x 12, f frame_rate"), track)
    if verb == "generate":
        return _generate(A("f seconds | i bars, s \"bars\"; optional i priority 0-9; optional s \"at\", i bar"),
                         track)
    if verb == "continue":
        a = A("s path to a .wav/.flac take, f seconds; optional i priority 0-9")
        n = a.count(2, 3)
        path = a.path(0, "take", paths, AUDIO_SUFFIXES)
        seconds = a.number(1, "seconds", 0.0, 1e9, lo_open=True)
        if seconds > limits.max_seconds:
            raise a.fail(f"{seconds:g} s is over this daemon's limit of {limits.max_seconds:g} s per job",
                         "limit")
        prio = a.integer(2, "priority", 0, MAX_PRIORITY) if n == 3 else 0
        return Continue(address, track, path, seconds, prio)
    simple = {"melody/clear": MelodyClear, "clear": ClearTrack, "delete": DeleteTrack, "state": TrackState}
    if verb in simple:
        A("no arguments").count(0)
        return simple[verb](address, track)
    raise ProtocolError("bad_address", f"unknown address {address[:80]!r}; see docs/osc.md")


def parse(address: Any, args: Sequence[Any], *, limits: Limits = Limits(),
          paths: PathPolicy | None = None) -> Command:
    """One OSC message -> its frozen command; ProtocolError with a stable code otherwise."""
    if not isinstance(address, str) or not address.startswith("/") or len(address) > 256:
        raise ProtocolError("bad_address", "address must be text starting with '/', at most 256 characters")
    parts = address.split("/")[1:]

    def A(expects: str) -> _Args:
        return _Args(address, args, expects, limits)

    if address in ("/ping", "/status", "/tracks"):
        A("no arguments").count(0)
        return {"/ping": Ping, "/status": Status, "/tracks": ListTracks}[address](address)
    if parts[0] == "track" and len(parts) >= 3:
        return _track_command(address, parts[1], "/".join(parts[2:]), args, limits, paths)
    if parts[0] == "job" and len(parts) == 3 and parts[2] in ("cancel", "status"):
        job = _job_id(parts[1], address)
        A("no arguments").count(0)
        return (CancelJob if parts[2] == "cancel" else JobStatus)(address, job)
    if address == "/transport/tempo":
        a = A(f"f bpm in [{MIN_BPM:g}, {MAX_BPM:g}]")
        a.count(1)
        return SetTempo(address, a.number(0, "tempo", MIN_BPM, MAX_BPM))
    if address == "/transport/signature":
        a = A("i numerator 1-32, i denominator 1/2/4/8/16/32")
        a.count(2)
        num = a.integer(0, "numerator", 1, 32)
        den = a.integer(1, "denominator", 1, 32)
        if den not in (1, 2, 4, 8, 16, 32):
            raise a.fail(f"denominator must be 1, 2, 4, 8, 16 or 32, got {den}")
        return SetSignature(address, num, den)
    if address in ("/transport/play", "/transport/stop"):
        a = A("optional f beat position")
        beat = a.number(0, "beat", 0.0, 1e7) if a.count(0, 1) else None
        return (Play if address.endswith("play") else Stop)(address, beat)
    if address == "/transport/state":
        A("no arguments").count(0)
        return TransportState(address)
    if address == "/transport/locate":
        a = A("f beat position")
        a.count(1)
        return Locate(address, a.number(0, "beat", 0.0, 1e7))
    if address in ("/jam/start", "/jam/stop", "/jam/status"):
        a = A("s track")
        a.count(1)
        track = _track(a.text(0, "track"), address)
        return {"/jam/start": JamStart, "/jam/stop": JamStop, "/jam/status": JamStatus}[address](address, track)
    raise ProtocolError("bad_address", f"unknown address {address[:80]!r}; see docs/osc.md")
