"""Streaming EnCodec decode with the decoder's state carried between pushes: exact, and no LSTM
frame run twice.

Why: the window decoder (model/codec/codes.py `StreamingDecoder`) re-decodes 32 frames of left context
for every push, only so that the LSTM's memory warms up again; a jam's 0.5 s pieces (25 frames)
then cost the codec 61 frames each, on the same two cores as the decode steps, and the audio is
the full decode's only to 1e-3. Here the decoder is split where its state lives:

1. the codebooks' embedding and the first convolution, which reads `reach_a` frames ahead;
2. the LSTM, run only over new frames from its carried (h, c): exactly the full decode's state;
3. the upsampling stack, a few frames' reach on either side (1 back, 1 ahead for MusicGen's),
   run over each push's new frames plus that reach (`EncodecDecoder._span` says how much),
   through `EncodecDecoder.upsample` and its tiles.

Only the convolutions recompute their few frames of reach; the 32 frames of context the window
decoder re-decodes for the LSTM's sake are gone.

A frame's audio is final once the stack's and the first convolution's look-ahead have arrived
(`right`, measured away from the start; near the start, reflect padding may read further ahead,
and the first frames then simply wait for it), and it equals the full decode's to float rounding (the same sums over different
window lengths; tested at chunks of 1, 7 and 50 frames). Both ends of the stream pad as the
full decode does: the start because windows there begin where the signal does, the end because
`flush` decodes up to where the signal stops.

Only our own decoder (model.codec.encodec.EncodecDecoder) is split this way; `transformers`' codec
goes through the window decoder (model.codec.codes.streaming_decoder picks).
"""

from __future__ import annotations

import numpy as np
import torch


class StatefulDecoder:
    """Codes in, final audio out; the state (codes and LSTM outputs still in reach, the LSTM's
    (h, c)) is explicit and `reset` clears it. Interface as model.codec.codes.StreamingDecoder's."""

    def __init__(self, codec, channels: int):
        self.codec = codec
        self.channels = channels
        self.hop = int(np.prod(codec.config.upsampling_ratios))
        self.conv = codec.layers[0]
        self.lstm = codec.layers[1].lstm
        self.stack = codec.layers[2:]
        t = 10_000  # a frame far from the edges (near the start reflect padding can reach further)
        _, hi_a = self.conv.span(t, t + 1)
        lo_b, hi_b = self._span_b(t, t + 1)
        self.reach_a = hi_a - (t + 1)  # frames of codes the first convolution reads ahead
        self.left = t - lo_b  # frames of LSTM output the stack reads behind
        self.right = self.reach_a + hi_b - (t + 1)  # frames a frame's audio waits for
        self.reset()

    def reset(self) -> None:
        self._emb: torch.Tensor | None = None  # embedded codes of frames [_emb0, _total)
        self._emb0 = 0
        self._total = 0  # frames of codes received
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None  # the LSTM's (h, c)
        self._y: torch.Tensor | None = None  # LSTM outputs (with the skip) of frames [_y0, _y1)
        self._y0 = self._y1 = 0
        self._emitted = 0  # frames whose audio was handed out
        self._flushed = False
        self.last_window = 0  # frames the stack decoded in the last push (left + new + right at most)

    def _span_b(self, a: int, b: int) -> tuple[int, int]:
        """LSTM-output frames the stack's audio for frames [a, b) reads (unclamped)."""
        return self.codec._span(self.stack, a * self.hop, b * self.hop)

    def push(self, codes: torch.Tensor | np.ndarray) -> np.ndarray:
        """Add codes (codebooks, n); return the audio (channels, samples) that is now final."""
        if self._flushed:
            raise RuntimeError("push after flush: the stream has ended; reset() starts another")
        c = torch.as_tensor(codes, dtype=torch.long).to(self.codec.device)
        if c.shape[1] == 0:
            return self._advance(final=False)
        # Interleaved codebooks (row k * channels + ch is channel ch's level k) -> (channels, K, n).
        emb = self.codec.embed(c.reshape(-1, self.channels, c.shape[1]).transpose(0, 1))
        self._emb = emb if self._emb is None else torch.cat([self._emb, emb], dim=2)
        self._total += c.shape[1]
        return self._advance(final=False)

    def flush(self) -> np.ndarray:
        """The rest of the audio, once no more codes will come (then `reset` before reuse)."""
        self._flushed = True
        return self._advance(final=True)

    @torch.inference_mode()
    def _advance(self, final: bool) -> np.ndarray:
        total = self._total
        # 1. The first convolution and the LSTM over the frames whose codes are all in.
        upto = total if final else _last_final(self.conv.span, self._y1, total - self.reach_a, total)
        if upto > self._y1 and self._emb is not None:
            lo, hi = _window(self.conv.span, self._y1, upto, total)
            x = self.conv(self._emb[..., lo - self._emb0 : hi - self._emb0])[..., self._y1 - lo : upto - lo]
            seq = x.permute(2, 0, 1)
            out, self._state = self.lstm(seq, self._state)
            y = (out + seq).permute(1, 2, 0)
            self._y = y if self._y is None else torch.cat([self._y, y], dim=2)
            self._y1 = upto
            keep = max(0, self.conv.span(upto, upto + 1)[0])  # what the next frame's convolution reads
            self._emb, self._emb0 = self._emb[..., keep - self._emb0 :], keep
        # 2. The stack over the frames whose audio is final, plus its reach.
        end = self._y1 if final else _last_final(self._span_b, self._emitted, self._y1, self._y1)
        if end <= self._emitted or self._y is None:
            self.last_window = 0
            return np.zeros((self.channels, 0), dtype=np.float32)
        lo, hi = _window(self._span_b, self._emitted, end, self._y1)
        audio = self.codec.upsample(self._y[..., lo - self._y0 : hi - self._y0])  # in tiles, as the full decode
        audio = audio[..., (self._emitted - lo) * self.hop : (end - lo) * self.hop]
        self.last_window = hi - lo
        self._emitted = end
        keep = max(0, self._span_b(end, end + 1)[0])  # what the next frame's audio reads
        self._y, self._y0 = self._y[..., keep - self._y0 :], keep
        return audio.reshape(self.channels, -1).float().cpu().numpy()


def _last_final(span, start: int, upto: int, available: int) -> int:
    """The largest end <= `upto` whose outputs [start, end) read only inputs before `available`
    (near the start, reflect padding reads further ahead than anywhere else)."""
    while upto > start and span(start, upto)[1] > available:
        upto -= 1
    return upto


def _window(span, a: int, b: int, available: int) -> tuple[int, int]:
    """The inputs outputs [a, b) read, within the signal so far: a window starting at 0 pads as
    the signal's start does, and one ending at `available` (at the flush) as its end does."""
    lo, hi = span(a, b)
    return max(lo, 0), min(hi, available)
