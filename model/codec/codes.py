"""EnCodec (MusicGen's 32 kHz codec, as in `transformers`): full and streaming decode, encode.

`streaming_decoder` picks how a codec streams: our own decoder (model.codec.encodec) with its state
carried between pushes (model.codec.stream: exact, no LSTM frame run twice); any other codec
by the windows below.

Streaming by windows decodes a sliding window: the frames to hand out, plus `left` frames of context
for the LSTM and the convolutions' history, plus `right` frames of look-ahead because
MusicGen's EnCodec convolutions are not causal. A frame's audio is final once `right` later
frames have arrived. Each push decodes at most left + chunk + right frames, so the cost of a
chunk does not depend on how much was generated before it (the `transformers` streamer
re-decodes the whole sequence every chunk).

The window departs from the full decode only through the LSTM's memory and the convolutions'
reach. Measured on the real 32 kHz shapes (random weights and codebooks), max error over the
peak of one full decode: right = 3 frames gives 1e-1 (the decoder reaches 4 frames ahead),
right = 4 with left = 8 / 16 / 24 / 32 gives 1.3e-3 / 4.6e-5 / 1.6e-6 / 6.7e-7. The defaults
are left = 32 frames (640 ms) and right = 4 frames (80 ms of added latency);
tests/model/test_codec.py asserts 1e-3 for chunks of 1, 7 and 50 frames. Trained LSTMs can remember longer than random ones: `left` is a constructor
argument, and the cost of a chunk grows only with left + chunk + right, never with position.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from model.codec.encodec import EncodecDecoder
from model.codec.stream import StatefulDecoder

DEFAULT_LEFT = 32
DEFAULT_RIGHT = 4


def musicgen_32k_config():
    """EncodecConfig with the shapes of MusicGen's 32 kHz codec (for random-weight benches/tests)."""
    from transformers import EncodecConfig  # transformers loads only where this runs

    return EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=64, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=2048, codebook_dim=128, hidden_size=128, num_lstm_layers=2, normalize=False,
        use_causal_conv=False, target_bandwidths=[2.2], chunk_length_s=None, overlap=None,
        pad_mode="reflect", compress=2, residual_kernel_size=3, dilation_growth_rate=2,
        use_conv_shortcut=False, trim_right_ratio=1.0, kernel_size=7, last_kernel_size=7,
    )


def hop_length(codec) -> int:
    return int(np.prod(codec.config.upsampling_ratios))


def _decode_mono(codec, codes: torch.Tensor) -> torch.Tensor:
    """codes (K, T) of one channel -> audio (samples,)."""
    return codec.decode(codes[None, None], [None]).audio_values[0, 0]


@torch.inference_mode()
def decode_full(codec, codes: np.ndarray | torch.Tensor, channels: int) -> np.ndarray:
    """Codes (codebooks, frames) -> float32 audio (channels, frames * hop)."""
    c = torch.as_tensor(np.asarray(codes) if not torch.is_tensor(codes) else codes,
                        dtype=torch.long, device=codec.device)
    return torch.stack([_decode_mono(codec, c[ch::channels]) for ch in range(channels)]).float().cpu().numpy()


WINDOW_FRAMES = 300  # one full decode up to here (6 s at 50 Hz); longer ones go by windows


def decode(codec, codes: np.ndarray, channels: int, window: int = WINDOW_FRAMES,
           between: Callable[[], None] | None = None) -> np.ndarray:
    """Codes (codebooks, frames) -> float32 audio (channels, frames * hop) in bounded memory.

    Why: one full decode's activations grow with its length (measured on musicgen-small's
    codec, Intel Xeon: +0.3 GB for 6 s, +1.1 GB for 30 s). Up to `window` frames this is the
    full decode; beyond, the streaming decoder (`streaming_decoder`) is pushed `window` frames
    at a time: ours carries its state (the full decode to float rounding), another codec's
    decodes windows with context (within 1.4e-6 of the full decode's peak with random
    weights); the same every time either way. `between()` runs before each push: the engine
    waits there for a gap between live chunks.
    """
    if codes.shape[1] <= window:
        if between is not None:
            between()
        return decode_full(codec, codes, channels)
    dec = streaming_decoder(codec, channels)
    parts = []
    for i in range(0, codes.shape[1], window):
        if between is not None:
            between()
        parts.append(dec.push(codes[:, i : i + window]))
    return np.concatenate([*parts, dec.flush()], axis=1)


