"""Stems to disk: chain, resample, 24-bit WAV/FLAC with a sidecar JSON, atomically, never overwriting.

Audio and sidecar are written completely to hidden temporary files in the target folder and only
then linked into place under the first free numbered name (name.wav, name-2.wav, ...), so a kill
at any moment leaves nothing partial under a final name, and an existing stem is never replaced.
WAV stems carry a Broadcast Wave `bext` time reference (the start sample at the stem's rate) so a
DAW drops them at the right place on its timeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pedalboard.io import AudioFile

from audiofile import AudioFileError, finalize, resample
from plugin_host.bwf import add_bext
from plugin_host.chain import process_chunks

FORMATS = ("wav", "flac")
BIT_DEPTH = 24
SIDECAR_VERSION = 1
BASENAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")  # matched whole: fullmatch
MAX_NUMBER = 10_000


class StemError(AudioFileError):
    """A stem that cannot be written as asked; the message names the folder, file or field."""


def stem_names(out_dir: Path, basename: str, fmt: str, number: int) -> tuple[Path, Path]:
    """(audio path, sidecar path) for the n-th stem of a name: name.wav, then name-2.wav, ..."""
    stem = basename if number == 1 else f"{basename}-{number}"
    return out_dir / f"{stem}.{fmt}", out_dir / f"{stem}.json"


def sidecar_path(stem_path: str | os.PathLike) -> Path:
    """The sidecar JSON beside a stem file."""
    return Path(stem_path).with_suffix(".json")


def audio_sha256(audio: np.ndarray) -> str:
    """Hash of float32 (channels, samples) audio: what a regeneration must reproduce bit for bit."""
    a = np.ascontiguousarray(audio, dtype="<f4")
    h = hashlib.sha256(f"{a.shape[0]}x{a.shape[1]}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The output folder, or StemError saying why stems cannot be written there."""
    d = Path(out_dir).expanduser()
    if not d.exists():
        raise StemError(f"output folder {d} does not exist")
    if not d.is_dir():
        raise StemError(f"output folder {d} is not a folder")
    try:  # a real probe: access() says yes to root even on read-only or special folders
        fd, probe = tempfile.mkstemp(prefix=".musicbridge-probe.", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise StemError(f"output folder {d} is not writable ({e.strerror or e})") from None
    return d


def write_stem(
    audio: np.ndarray,
    sample_rate: int,
    out_dir: str | os.PathLike,
    basename: str,
    sidecar: Mapping[str, Any],
    *,
    target_rate: int = 48000,
    fmt: str = "wav",
    start_seconds: float = 0.0,
    chain=None,
    samples: int | None = None,
    block: int = 8192,
) -> Path:
    """Write one stem and its sidecar; return the stem's path.

    audio: float32 (channels, samples) at `sample_rate` (the model's rate), before effects.
    sidecar: what is needed to regenerate it (model, prompt, preset, params, seed, melody, tempo,
        ...); it must be JSON-serialisable. A "file" entry describing the written audio is added.
    chain: a pedalboard.Pedalboard applied block by block at `sample_rate` before resampling.
    samples: the exact length at `target_rate` (a stem asked in bars); by default the resampled
        length, round(n * target_rate / sample_rate).
    """
    a = _check_audio(audio)
    if fmt not in FORMATS:
        raise StemError(f"stem format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(basename, str) or not BASENAME_RE.fullmatch(basename):
        raise StemError(f"stem name {basename!r} must be 1-100 letters, digits, '_', '-' or '.' "
                        "and not start with '.' or '-'")
    for name, rate in (("sample_rate", sample_rate), ("target_rate", target_rate)):
        if not isinstance(rate, (int, np.integer)) or not 1000 <= rate <= 384000:
            raise StemError(f"{name} must be a whole number of Hz in [1000, 384000], got {rate!r}")
    if isinstance(start_seconds, bool) or not isinstance(start_seconds, (int, float, np.floating)) \
            or not (np.isfinite(start_seconds) and start_seconds >= 0):
        raise StemError(f"start_seconds must be a number >= 0, got {start_seconds!r}")
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, (int, np.integer))
                                or samples <= 0):
        raise StemError(f"samples must be a positive whole number, got {samples!r}")
    d = check_out_dir(out_dir)
    if not isinstance(sidecar, Mapping):
        raise StemError(f"sidecar must be a mapping, got {type(sidecar).__name__}")

    if chain is not None:
        processed = process_chunks(chain, a, int(sample_rate), block)
    else:
        processed = a
    out = resample(processed, int(sample_rate), int(target_rate))
    if samples is not None:
        out = _exact(out, int(samples))
    time_reference = int(round(start_seconds * target_rate))
    meta = dict(sidecar)
    meta["file"] = {
        "format": fmt, "bit_depth": BIT_DEPTH, "sample_rate": int(target_rate),
        "channels": int(out.shape[0]), "samples": int(out.shape[1]),
        "seconds": out.shape[1] / target_rate, "start_seconds": float(start_seconds),
        "time_reference": time_reference, "source_sample_rate": int(sample_rate),
        "source_samples": int(a.shape[1]), "source_sha256": audio_sha256(a),
        "peak": round(float(np.abs(out).max()), 6),  # above 1.0 the PCM file is clipped
    }
    meta.setdefault("sidecar_version", SIDECAR_VERSION)
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StemError(f"sidecar for {basename} is not plain JSON data ({e})") from None

    temps: list[str] = []
    try:
        audio_tmp = _write_audio_tmp(d, basename, fmt, out, int(target_rate), time_reference,
                                     meta, temps)
        json_tmp = _tmp(d, basename, ".json", temps)
        return _place(d, basename, fmt, audio_tmp, json_tmp, meta)
    except OSError as e:
        raise StemError(f"cannot write stem {basename} in {d}: {e.strerror or e}") from None
    finally:
        for t in temps:
            Path(t).unlink(missing_ok=True)


