"""Tempo-locked loops: bars to exact sample counts, tempo estimation, stretch to grid, seamless loops.

Tempo is in quarter notes per minute (the DAW convention), so a bar of n/d lasts n * 4/d quarter
notes: 4 bars of 4/4 at 120 bpm are 8.0 s; 2 bars of 6/8 at 120 bpm are 3.0 s.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from pedalboard import time_stretch

# The one home of the tempo and time-signature ranges: OSC and session.json (bridge.state.rules), session
# files (bridge.state.session_file), the followed clocks (bridge.clock.grid) and jams import them from here.
MIN_BPM, MAX_BPM = 20.0, 400.0
DENOMINATORS = (1, 2, 4, 8, 16, 32)  # the one set of time-signature denominators
MAX_NUMERATOR = 32
_SIGNATURE = re.compile(r"\s*([0-9]{1,4})\s*/\s*([0-9]{1,4})\s*")
STRETCH_TOLERANCE = 0.01  # 1 %: 80 ms over 4 bars at 120 bpm, audible against a click
STRETCH_LIMIT = 0.12  # beyond this the estimate is more likely wrong than the music off-tempo
MIN_CONFIDENCE = 0.3
ENVELOPE_RATE = 200.0  # onset envelope frames per second


class TempoError(ValueError):
    """A tempo, time signature or length that cannot be used as asked."""


@dataclass(frozen=True)
class TimeSignature:
    numerator: int = 4
    denominator: int = 4

    def __post_init__(self) -> None:
        if not (isinstance(self.numerator, int) and 1 <= self.numerator <= MAX_NUMERATOR):
            raise TempoError(f"time signature numerator must be 1-{MAX_NUMERATOR}, got {self.numerator!r}")
        if self.denominator not in DENOMINATORS:
            raise TempoError("time signature denominator must be "
                             f"{', '.join(map(str, DENOMINATORS[:-1]))} or {DENOMINATORS[-1]}, "
                             f"got {self.denominator!r}")

    @classmethod
    def parse(cls, text: str) -> TimeSignature:
        """'4/4', '6/8', ... -> TimeSignature; TempoError otherwise."""
        m = _SIGNATURE.fullmatch(str(text))  # ASCII digits: int() would also read "٦/٨" as 6/8
        if m is None:
            raise TempoError(f"time signature must look like 4/4 or 6/8, got {text!r:.40}")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def quarters_per_bar(self) -> float:
        return self.numerator * 4.0 / self.denominator

    @property
    def quarters_per_beat(self) -> float:
        """One signature beat (a denominator note) in quarter notes: 1 in x/4, 0.5 in x/8."""
        return 4.0 / self.denominator

    def beats_to_quarters(self, beats: float) -> float:
        """Signature beats (what /transport/state and bar:beat count) to quarter notes (what
        tempo, /transport/play and the session count)."""
        return beats * 4.0 / self.denominator

    def quarters_to_beats(self, quarters: float) -> float:
        return quarters * self.denominator / 4.0

    def __str__(self) -> str:
        return f"{self.numerator}/{self.denominator}"


def check_bpm(bpm: float) -> float:
    if isinstance(bpm, bool) or not isinstance(bpm, (int, float)) or not math.isfinite(bpm) \
            or not MIN_BPM <= bpm <= MAX_BPM:
        raise TempoError(f"tempo must be a number of bpm in [{MIN_BPM:g}, {MAX_BPM:g}], got {bpm!r}")
    return float(bpm)


def bars_to_seconds(bars: float, bpm: float, signature: TimeSignature = TimeSignature()) -> float:
    if not (isinstance(bars, (int, float)) and math.isfinite(bars) and bars > 0):
        raise TempoError(f"bars must be a positive number, got {bars!r}")
    return bars * signature.quarters_per_bar * 60.0 / check_bpm(bpm)


def bars_to_samples(bars: float, bpm: float, signature: TimeSignature, sample_rate: int) -> int:
    """The exact sample count of `bars` at `sample_rate` (rounded once, never accumulated)."""
    return int(round(bars_to_seconds(bars, bpm, signature) * sample_rate))


# ---------------------------------------------------------------- tempo estimation


@dataclass(frozen=True)
class TempoEstimate:
    bpm: float
    confidence: float  # normalised autocorrelation at the chosen lag, 0..1


def onset_envelope(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Log-spectral flux at ENVELOPE_RATE frames a second, mean-removed."""
    mono = np.asarray(audio, dtype=np.float32)
    mono = mono.mean(axis=0) if mono.ndim == 2 else mono
    hop = max(1, int(round(sample_rate / ENVELOPE_RATE)))
    win = 1 << int(math.ceil(math.log2(4 * hop)))
    if mono.shape[0] < win + 2 * hop:
        return np.zeros(0, dtype=np.float64)
    n = 1 + (mono.shape[0] - win) // hop
    frames = np.lib.stride_tricks.as_strided(
        mono, shape=(n, win), strides=(mono.strides[0] * hop, mono.strides[0]), writeable=False)
    mag = np.abs(np.fft.rfft(frames * np.hanning(win).astype(np.float32), axis=1))
    logmag = np.log1p(100.0 * mag)
    flux = np.maximum(0.0, np.diff(logmag, axis=0)).sum(axis=1)
    return flux - flux.mean()


