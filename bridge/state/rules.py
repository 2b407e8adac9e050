"""The rules a value meets to enter the live session, whichever way it comes in.

Two parsers fill the daemon's session: bridge.osc.protocol (OSC messages) and bridge.state.session_check
(session.json read back at start). Both call the check functions here, so whatever the daemon
accepts over the wire it saves, and whatever it saves it loads: no number has a second copy to
drift from the first. The rules have a module of their own rather than living in bridge.osc.protocol
because they belong to the session, not to the wire: bridge.osc.protocol adds only what a message
has and a file has not (an address, argument counts, the daemon's configurable Limits, paths
checked against the allowed folders) and turns a RuleError into a ProtocolError naming the
address; bridge.state.session_check turns it into a ValueError naming the JSON key.

Ranges that belong to a lower layer are imported, never restated: sampling parameters from
model.types (the engine refuses anything else too), tempo and time signature from
plugin_host.tempo (which cannot import bridge, and whose bar arithmetic needs them).

Names and numbers in text are matched with re.fullmatch over ASCII-only classes: `^...$` lets a
trailing newline through, and str.isdigit or `\\d` accept digits such as "²" or "٣" that int()
refuses or reads as something the sender did not type.
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Any

from model.types import MAX_REQUEST_SECONDS, MAX_VARIATIONS, SAMPLING_KEYS, SAMPLING_RANGES, Range
from plugin_host.tempo import DENOMINATORS, MAX_BPM, MAX_NUMERATOR, MIN_BPM, TempoError, TimeSignature
from presets import MAX_NAME as MAX_PRESET_NAME
from presets import NAME_RE as _PRESET_NAME

NAME_CHARS = "A-Za-z0-9_-"  # track names: ASCII letters, digits, '_', '-' (preset names: presets.NAME_RE)
MAX_TRACK_NAME = 32
MAX_JOB_ID_DIGITS = 12
MAX_JOB_ID = 10**MAX_JOB_ID_DIGITS - 1  # the largest id a /job/<id>/... address can name
MAX_PRIORITY = 9
MAX_BARS = 1024
MAX_NOTE_BEAT = 100_000.0  # note starts and lengths, in beats
MAX_BEAT_POSITION = 1e7  # transport positions, in quarter notes: what a session holds
MAX_BAR_POSITION = 100_000  # `generate ... at BAR`: the bar a stem belongs on
CHROMA_RATE = Range(0.0, 1000.0, lo_open=True)  # frames a second of a precomputed chroma
CHROMA_FRAME_BYTES = 48  # 12 little-endian float32 values
TEMPO = Range(MIN_BPM, MAX_BPM)
PARAM_KEYS = SAMPLING_KEYS + ("variations",)  # variations: takes per generate, not a sampling param

_TRACK_NAME = re.compile(f"[{NAME_CHARS}]{{1,{MAX_TRACK_NAME}}}")
_JOB_ID = re.compile(f"[0-9]{{1,{MAX_JOB_ID_DIGITS}}}")


ERROR_CODES = (
    "bad_packet",   # not an OSC packet at all
    "bad_address",  # no such address
    "bad_track",    # track name outside [A-Za-z0-9_-]{1,32}, matched whole, ASCII only (bridge.state.rules)
    "bad_args",     # wrong count, type or value of arguments
    "bad_path",     # a path outside the stems folder and every --allow-dir
    "not_found",    # a file, preset, track or job that does not exist
    "limit",        # over a size limit: string, blob, notes, seconds, tracks
    "busy",         # the job queue is full, or the daemon is shutting down
    "model",        # the loaded model cannot do it (e.g. melody on a text-only model)
    "unavailable",  # a feature this daemon was started without (live audio)
    "failed",       # a job that failed while running; the message says why
    "internal",     # a bug: the daemon carried on; tracebacks are logged at most one per 10 s
    "forbidden",    # not this sender's to ask: another host's job, or /hello with the key first
)


class ProtocolError(Exception):
    """A message the daemon refuses; `code` is one of ERROR_CODES, the message says what is expected."""

    def __init__(self, code: str, message: str, job_id: int = 0):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id


class RuleError(ValueError):
    """A value outside its rule; `code` is the protocol's error code for it (bad_args, limit, bad_track)."""

    def __init__(self, message: str, code: str = "bad_args"):
        super().__init__(message)
        self.message, self.code = message, code


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


def _shown(v: Any) -> str:
    """A value for an error message, cut short: a hostile string must not make a long log line."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------- plain values


def number(v: Any, what: str, r: Range, over: str = "bad_args") -> float:
    """A finite number in `r`; `over` is the error code above its top."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RuleError(f"{what} must be a number (f or i), got {type_tags([v]) or _shown(v)}")
    v = float(v)
    if not math.isfinite(v):
        raise RuleError(f"{what} must be a finite number, got {v}")
    if v not in r:
        raise RuleError(f"{what} must be in {r}, got {v:g}", over if v > r.hi else "bad_args")
    return v


