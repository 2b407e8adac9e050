"""Reading, resampling and atomically writing audio files.

Writes go to a hidden temporary file in the target folder and are linked into place only
when complete, so a crash or kill never leaves a partial file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from pedalboard.io import AudioFile, StreamResampler

WRITABLE = {".wav": "WAV", ".flac": "FLAC"}
READABLE = (".wav", ".flac", ".aiff", ".aif", ".ogg", ".mp3")


class AudioFileError(ValueError):
    """An audio file that cannot be read or written as asked."""


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Band-limited resampling of float32 (channels, samples), length kept exact.

    The output has round(n * to / from) samples and is aligned with the input (the
    resampler's latency is removed), so a stem asked for in bars stays sample-exact.
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if from_rate == to_rate:
        return audio

    n_out = int(round(audio.shape[1] * to_rate / from_rate))
    # The flushed stream is already latency-compensated: output sample k sits at input k*from/to.
    rs = StreamResampler(from_rate, to_rate, audio.shape[0])
    y = np.concatenate([rs.process(audio), rs.process(None)], axis=1)[:, :n_out]
    if y.shape[1] < n_out:
        y = np.pad(y, ((0, 0), (0, n_out - y.shape[1])))
    return np.ascontiguousarray(y, dtype=np.float32)


def read_audio(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """float32 (channels, samples) and the file's sample rate; AudioFileError if unreadable."""

    p = Path(path)
    if not p.is_file():
        raise AudioFileError(f"audio file {p} does not exist")
    try:
        with AudioFile(str(p)) as f:
            sr = int(f.samplerate)
            data = f.read(f.frames) if f.frames else np.zeros((f.num_channels, 0), np.float32)
    except Exception as e:  # noqa: BLE001 - any decoder failure is "not readable audio"
        raise AudioFileError(f"{p} is not a readable audio file ({e})") from e
    if data.shape[1] == 0:
        raise AudioFileError(f"{p} contains no audio (0 samples)")
    if not np.isfinite(data).all():
        raise AudioFileError(f"{p} contains NaN or infinite samples")
    return np.ascontiguousarray(data, dtype=np.float32), sr


def check_writable_format(path: str | os.PathLike) -> str:
    ext = Path(path).suffix.lower()
    if ext not in WRITABLE:
        raise AudioFileError(f"cannot write {path}: expected a .wav or .flac file name")
    return ext


def write_audio(
    path: str | os.PathLike,
    audio: np.ndarray,
    sample_rate: int,
    bit_depth: int = 24,
    overwrite: bool = False,
) -> Path:
    """Write float32 (channels, samples) as WAV or FLAC (by extension), atomically.

    With overwrite=False an existing file is never replaced (FileExistsError).
    """

    out = Path(path)
    check_writable_format(out)
    if bit_depth not in (16, 24, 32):
        raise AudioFileError(f"bit depth must be 16, 24 or 32, got {bit_depth}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 2:
        raise AudioFileError(f"audio must be (channels, samples), got shape {audio.shape}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; not overwriting it")
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".part" + out.suffix, dir=out.parent)
    os.close(fd)
    try:
        if out.suffix.lower() == ".flac":
            bit_depth = min(bit_depth, 24)
        with AudioFile(tmp, "w", samplerate=sample_rate, num_channels=audio.shape[0],
                       bit_depth=bit_depth) as f:
            f.write(audio)
        finalize(tmp, out, overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def finalize(tmp: str | os.PathLike, out: Path, overwrite: bool) -> None:
    """Move a complete temporary file into place; without overwrite, fail if `out` appeared."""
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # atomic and refuses to clobber
    except FileExistsError:
        raise FileExistsError(f"{out} already exists; not overwriting it") from None
    except OSError:
        if out.exists():
            raise FileExistsError(f"{out} already exists; not overwriting it") from None
        os.rename(tmp, out)
        return
    os.unlink(tmp)