def _check_audio(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0 or not 1 <= a.shape[0] <= 8:
        raise StemError(f"stem audio must be (channels, samples) with 1-8 channels and at least one "
                        f"sample, got shape {a.shape}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise StemError("stem audio contains NaN or infinite samples")
    return a


def _exact(audio: np.ndarray, n: int) -> np.ndarray:
    if audio.shape[1] >= n:
        return np.ascontiguousarray(audio[:, :n])
    return np.pad(audio, ((0, 0), (0, n - audio.shape[1])))


def _tmp(d: Path, basename: str, suffix: str, temps: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{basename}.", suffix=".part" + suffix, dir=d)
    os.close(fd)
    temps.append(path)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


def _write_audio_tmp(d: Path, basename: str, fmt: str, audio: np.ndarray, rate: int,
                     time_reference: int, meta: Mapping[str, Any], temps: list[str]) -> str:

    raw = _tmp(d, basename, "." + fmt, temps)
    with AudioFile(raw, "w", samplerate=rate, num_channels=audio.shape[0], bit_depth=BIT_DEPTH) as f:
        f.write(audio)
    if fmt != "wav":
        return raw

    final = _tmp(d, basename, ".wav", temps)
    prompt = meta.get("prompt")
    add_bext(raw, final, time_reference,
             description=prompt if isinstance(prompt, str) else basename,
             originator_reference=str(meta.get("seed", "")),
             coding_history=f"A=PCM,F={rate},W={BIT_DEPTH},M={'mono' if audio.shape[0] == 1 else 'stereo'},T=musicbridge")
    Path(raw).unlink()
    return final


def _place(d: Path, basename: str, fmt: str, audio_tmp: str, json_tmp: str,
           meta: dict[str, Any]) -> Path:
    """Link audio, then sidecar, under the first number where neither name (in any format) is taken."""
    for n in range(1, MAX_NUMBER + 1):
        audio_path, json_path = stem_names(d, basename, fmt, n)
        taken = [stem_names(d, basename, f, n)[0] for f in FORMATS] + [json_path]
        if any(p.exists() for p in taken):
            continue
        if meta["file"].get("name") != audio_path.name:
            meta["file"]["name"] = audio_path.name
            with open(json_tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        try:
            finalize(audio_tmp, audio_path, overwrite=False)
        except FileExistsError:
            continue
        try:
            finalize(json_tmp, json_path, overwrite=False)
        except FileExistsError:
            # Someone took the sidecar name between our check and link: give the number back.
            if not Path(audio_tmp).exists():
                os.link(audio_path, audio_tmp)
            audio_path.unlink()
            continue
        return audio_path
    raise StemError(f"no free stem name for {basename} in {d} after {MAX_NUMBER} tries")
