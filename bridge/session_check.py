"""Range checks of a session.json read from disk, field by field, before anything uses it.

The file is ours, but a crash, a hand edit or another program can leave anything in it, and
its values flow into jobs (a `next_job_id` of 1e30 once made every generate fail with a
traceback). Every field is checked here against the same bounds an OSC message must meet;
the first problem is a ValueError naming the field, the value and what is expected.
"""

from __future__ import annotations

import math
from typing import Any

from bridge.protocol import MAX_CHROMA_RATE, PARAM_KEYS, PRESET_RE, TRACK_RE

MAX_JOB_ID = 2**53 - 1  # exact in JSON numbers and doubles
MAX_BEAT = 1e7
MAX_TEXT = 4096
MELODY_KINDS = ("midi", "audio", "notes", "chroma")


def _number(v: Any, where: str, lo: float, hi: float) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise ValueError(f"{where} must be a number in [{lo:g}, {hi:g}], got {v!r:.60}")


def _integer(v: Any, where: str, lo: int, hi: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{where} must be a whole number in [{lo}, {hi}], got {v!r:.60}")


def _text(v: Any, where: str, limit: int = MAX_TEXT) -> None:
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(f"{where} must be text of at most {limit} characters")


def check_session_data(data: Any) -> None:
    """ValueError naming the first field of a parsed session.json that is missing, mistyped or out of range."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    t = data.get("transport")
    if not isinstance(t, dict):
        raise ValueError("transport must be an object")
    _number(t.get("tempo"), "transport.tempo", 20.0, 400.0)
    _integer(t.get("numerator"), "transport.numerator", 1, 32)
    if t.get("denominator") not in (1, 2, 4, 8, 16, 32) or isinstance(t.get("denominator"), bool):
        raise ValueError(f"transport.denominator must be 1, 2, 4, 8, 16 or 32, got {t.get('denominator')!r:.60}")
    if not isinstance(t.get("playing"), bool):
        raise ValueError("transport.playing must be true or false")
    _number(t.get("position"), "transport.position", 0.0, MAX_BEAT)
    if "next_job_id" in data:
        _integer(data["next_job_id"], "next_job_id", 1, MAX_JOB_ID)
    tracks = data.get("tracks")
    if not isinstance(tracks, dict):
        raise ValueError("tracks must be an object")
    for name, tr in tracks.items():
        where = f"track {name[:40]!r}"
        if not isinstance(name, str) or not TRACK_RE.match(name):
            raise ValueError(f"{where}: bad track name")
        if not isinstance(tr, dict):
            raise ValueError(f"{where} must be an object")
        _text(tr.get("prompt", ""), f"{where}.prompt")
        preset = tr.get("preset", "")
        if not isinstance(preset, str) or (preset and not PRESET_RE.match(preset)):
            raise ValueError(f"{where}.preset must be a preset name or \"\"")
        _check_params(tr.get("params") or {}, f"{where}.params")
        if tr.get("melody") is not None:
            _check_melody(tr["melody"], f"{where}.melody")
        c = tr.get("continuation")
        if c is not None:
            if not isinstance(c, dict):
                raise ValueError(f"{where}.continuation must be an object or null")
            _text(c.get("path"), f"{where}.continuation.path")
            _number(c.get("seconds"), f"{where}.continuation.seconds", 0.0, 1e6)


def _check_params(params: Any, where: str) -> None:
    if not isinstance(params, dict):
        raise ValueError(f"{where} must be an object")
    for k, v in params.items():
        if k not in PARAM_KEYS:
            raise ValueError(f"{where}: unknown parameter {k!r:.40}")
        w = f"{where}.{k}"
        if k in ("guidance", "temperature"):
            _number(v, w, 0.0, 20.0)
        elif k == "top_p":
            _number(v, w, 0.0, 1.0)
        elif k == "top_k":
            _integer(v, w, 0, 100_000)
        elif k == "seed":
            _integer(v, w, 0, 2**63 - 1)
        elif not isinstance(v, bool):
            raise ValueError(f"{w} must be true or false")


def _check_melody(m: Any, where: str) -> None:
    if not isinstance(m, dict) or m.get("kind") not in MELODY_KINDS:
        raise ValueError(f"{where} must be an object with kind one of {', '.join(MELODY_KINDS)}")
    kind = m["kind"]
    if kind in ("midi", "audio"):
        _text(m.get("path"), f"{where}.path")
    elif kind == "notes":
        notes = m.get("notes")
        if not isinstance(notes, list) or not 0 < len(notes) <= 100_000:
            raise ValueError(f"{where}.notes must be a non-empty list")
        for i, n in enumerate(notes):
            if not isinstance(n, list) or len(n) != 3:
                raise ValueError(f"{where}.notes[{i}] must be [pitch, start, length]")
            _integer(n[0], f"{where}.notes[{i}] pitch", 0, 127)
            _number(n[1], f"{where}.notes[{i}] start", 0.0, 100_000.0)
            _number(n[2], f"{where}.notes[{i}] length", 0.0, 100_000.0)
    else:
        _text(m.get("data"), f"{where}.data", 10_000_000)
        _number(m.get("frame_rate"), f"{where}.frame_rate", 1e-9, MAX_CHROMA_RATE)