def estimate_tempo(audio: np.ndarray, sample_rate: int, near: float | None = None,
                   lo: float = 60.0, hi: float = 200.0) -> TempoEstimate:
    """Tempo from the autocorrelation of the onset envelope.

    With `near` (the tempo the music was asked to have) the search covers one octave around it,
    [near/sqrt 2, near*sqrt 2], so a half- or double-time feel lands on near's metrical level
    and music at an unrelated tempo is reported as such (and left alone), not forced onto it.
    A peak on the edge of the search range is no estimate: confidence 0.
    """
    if near is not None:
        lo, hi = near / math.sqrt(2.0), near * math.sqrt(2.0)
    none = TempoEstimate(float(near or 0.0), 0.0)
    env = onset_envelope(audio, sample_rate)
    fps = sample_rate / max(1, int(round(sample_rate / ENVELOPE_RATE)))
    if env.size < 8 or not np.any(env):
        return none
    size = 1 << int(math.ceil(math.log2(2 * env.size)))
    spec = np.fft.rfft(env, size)
    ac = np.fft.irfft(spec * np.conj(spec), size)[: env.size]
    ac = ac / np.arange(env.size, 0, -1)  # unbiased: each lag averages over its overlap
    if ac[0] <= 0:
        return none
    ac = ac / ac[0]
    lag_lo = max(2, int(math.floor(60.0 * fps / hi)))
    lag_hi = min(env.size // 2, int(math.ceil(60.0 * fps / lo)))  # two periods inside the clip
    if lag_hi - lag_lo < 2:
        return none
    k = int(np.argmax(ac[lag_lo:lag_hi + 1])) + lag_lo
    if k in (lag_lo, lag_hi) or ac[k] <= 0:
        return none
    return TempoEstimate(60.0 * fps / _refine(ac, k), float(min(1.0, ac[k])))


def _refine(ac: np.ndarray, k: int) -> float:
    """Sub-frame peak position by a parabola through the peak and its neighbours."""
    if k <= 0 or k >= ac.size - 1:
        return float(k)
    a, b, c = ac[k - 1], ac[k], ac[k + 1]
    denom = a - 2 * b + c
    return float(k) if denom >= 0 else float(k + np.clip(0.5 * (a - c) / denom, -0.5, 0.5))


# ---------------------------------------------------------------- locking to the grid


@dataclass(frozen=True)
class GridFit:
    estimated_bpm: float
    confidence: float
    stretch_factor: float  # 1.0 when no stretch was applied

    def to_dict(self) -> dict:
        return {"estimated_bpm": round(self.estimated_bpm, 3), "confidence": round(self.confidence, 3),
                "stretch_factor": self.stretch_factor}


def stretch_to_tempo(audio: np.ndarray, sample_rate: int, bpm: float,
                     estimate: TempoEstimate | None = None) -> tuple[np.ndarray, GridFit]:
    """Time-stretch audio to `bpm` when its estimated tempo drifts by more than 1 % (up to 12 %).

    Length changes with the stretch; trim it afterwards with `exact_length`.
    """
    est = estimate or estimate_tempo(audio, sample_rate, near=bpm)
    ratio = est.bpm / bpm if est.bpm > 0 else 1.0
    if est.confidence < MIN_CONFIDENCE or not STRETCH_TOLERANCE < abs(ratio - 1.0) <= STRETCH_LIMIT:
        return audio, GridFit(est.bpm, est.confidence, 1.0)

    factor = bpm / est.bpm  # > 1 speeds up a slow take
    y = time_stretch(np.ascontiguousarray(audio, dtype=np.float32), float(sample_rate),
                     stretch_factor=factor)
    return np.ascontiguousarray(y, dtype=np.float32), GridFit(est.bpm, est.confidence, factor)


def exact_length(audio: np.ndarray, samples: int) -> np.ndarray:
    """Trim, or pad with silence, to exactly `samples`."""
    n = audio.shape[1]
    if n >= samples:
        return np.ascontiguousarray(audio[:, :samples])
    return np.pad(audio, ((0, 0), (0, samples - n)))


def make_loop(audio: np.ndarray, samples: int, crossfade: int) -> np.ndarray:
    """A seamless loop of `samples`: the `crossfade` samples generated past the loop end fade
    into the head (equal power), so playing the end straight into the start continues the music.

    audio must hold at least samples + crossfade samples.
    """
    if crossfade < 0 or samples <= 0:
        raise TempoError("loop length and crossfade must be positive")
    if crossfade > samples:
        raise TempoError(f"crossfade ({crossfade} samples) is longer than the loop ({samples})")
    if audio.shape[1] < samples + crossfade:
        raise TempoError(f"a loop of {samples} samples with a {crossfade}-sample crossfade needs "
                         f"{samples + crossfade} samples of audio, got {audio.shape[1]}")
    out = np.array(audio[:, :samples], dtype=np.float32, copy=True)
    if crossfade == 0:
        return out
    t = (np.arange(crossfade, dtype=np.float64) + 0.5) / crossfade
    fade_in = np.sin(0.5 * np.pi * t).astype(np.float32)
    fade_out = np.cos(0.5 * np.pi * t).astype(np.float32)
    tail = audio[:, samples:samples + crossfade]
    out[:, :crossfade] = out[:, :crossfade] * fade_in + tail * fade_out
    return out


def loop_crossfade_samples(bpm: float, sample_rate: int, samples: int) -> int:
    """Default crossfade: one beat, at most a quarter of the loop."""
    return int(min(round(60.0 / check_bpm(bpm) * sample_rate), samples // 4))
