"""A finished stem drawn small: its waveform (peaks per column) and a log-frequency spectrogram.

Computed once per stem on the panel's thread (never on the live path) and sent as numbers the page
paints on a canvas, so no image library is needed and the page scales them itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from audiofile import read_audio

COLUMNS = 240  # waveform columns
SPEC_FRAMES = 160
SPEC_BANDS = 48
N_FFT = 1024


@dataclass(frozen=True)
class Thumb:
    """Waveform peaks (min, max per column, -1..1) and spectrogram levels (frames x bands, 0..255, low first)."""

    seconds: float
    sample_rate: int
    channels: int
    peaks: tuple[tuple[float, float], ...]
    spectrogram: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, object]:
        return {"seconds": round(self.seconds, 3), "sample_rate": self.sample_rate, "channels": self.channels,
                "peaks": [list(p) for p in self.peaks], "spectrogram": [list(r) for r in self.spectrogram]}


def thumb_of(path: Path) -> Thumb:
    """The thumbnail of an audio file (any format `audiofile` reads); AudioFileError when it cannot be read."""

    audio, rate = read_audio(path)
    mono = np.asarray(audio, np.float32).mean(axis=0)
    return Thumb(seconds=len(mono) / rate, sample_rate=int(rate), channels=int(audio.shape[0]),
                 peaks=_peaks(mono), spectrogram=_spectrogram(mono, rate))


def _peaks(mono: np.ndarray) -> tuple[tuple[float, float], ...]:
    if len(mono) == 0:
        return ()
    edges = np.linspace(0, len(mono), COLUMNS + 1).astype(np.int64)
    out = []
    for a, b in zip(edges[:-1], edges[1:]):
        seg = mono[a:max(b, a + 1)]
        out.append((round(float(seg.min()), 3), round(float(seg.max()), 3)))
    return tuple(out)


def _spectrogram(mono: np.ndarray, rate: int) -> tuple[tuple[int, ...], ...]:
    if len(mono) < N_FFT:
        mono = np.pad(mono, (0, N_FFT - len(mono)))
    starts = np.linspace(0, len(mono) - N_FFT, SPEC_FRAMES).astype(np.int64)
    frames = np.stack([mono[s:s + N_FFT] for s in starts]) * np.hanning(N_FFT).astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(N_FFT, 1.0 / rate)
    edges = np.geomspace(40.0, rate / 2.0, SPEC_BANDS + 1)
    bands = np.stack([power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])],
                     axis=1)
    db = 10.0 * np.log10(bands + 1e-12)
    top = float(db.max())
    levels = np.clip((db - (top - 80.0)) / 80.0 * 255.0, 0, 255).astype(np.int64)
    return tuple(tuple(int(v) for v in row) for row in levels)
