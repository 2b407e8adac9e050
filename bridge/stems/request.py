"""From a stem's request record to the engine's GenerationRequest: melody chroma and take loaded here.

A request record (bridge.stems.plan.StemPlan.request) is plain JSON, written into every stem's
sidecar, so it must hold everything the engine call depends on. Its melody is one of

    {"kind": "file", "source": path, "sha256": ..., "track": MIDI track or None}   .mid/.wav/.npy
    {"kind": "notes", "notes": [[pitch, start_beat, length_beats], ...], "tempo": bpm}
    {"kind": "chroma", "data": base64 float32 frames x 12, "frame_rate": fps, "frames", "sha256"}

and its continuation {"path": take, "seconds": s, "sha256": ...}. Files are hashed the first
time they are read and checked on every later read, so a regenerated stem never silently
follows a changed file. (Sidecars written before "kind" existed hold a file melody.)
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from bridge.state.session_check import chroma_from_text
from model.types import GenerationRequest, SamplingParams, melody_refusal
from audiofile import read_audio, resample
import model.conditioning.melody as mm


class StemRequestError(ValueError):
    """A request record that cannot become an engine request: changed or missing file, bad melody."""


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def session_melody_record(melody: dict[str, Any] | None, tempo: float) -> dict[str, Any] | None:
    """A live session's melody ({"kind": "midi"|"audio"|"notes"|"chroma", ...}) as a request record."""
    if melody is None:
        return None
    kind = melody["kind"]
    if kind in ("midi", "audio"):
        return {"kind": "file", "source": str(melody["path"]), "track": None}  # hashed when first read
    if kind == "notes":
        return {"kind": "notes", "notes": [list(n) for n in melody["notes"]], "tempo": float(tempo)}
    data = chroma_from_text(melody["data"])
    return {"kind": "chroma", "data": melody["data"], "frame_rate": float(melody["frame_rate"]),
            "frames": len(data) // 48, "sha256": hashlib.sha256(data).hexdigest()}


def _checked_file(rec: dict[str, Any], key: str, what: str, where: str, pinned: Path | None = None) -> Path:
    """The file a record names; its sha256 recorded on first use and checked on every later one.

    pinned: a name for the already opened and checked file (bridge.osc.input_files), read instead of rec[key].
    """
    p = pinned or Path(rec[key])
    if not p.is_file():
        raise FileNotFoundError(f"{where}: {what} {p} does not exist")
    sha = file_sha256(p)
    if rec.get("sha256") is None:
        rec["sha256"] = sha
    elif rec["sha256"] != sha:
        raise StemRequestError(f"{where}: {what} {p} has changed since it was recorded (sha256 differs); "
                               "the stem cannot be reproduced from it")
    return p


def melody_chroma(rec: dict[str, Any], rate: float, seconds: float | None, where: str, inputs=None) -> np.ndarray:
    """The (frames, 12) chroma of a melody record at the model's chroma rate, `seconds` long
    (None: as long as the melody is)."""

    kind = rec.get("kind", "file")
    try:
        if kind == "chroma":
            data = chroma_from_text(rec["data"])
            if rec.get("sha256") and hashlib.sha256(data).hexdigest() != rec["sha256"]:
                raise StemRequestError(f"{where}: the melody chroma does not match its sha256")
            src = np.frombuffer(data, dtype="<f4").reshape(-1, 12)
            fr = float(rec["frame_rate"])
            return resample_chroma(src, fr, rate, len(src) / fr if seconds is None else seconds)
        if kind == "notes":
            notes = mm.beats_to_seconds(rec["notes"], float(rec["tempo"]))
            return np.asarray(mm.notes_to_chroma(notes, rate, seconds), dtype=np.float32)
        if kind == "file" and inputs is not None:  # opened, checked and limited by bridge.osc.input_files first
            with inputs.melody_file(rec["source"]) as pinned:
                src = _checked_file(rec, "source", "melody file", where, pinned)
                return np.asarray(mm.load_melody(str(src), rate, seconds=seconds, track=rec.get("track")),
                                  dtype=np.float32)
        if kind == "file":
            src = _checked_file(rec, "source", "melody file", where)
            return np.asarray(mm.load_melody(str(src), rate, seconds=seconds, track=rec.get("track")),
                              dtype=np.float32)
    except (ValueError, OSError) as e:
        if isinstance(e, (StemRequestError, FileNotFoundError)):
            raise
        raise StemRequestError(f"{where}: key 'melody': {e}") from None  # MelodyError is a ValueError
    raise StemRequestError(f"{where}: unknown melody kind {kind!r}")


def resample_chroma(src: np.ndarray, src_rate: float, rate: float, seconds: float) -> np.ndarray:
    """Nearest-frame resampling of a chroma onto the model's frame grid; past its end: silence (zeros)."""
    n = max(1, int(round(seconds * rate)))
    idx = np.floor(np.arange(n) * src_rate / rate + 1e-9).astype(np.int64)
    out = np.zeros((n, 12), dtype=np.float32)
    ok = idx < len(src)
    out[ok] = src[idx[ok]]
    return out


def load_take(rec: dict[str, Any], engine, where: str, inputs=None,
              cancel: threading.Event | None = None) -> np.ndarray:
    """A continuation's take at the model's rate and channel count.

    inputs (bridge.osc.input_files.Inputs): the take is opened and checked where it is read (a name
    swapped for a link after the message was accepted is bad_path), limited, and read a second
    at a time so `cancel` stops it.
    """

    if inputs is not None:
        with inputs.pinned(rec["path"], "take") as pinned:
            take, rate = inputs.read_take(_checked_file(rec, "path", "take", where, pinned), cancel)
    else:
        take, rate = read_audio(_checked_file(rec, "path", "take", where))
    audio = resample(take, rate, engine.sample_rate) if rate != engine.sample_rate else take
    return fit_channels(audio, engine.channels)


def fit_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    if audio.shape[0] == channels:
        return audio
    mono = audio.mean(axis=0, keepdims=True)
    return np.repeat(mono, channels, axis=0).astype(np.float32)


def build_request(rec: dict[str, Any], engine, where: str,
                  cancel: threading.Event | None = None, inputs=None) -> GenerationRequest:
    """The GenerationRequest of a request record (the one request builder for every stem).

    inputs: the daemon's bridge.osc.input_files.Inputs (files named over OSC are checked where opened).
    """
    melody = None
    if rec.get("melody"):
        refusal = melody_refusal(engine)
        if refusal:
            raise StemRequestError(f"{where}: follows a melody, but {refusal}")
        melody = melody_chroma(rec["melody"], engine.chroma_frame_rate, float(rec["seconds"]), where, inputs)
    audio_prompt = load_take(rec["continuation"], engine, where, inputs, cancel) if rec.get("continuation") else None
    return GenerationRequest(prompt=rec["prompt"], seconds=float(rec["seconds"]),
                             params=SamplingParams.from_dict(rec["params"]), melody=melody,
                             audio_prompt=audio_prompt, cancel=cancel or threading.Event())
