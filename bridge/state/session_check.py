"""Range checks of a session.json read from disk, field by field, before anything uses it.

The file is ours, but a crash, a hand edit or another program can leave anything in it, and
its values flow into jobs (a `next_job_id` of 1e30 once made every generate fail with a
traceback). Every value goes through the very check function the OSC command that sets it
goes through (bridge.state.rules), so whatever the daemon accepts over the wire it saves and loads
again, and nothing else loads. The first problem is a ValueError naming the key, the value and
what is expected.

Bounds of their own here are sizes of what a file may hold, not rules of a value: text and
lists a hand edit could make huge are capped so loading stays cheap.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from bridge.state import rules as R


def chroma_to_text(data: bytes) -> str:
    """A chroma's float32 bytes as session.json stores them (base64)."""
    return base64.b64encode(data).decode("ascii")


def chroma_from_text(text: str) -> bytes:
    """session.json's chroma text back to its bytes; ValueError where it is not base64."""
    return base64.b64decode(text.encode("ascii"), validate=True)

MAX_TEXT = 4096  # characters of a prompt or path in the file
MAX_FILE_NOTES = 100_000  # notes of a melody in the file
MAX_CHROMA_TEXT = 10_000_000  # base64 characters of a chroma in the file
MELODY_KINDS = ("midi", "audio", "notes", "chroma")


def _checked(check: Callable[..., Any], *args: Any) -> Any:
    """A bridge.state.rules check; its RuleError becomes the plain ValueError the loader reports."""
    try:
        return check(*args)
    except R.RuleError as e:
        raise ValueError(e.message) from None


def _text(v: Any, where: str, limit: int = MAX_TEXT, allow_empty: bool = True) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(f"{where} must be text of at most {limit} characters")
    return _checked(R.text, v, where, allow_empty)


def _path(v: Any, where: str) -> None:
    """A path as the daemon stored it; whether it still leads into an allowed folder is checked when it is used."""
    if not isinstance(v, str) or not v or "\x00" in v or len(v) > MAX_TEXT:
        raise ValueError(f"{where} must be a path of at most {MAX_TEXT} characters")


def check_session_data(data: Any) -> None:
    """ValueError naming the first field of a parsed session.json that is missing, mistyped or out of range."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    check_transport(data.get("transport"))
    if "next_job_id" in data:
        _checked(R.job_id, data["next_job_id"], "next_job_id")
    tracks = data.get("tracks")
    if not isinstance(tracks, dict):
        raise ValueError("tracks must be an object")
    for name, tr in tracks.items():
        check_track(name, tr)


def check_transport(t: Any) -> None:
    """The file's "transport" object (bridge.state.session.Transport as JSON)."""
    if not isinstance(t, dict):
        raise ValueError("transport must be an object")
    _checked(R.tempo, t.get("tempo"), "transport.tempo")
    _checked(R.signature, t.get("numerator"), t.get("denominator"), "transport")
    if not isinstance(t.get("playing"), bool):
        raise ValueError("transport.playing must be true or false")
    _checked(R.beat_position, t.get("position"), "transport.position")


def check_track(name: Any, tr: Any) -> None:
    """One entry of the file's "tracks" object (bridge.state.session.TrackSettings as JSON)."""
    _checked(R.track_name, name, "tracks: track name")
    where = f"tracks.{name}"
    if not isinstance(tr, dict):
        raise ValueError(f"{where} must be an object")
    _text(tr.get("prompt", ""), f"{where}.prompt")
    _checked(R.preset_name, tr.get("preset", ""), f"{where}.preset")
    _check_params(tr.get("params") or {}, f"{where}.params")
    if tr.get("melody") is not None:
        _check_melody(tr["melody"], f"{where}.melody")
    c = tr.get("continuation")
    if c is not None:
        if not isinstance(c, dict):
            raise ValueError(f"{where}.continuation must be an object or null")
        _path(c.get("path"), f"{where}.continuation.path")
        _checked(R.seconds, c.get("seconds"), f"{where}.continuation.seconds")
    k = tr.get("kept")
    if k is not None:
        if not isinstance(k, dict):
            raise ValueError(f"{where}.kept must be an object or null")
        _checked(R.job_id, k.get("job"), f"{where}.kept.job")  # the rule /track/<name>/keep's job id meets
        _path(k.get("path"), f"{where}.kept.path")


def _check_params(params: Any, where: str) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be an object")
    for k, v in params.items():
        if k not in R.PARAM_KEYS:
            raise ValueError(f"{where}: unknown parameter {k!r:.40}; expected one of {', '.join(R.PARAM_KEYS)}")
        if v is None:
            raise ValueError(f"{where}.{k} must have a value (a reset parameter is left out of the file)")
        _checked(R.param, k, v, f"{where}.{k}")


def _check_melody(m: Any, where: str) -> None:
    if not isinstance(m, dict) or m.get("kind") not in MELODY_KINDS:
        raise ValueError(f"{where} must be an object with kind one of {', '.join(MELODY_KINDS)}")
    kind = m["kind"]
    if kind in ("midi", "audio"):
        _path(m.get("path"), f"{where}.path")
    elif kind == "notes":
        notes = m.get("notes")
        if not isinstance(notes, list) or not 0 < len(notes) <= MAX_FILE_NOTES:
            raise ValueError(f"{where}.notes must be a list of 1-{MAX_FILE_NOTES} notes")
        for i, n in enumerate(notes):
            if not isinstance(n, list) or len(n) != 3:
                raise ValueError(f"{where}.notes[{i}] must be [pitch, start, length]")
            _checked(R.note, i + 1, *n, f"{where}.notes: note")
    else:
        text = _text(m.get("data"), f"{where}.data", MAX_CHROMA_TEXT)
        try:
            blob = chroma_from_text(text)
        except ValueError:
            raise ValueError(f"{where}.data must be base64 text") from None
        _checked(R.chroma, blob, f"{where}.data")
        _checked(R.chroma_rate, m.get("frame_rate"), f"{where}.frame_rate")
