"""Audio to the chroma MusicGen-Melody is conditioned on: 12 bins, argmax one-hot.

The extractor of the released model: mono audio at 32 kHz, a power spectrogram with
n_fft 16384 and hop 4096 (Hann window, centred, reflect padding, window-normalised), folded
into 12 pitch classes by a chroma filter bank, and reduced per frame to its strongest bin.
The frame rate is 32000 / 4096 = 7.8125 frames a second. torchaudio cannot be used here, so the
spectrogram is torch.stft and the filter bank is built below from its definition (Gaussian bumps
around each pitch class on a log-frequency axis, weighted towards the middle octaves).
"""

from __future__ import annotations

import numpy as np
import torch
from audiofile import resample

SAMPLE_RATE = 32000
N_FFT = 16384
HOP = 4096
FRAME_RATE = SAMPLE_RATE / HOP


def chroma_filter_bank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_chroma: int = 12,
                       centre_octave: float = 5.0, octave_width: float = 2.0) -> np.ndarray:
    """(n_chroma, n_fft // 2 + 1) weights from spectrum bins to pitch classes, bin 0 = C."""
    freqs = np.arange(1, n_fft) * sample_rate / n_fft
    # Position of each FFT bin in chroma units: 12 per octave, A440 at 4.75 octaves above C1-ish.
    octs = np.log2(freqs / (440.0 / 16.0))
    pos = n_chroma * octs
    pos = np.concatenate([[pos[0] - 1.5 * n_chroma], pos])
    width = np.concatenate([np.maximum(np.diff(pos), 1.0), [1.0]])
    dist = pos[:, None] - np.arange(n_chroma)[None, :]
    half = round(n_chroma / 2)
    dist = np.remainder(dist + half + 10 * n_chroma, n_chroma) - half
    w = np.exp(-0.5 * (2 * dist / width[:, None]) ** 2).T  # (n_chroma, n_fft)
    w = w / np.maximum(np.linalg.norm(w, axis=0, keepdims=True), np.finfo(float).tiny)
    w = w * np.exp(-0.5 * ((pos / n_chroma - centre_octave) / octave_width) ** 2)[None, :]
    # Start at C rather than A.
    w = np.roll(w, -3 * (n_chroma // 12), axis=0)
    return np.ascontiguousarray(w[:, : n_fft // 2 + 1])


_BANK: torch.Tensor | None = None


def _bank() -> torch.Tensor:
    global _BANK
    if _BANK is None:
        _BANK = torch.from_numpy(chroma_filter_bank()).float()
    return _BANK


def raw_chroma(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per-frame chroma energies (frames, 12) of float32 audio (channels, samples) or (samples,)."""

    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if sample_rate != SAMPLE_RATE:
        a = resample(a, sample_rate, SAMPLE_RATE)
    x = torch.from_numpy(a.mean(axis=0))
    if x.numel() < N_FFT:
        pad = N_FFT - x.numel()
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2))
    window = torch.hann_window(N_FFT)
    spec = torch.stft(x, N_FFT, HOP, N_FFT, window, center=True, pad_mode="reflect", return_complex=True)
    power = spec.abs().pow(2) / window.pow(2).sum()
    return (_bank() @ power).T.numpy()


def one_hot(energies: np.ndarray) -> np.ndarray:
    """Argmax one-hot per frame, as the model was trained (a silent frame picks bin 0, as there)."""
    out = np.zeros_like(energies, dtype=np.float32)
    out[np.arange(len(energies)), np.argmax(energies, axis=1)] = 1.0
    return out


def audio_chroma(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """The conditioning chroma (frames, 12) of a take, at FRAME_RATE."""
    return one_hot(raw_chroma(audio, sample_rate))