@torch.inference_mode()
def encode_audio(codec, audio: np.ndarray, channels: int) -> np.ndarray:
    """float32 audio (channels, samples) at the codec rate -> codes (codebooks, frames).

    Stereo codebooks come out interleaved left/right, as stereo MusicGen expects them.
    """
    a = torch.as_tensor(np.asarray(audio, dtype=np.float32), device=codec.device)
    if a.shape[0] != channels:
        raise ValueError(f"expected {channels}-channel audio, got {a.shape[0]} channels")
    bandwidth = max(codec.config.target_bandwidths)
    per_channel = [codec.encode(a[ch][None, None], bandwidth=bandwidth).audio_codes[0, 0]
                   for ch in range(channels)]
    k, t = per_channel[0].shape
    out = torch.empty(k * channels, t, dtype=torch.long)
    for ch in range(channels):
        out[ch::channels] = per_channel[ch].cpu()
    return out.numpy()


def streaming_decoder(codec, channels: int):
    """The streaming decoder for `codec`: our own decoder (model.codec.encodec) carries its LSTM's
    state and runs no LSTM frame twice (model.codec.stream, exact); `transformers`' codec goes
    by windows (`StreamingDecoder`, within 1e-3). Both: push / flush / reset, `right`, `left`,
    `last_window`."""

    if isinstance(codec, EncodecDecoder):
        return StatefulDecoder(codec, channels)
    return StreamingDecoder(codec, channels)


class StreamingDecoder:
    """Codes in, final audio out, with explicit and resettable state (by windows: any codec)."""

    def __init__(self, codec, channels: int, left: int = DEFAULT_LEFT, right: int = DEFAULT_RIGHT):
        self.codec = codec
        self.channels = channels
        self.left = left
        self.right = right
        self.hop = hop_length(codec)
        self.reset()

    def reset(self) -> None:
        self._buf: torch.Tensor | None = None  # codes of frames [self._buf_start, self._total)
        self._buf_start = 0
        self._total = 0  # frames received
        self._emitted = 0  # frames whose audio was handed out
        self.last_window = 0  # frames decoded by the last push (bounded: left + new + right)

    def push(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Add codes (codebooks, n); return the audio (channels, samples) that is now final."""
        c = torch.as_tensor(codes, dtype=torch.long).to(self.codec.device)
        self._buf = c if self._buf is None else torch.cat([self._buf, c], dim=1)
        self._total += c.shape[1]
        return self._emit(self._total - self.right)

    def flush(self) -> np.ndarray:
        """The rest of the audio, once no more codes will come."""
        out = self._emit(self._total)
        return out

    @torch.inference_mode()
    def _emit(self, upto: int) -> np.ndarray:
        if upto <= self._emitted or self._buf is None:
            self.last_window = 0
            return np.zeros((self.channels, 0), dtype=np.float32)
        w0 = max(self._buf_start, self._emitted - self.left)
        w1 = min(self._total, upto + self.right)
        window = self._buf[:, w0 - self._buf_start : w1 - self._buf_start]
        audio = torch.stack([_decode_mono(self.codec, window[ch :: self.channels])
                             for ch in range(self.channels)])
        a = (self._emitted - w0) * self.hop
        b = (upto - w0) * self.hop
        out = audio[:, a:b].float().cpu().numpy()
        self.last_window = w1 - w0
        self._emitted = upto
        # Keep only what the next window can reach back to.
        keep_from = max(self._buf_start, self._emitted - self.left)
        self._buf = self._buf[:, keep_from - self._buf_start :]
        self._buf_start = keep_from
        return out