def integer(v: Any, what: str, lo: int, hi: int) -> int:
    """A whole number in [lo, hi]; a whole float (60.0) is taken as one."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RuleError(f"{what} must be a whole number (i), got {type_tags([v]) or _shown(v)}")
    if not lo <= v <= hi:
        raise RuleError(f"{what} must be a whole number in [{lo}, {hi}], got {v}")
    return v


def text(v: Any, what: str, allow_empty: bool = False) -> str:
    """Text without control characters other than tab and newline."""
    if not isinstance(v, str):
        raise RuleError(f"{what} must be a string (s), got {type_tags([v]) or _shown(v)}")
    if any(ord(c) < 32 and c not in "\t\n" or c == "\x7f" for c in v):
        raise RuleError(f"{what} contains control characters")
    if not allow_empty and not v.strip():
        raise RuleError(f"{what} is empty")
    return v


# ---------------------------------------------------------------- names


def is_name(v: Any, longest: int = MAX_TRACK_NAME) -> bool:
    """Whether `v` is a name of 1-`longest` ASCII letters, digits, '_' or '-' (the whole string)."""
    if not isinstance(v, str):
        return False
    pattern = _TRACK_NAME if longest == MAX_TRACK_NAME else _PRESET_NAME if longest == MAX_PRESET_NAME \
        else re.compile(f"[{NAME_CHARS}]{{1,{int(longest)}}}")
    return pattern.fullmatch(v) is not None


def track_name(v: Any, what: str = "track name") -> str:
    if not is_name(v, MAX_TRACK_NAME):
        raise RuleError(f"{what} {_shown(v)} must be 1-{MAX_TRACK_NAME} letters, digits, '_' or '-'", "bad_track")
    return v


def preset_name(v: Any, what: str = "preset name") -> str:
    """A preset name, or "" for none."""
    text(v, what, allow_empty=True)
    if v and not is_name(v, MAX_PRESET_NAME):
        raise RuleError(f"{what} {_shown(v)} must be 1-{MAX_PRESET_NAME} letters, digits, '_' or '-'")
    return v


def job_id_in(segment: str) -> int:
    """The job id an address segment names ("3" in /job/3/cancel), or 0 when it names none."""
    return int(segment) if _JOB_ID.fullmatch(segment) else 0


def job_id(v: Any, what: str = "job id") -> int:
    return integer(v, what, 1, MAX_JOB_ID)


# ---------------------------------------------------------------- session values


def param(key: str, v: Any, what: str | None = None) -> float | int | bool | None:
    """One track parameter (PARAM_KEYS), in its range (model.types.SAMPLING_RANGES); None resets it."""
    what = what or key
    if key not in PARAM_KEYS:
        raise RuleError(f"unknown parameter {_shown(key)}; expected one of {', '.join(PARAM_KEYS)}")
    if v is None:
        return None
    if key == "greedy":
        return v if isinstance(v, bool) else bool(integer(v, what, 0, 1))
    if key == "variations":
        return integer(v, what, 1, MAX_VARIATIONS)
    r = SAMPLING_RANGES[key]
    if key in ("top_k", "seed"):
        return integer(v, what, int(r.lo), int(r.hi))
    return number(v, what, r)


def seconds(v: Any, what: str = "seconds") -> float:
    """A length of music: positive, at most what one engine request makes (model.types)."""
    return number(v, what, Range(0.0, MAX_REQUEST_SECONDS, lo_open=True), over="limit")


def beat_position(v: Any, what: str = "beat") -> float:
    """A transport position in quarter notes, as far as a session holds one."""
    return number(v, what, Range(0.0, MAX_BEAT_POSITION))


def tempo(v: Any, what: str = "tempo") -> float:
    return number(v, what, TEMPO)


def signature(numerator: Any, denominator: Any, what: str = "") -> tuple[int, int]:
    """(numerator, denominator) of a time signature plugin_host.tempo can count bars in."""
    prefix = f"{what}." if what else ""
    num = integer(numerator, f"{prefix}numerator", 1, MAX_NUMERATOR)
    den = integer(denominator, f"{prefix}denominator", 1, max(DENOMINATORS))
    try:
        TimeSignature(num, den)
    except TempoError as e:
        raise RuleError(f"{prefix}denominator: {e}") from None
    return num, den


def note(k: int, pitch: Any, start: Any, length: Any, what: str = "note") -> tuple[int, float, float]:
    """Note k (from 1) of a melody: MIDI pitch, start and length in beats."""
    return (integer(pitch, f"{what} {k} pitch", 0, 127),
            number(start, f"{what} {k} start beat", Range(0.0, MAX_NOTE_BEAT)),
            number(length, f"{what} {k} length", Range(0.0, MAX_NOTE_BEAT, lo_open=True)))


def chroma(blob: Any, what: str = "chroma") -> bytes:
    """A precomputed chroma: whole frames of 12 finite little-endian float32 values."""
    if not isinstance(blob, (bytes, bytearray)):
        raise RuleError(f"{what} must be a blob (b), got {type_tags([blob]) or _shown(blob)}")
    if len(blob) == 0 or len(blob) % CHROMA_FRAME_BYTES:
        raise RuleError(f"{what}: {len(blob)} bytes is not whole frames of 12 float32 values "
                        f"({CHROMA_FRAME_BYTES} bytes)")
    values = struct.unpack(f"<{len(blob) // 4}f", blob)
    if not all(math.isfinite(v) for v in values):
        raise RuleError(f"{what} contains NaN or inf")
    return bytes(blob)


def chroma_rate(v: Any, what: str = "frame rate") -> float:
    return number(v, what, CHROMA_RATE)
