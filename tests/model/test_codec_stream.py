"""The stateful streaming decoder (model/codec/stream.py) equals the full decode, carries the
LSTM's memory that the window decoder only approximates, and decodes no context twice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.codec.codes import StreamingDecoder, decode, decode_full, streaming_decoder
from model.codec.stream import StatefulDecoder
from model.codec.encodec import EncodecDecoder
from tests.model.test_codec import _stream, stream_against_full

BOUND = 1e-5  # max |stream - full| / max |full|: float rounding only


@pytest.fixture(scope="module")
def ours(real_shape_codec):
    """Our decoder at MusicGen's 32 kHz shapes, from the same random weights and codebooks."""
    tensors = {"audio_encoder." + k: v.clone() for k, v in real_shape_codec.state_dict().items()}
    return EncodecDecoder.from_state_dict(real_shape_codec.config.to_dict(), tensors)


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_our_decoder_streams_statefully_and_transformers_by_windows(ours, real_shape_codec):
    assert isinstance(streaming_decoder(ours, 1), StatefulDecoder)
    assert isinstance(streaming_decoder(real_shape_codec, 1), StreamingDecoder)


@pytest.mark.parametrize("chunk", [1, 7, 50])
def test_stream_equals_full_decode_and_decodes_each_frame_once(ours, chunk):
    dec = StatefulDecoder(ours, 1)
    windows = stream_against_full(dec, ours, chunk, BOUND)
    # The stack decodes each push's frames plus its few frames of reach, never the 32-frame
    # context the window decoder re-decodes: 1 frame back; audio waits 4 frames for codes.
    assert (dec.left, dec.right) == (1, 4)
    # Audio comes out as soon as it is final: all but the look-ahead before the flush.
    assert sum(w > 0 for w in windows) >= (120 - dec.right) // chunk - 1


def test_the_lstms_memory_is_carried_exactly(ours):
    """An LSTM that remembers (forget gates held open) makes the window decoder's 32 frames of
    context too short; the stateful decoder carries the state, so it still equals the full
    decode."""
    import copy

    remembering = copy.deepcopy(ours)
    lstm = remembering.layers[1].lstm
    hidden = lstm.hidden_size
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            getattr(lstm, f"bias_ih_l{layer}")[hidden : 2 * hidden] = 8.0  # forget gate ~ 1
    codes = torch.randint(0, 2048, (4, 150), generator=torch.Generator().manual_seed(11))
    full = decode_full(remembering, codes, 1)
    stateful, _ = _stream(StatefulDecoder(remembering, 1), codes, 25)
    windowed, _ = _stream(StreamingDecoder(remembering, 1), codes, 25)
    assert _rel(stateful, full) < BOUND
    assert _rel(windowed, full) > 100 * BOUND  # what the window approximates, this keeps


def test_stereo_streams_each_channel_with_its_own_state(tiny_stereo_dir):
    from model.engine import Engine

    codec = Engine.load(str(tiny_stereo_dir), device="cpu", dtype="float32").hf.audio_encoder
    assert isinstance(codec, EncodecDecoder)
    codes = torch.randint(0, 64, (8, 60), generator=torch.Generator().manual_seed(3))
    full = decode_full(codec, codes, 2)
    got, _ = _stream(StatefulDecoder(codec, 2), codes, 10)
    assert got.shape == (2, 60 * 640)
    assert _rel(got, full) < BOUND
    assert np.abs(full[0] - full[1]).max() > 1e-4  # left and right really differ


def test_short_streams_and_an_empty_flush(ours):
    """Fewer frames than the look-ahead: nothing until the flush, then the full decode; a flush
    with nothing pushed is empty."""
    assert StatefulDecoder(ours, 1).flush().shape == (1, 0)
    codes = torch.randint(0, 2048, (4, 3), generator=torch.Generator().manual_seed(2))
    dec = StatefulDecoder(ours, 1)
    assert dec.push(codes).shape == (1, 0)
    assert _rel(dec.flush(), decode_full(ours, codes, 1)) < BOUND


def test_long_decodes_by_windows_are_now_the_full_decode(ours):
    """model.codec.codes.decode past its window goes through the stateful decoder: the full decode
    to float rounding, in bounded memory."""
    codes = torch.randint(0, 2048, (4, 130), generator=torch.Generator().manual_seed(9)).numpy()
    assert _rel(decode(ours, codes, 1, window=50), decode_full(ours, codes, 1)) < BOUND


def test_an_empty_push_gives_no_audio_and_a_push_after_flush_is_refused(ours):
    codes = torch.randint(0, 2048, (4, 20), generator=torch.Generator().manual_seed(6))
    dec = StatefulDecoder(ours, 1)
    assert dec.push(codes[:, :0]).shape == (1, 0)
    got = np.concatenate([dec.push(codes), dec.push(codes[:, :0]), dec.flush()], axis=1)
    assert _rel(got, decode_full(ours, codes, 1)) < BOUND
    with pytest.raises(RuntimeError, match="push after flush"):
        dec.push(codes)
    dec.reset()
    assert dec.push(codes).shape[1] > 0


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_causal_codec_with_reflect_padding_is_exact_from_the_first_frame(chunk):
    """A causal first convolution with reflect padding reads further ahead near the start than
    anywhere else (its left pad reflects frames to the right): the first frames wait for them."""
    from transformers import EncodecConfig, EncodecModel

    from model.load.tiny import randomize_codebooks

    cfg = EncodecConfig(sampling_rate=32000, audio_channels=1, num_filters=4, upsampling_ratios=[8, 5, 4, 4],
                        codebook_size=64, codebook_dim=16, hidden_size=16, num_lstm_layers=2, normalize=False,
                        use_causal_conv=True, target_bandwidths=[2.2], pad_mode="reflect", compress=2,
                        residual_kernel_size=3, dilation_growth_rate=2, use_conv_shortcut=False, kernel_size=7,
                        last_kernel_size=7)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        ref = EncodecModel(cfg).eval()
        randomize_codebooks(ref)
    codec = EncodecDecoder.from_state_dict(cfg.to_dict(), {"audio_encoder." + k: v for k, v in ref.state_dict().items()})
    codes = torch.randint(0, 64, (codec.config.num_quantizers, 30), generator=torch.Generator().manual_seed(chunk))
    got, _ = _stream(StatefulDecoder(codec, 1), codes, chunk)
    assert _rel(got, decode_full(codec, codes, 1)) < BOUND
