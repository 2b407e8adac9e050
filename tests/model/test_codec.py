"""Streaming EnCodec decode equals the full decode, at bounded cost per chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.codec.codes import StreamingDecoder, decode_full, encode_audio

BOUND = 1e-3  # max |stream - full| / max |full|


def _stream(dec: StreamingDecoder, codes: torch.Tensor, chunk: int) -> tuple[np.ndarray, list[int]]:
    parts, windows = [], []
    for i in range(0, codes.shape[1], chunk):
        parts.append(dec.push(codes[:, i : i + chunk]))
        windows.append(dec.last_window)
    parts.append(dec.flush())
    return np.concatenate(parts, axis=1), windows


def stream_against_full(dec, codec, chunk: int, bound: float) -> list[int]:
    """Stream 120 random frames (MusicGen's 32 kHz codec) `chunk` at a time: the audio equals
    the full decode within `bound` of its peak, and no push decodes more than left + chunk +
    right frames wherever the stream is. Returns each push's window."""
    codes = torch.randint(0, 2048, (4, 120), generator=torch.Generator().manual_seed(chunk))
    full = decode_full(codec, codes, 1)
    got, windows = _stream(dec, codes, chunk)
    assert got.shape == full.shape == (1, 120 * 640)
    err = np.abs(got - full).max() / np.abs(full).max()
    assert err < bound, f"relative error {err:.2e}"
    assert max(windows) <= dec.left + chunk + dec.right
    return windows


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_stream_equals_full_decode_real_shapes(real_shape_codec, chunk):
    stream_against_full(StreamingDecoder(real_shape_codec, 1), real_shape_codec, chunk, BOUND)


def test_long_decodes_go_by_windows_within_the_stream_bound(real_shape_codec):
    """Past `window` frames the decode is windowed (bounded memory): same length, within the
    streaming bound of the full decode, the same every time; up to it, the full decode itself."""
    from model.codec.codes import decode

    codes = torch.randint(0, 2048, (4, 130), generator=torch.Generator().manual_seed(9)).numpy()
    full = decode_full(real_shape_codec, codes, 1)
    windowed = decode(real_shape_codec, codes, 1, window=50)
    assert windowed.shape == full.shape == (1, 130 * 640)
    assert np.abs(windowed - full).max() / np.abs(full).max() < BOUND
    assert not np.array_equal(windowed, full)  # it really went by windows
    turns = []  # the engine waits for a gap between live chunks before each window
    np.testing.assert_array_equal(decode(real_shape_codec, codes, 1, window=50, between=lambda: turns.append(1)),
                                  windowed)
    assert len(turns) == 3  # frames 0-49, 50-99, 100-129
    np.testing.assert_array_equal(decode(real_shape_codec, codes, 1, window=130), full)


def test_stream_equals_full_tiny_stereo(tiny_stereo_dir):
    from transformers import MusicgenForConditionalGeneration

    codec = MusicgenForConditionalGeneration.from_pretrained(tiny_stereo_dir).audio_encoder
    codes = torch.randint(0, 64, (8, 60), generator=torch.Generator().manual_seed(3))
    full = decode_full(codec, codes, 2)
    got, _ = _stream(StreamingDecoder(codec, 2), codes, 10)
    assert got.shape == (2, 60 * 640)
    assert np.abs(got - full).max() / np.abs(full).max() < BOUND
    # Left and right really are different streams.
    assert np.abs(full[0] - full[1]).max() > 1e-4


@pytest.mark.parametrize("kind", ["windows", "stateful"])
def test_reset_restarts_identically(tiny_engine, kind):
    from model.codec.stream import StatefulDecoder

    codec = tiny_engine.hf.audio_encoder
    codes = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(5))
    dec = (StreamingDecoder if kind == "windows" else StatefulDecoder)(codec, 1)
    a, _ = _stream(dec, codes, 9)
    dec.reset()
    b, _ = _stream(dec, codes, 9)
    np.testing.assert_array_equal(a, b)


def test_encode_decode_round_trip_shapes(tiny_engine, tiny_stereo_dir):
    from transformers import MusicgenForConditionalGeneration

    t = np.arange(32000) / 32000
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
    codes = tiny_engine.encode(tone)  # our reader's checkpoint builds transformers' encoder for this
    assert codes.shape == (4, 50) and codes.dtype == np.int64 and codes.max() < 64
    audio = tiny_engine.decode(codes)
    assert audio.shape == (1, 32000)
    stereo = MusicgenForConditionalGeneration.from_pretrained(tiny_stereo_dir).audio_encoder
    sc = encode_audio(stereo, np.concatenate([tone, -tone]), 2)
    assert sc.shape == (8, 50)
