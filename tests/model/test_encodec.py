"""Our EnCodec decoder (model/codec/encodec.py) reproduces `transformers`' EncodecModel.decode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.codec.codes import StreamingDecoder, decode_full
from model.codec.encodec import EncodecDecoder

BOUND = 1e-5  # max |ours - transformers| / max |transformers|
ROOT = Path(__file__).resolve().parents[2]


def _random_codec(config):
    """A transformers EnCodec with random codebooks and weight-norm gains != ||v||."""
    from transformers import EncodecModel

    from model.load.tiny import randomize_codebooks

    with torch.random.fork_rng():
        torch.manual_seed(0)
        codec = EncodecModel(config).eval()
        randomize_codebooks(codec)
        with torch.no_grad():
            for name, p in codec.named_parameters():
                if name.endswith("original0"):
                    p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    return codec


def _tensors(codec) -> dict[str, torch.Tensor]:
    return {"audio_encoder." + k: v.clone() for k, v in codec.state_dict().items()}


def _ours(codec, tensors=None) -> EncodecDecoder:
    return EncodecDecoder.from_state_dict(codec.config.to_dict(), tensors or _tensors(codec))


def _rel_err(got: torch.Tensor | np.ndarray, want: torch.Tensor | np.ndarray) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    return float(np.abs(got - want).max() / np.abs(want).max())


def _codes(codec, t: int, seed: int) -> torch.Tensor:
    k = codec.config.num_quantizers
    return torch.randint(0, codec.config.codebook_size, (1, 1, k, t),
                         generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_codec():
    from model.load.tiny import tiny_configs

    return _random_codec(tiny_configs()[1])


@pytest.fixture(scope="module")
def tiny_ours(tiny_codec):
    return _ours(tiny_codec)


@pytest.mark.parametrize("frames", [1, 7, 50])
def test_decode_matches_transformers_tiny(tiny_codec, tiny_ours, frames):
    codes = _codes(tiny_codec, frames, frames)
    with torch.inference_mode():
        want = tiny_codec.decode(codes, [None]).audio_values
    got = tiny_ours.decode(codes, [None]).audio_values
    assert got.shape == (1, 1, frames * 640)
    assert _rel_err(got, want) < BOUND


def test_decode_matches_transformers_real_shapes():
    from model.codec.codes import musicgen_32k_config

    codec = _random_codec(musicgen_32k_config())
    ours = _ours(codec)
    assert ours.config.num_quantizers == 4 and ours.config.frame_rate == codec.config.frame_rate == 50
    codes = _codes(codec, 50, 3)
    with torch.inference_mode():
        want = codec.decode(codes, [None]).audio_values
    got = ours.decode(codes, [None]).audio_values
    assert _rel_err(got, want) < BOUND


@pytest.mark.parametrize("variant", [
    dict(use_causal_conv=True, trim_right_ratio=0.5, use_conv_shortcut=True),
    dict(use_causal_conv=True, pad_mode="constant", num_lstm_layers=2, num_residual_layers=2),
])
def test_other_supported_configs_match(variant):
    """Causal padding, right-trim ratios, conv shortcuts, deeper stacks, and audio scales."""
    from model.load.tiny import tiny_configs

    config = tiny_configs()[1]
    for k, v in variant.items():
        setattr(config, k, v)
    codec = _random_codec(config)
    codes, scale = _codes(codec, 7, 2), torch.tensor([[0.7]])
    with torch.inference_mode():
        want = codec.decode(codes, [scale]).audio_values
    assert _rel_err(_ours(codec).decode(codes, [scale]).audio_values, want) < BOUND


@pytest.mark.parametrize("variant", [
    {},
    dict(use_causal_conv=True, trim_right_ratio=0.5, use_conv_shortcut=True),
    dict(use_causal_conv=True, pad_mode="constant", num_residual_layers=2),
    dict(use_causal_conv=True, num_residual_layers=3),  # reflect at the start reads to the right
    dict(use_causal_conv=True, last_kernel_size=101),
])
@pytest.mark.parametrize("frames", [1, 9, 40])
def test_tiled_upsampling_equals_the_whole_stack(variant, frames):
    """Tiles cut everywhere (down to one sample's worth) give the whole stack's audio: a reach
    (`span`) one sample short puts a tile's padding into kept samples, at the 1e-2 scale. The
    bound is BOUND's: oneDNN picks its convolution algorithm by length, so the rounding differs
    (up to 6e-6 of the peak with the 101-tap kernel)."""
    from model.codec.codes import musicgen_32k_config

    config = musicgen_32k_config()
    config.num_filters = 8  # real strides and kernels, narrow channels: fast
    for k, v in variant.items():
        setattr(config, k, v)
    ours = _ours(_random_codec(config))
    x = torch.randn(1, 8 * 16, frames, generator=torch.Generator().manual_seed(frames))
    with torch.inference_mode():
        whole = ours.layers[2:](x)
        for tile in (1, 97, 640, 4096):
            assert _rel_err(ours.upsample(x, tile), whole) < BOUND, tile


def test_old_weight_norm_key_names(tiny_codec, tiny_ours):
    renamed = {k.replace("parametrizations.weight.original0", "weight_g")
                .replace("parametrizations.weight.original1", "weight_v"): v
               for k, v in _tensors(tiny_codec).items()}
    assert any(k.endswith("weight_g") for k in renamed)
    old = _ours(tiny_codec, renamed)
    codes = _codes(tiny_codec, 7, 11)
    assert torch.equal(old.decode(codes, [None]).audio_values,
                       tiny_ours.decode(codes, [None]).audio_values)


def test_codec_module_works_with_ours(tiny_codec, tiny_ours):
    """model/codec/codes.py's full and streaming decodes give the same audio with either codec."""
    codes = _codes(tiny_codec, 60, 5)[0, 0]
    assert _rel_err(decode_full(tiny_ours, codes, 1), decode_full(tiny_codec, codes, 1)) < BOUND

    def stream(codec):
        dec = StreamingDecoder(codec, 1)
        parts = [dec.push(codes[:, i : i + 7]) for i in range(0, codes.shape[1], 7)]
        return np.concatenate([*parts, dec.flush()], axis=1)

    assert _rel_err(stream(tiny_ours), stream(tiny_codec)) < BOUND


def test_missing_key_is_named(tiny_codec):
    tensors = _tensors(tiny_codec)
    for key in ("audio_encoder.decoder.layers.1.lstm.weight_hh_l0",
                "audio_encoder.decoder.layers.4.block.3.conv.parametrizations.weight.original0"):
        broken = {k: v for k, v in tensors.items() if k != key}
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            _ours(tiny_codec, broken)


def test_unsupported_config_is_named(tiny_codec):
    config = {**tiny_codec.config.to_dict(), "norm_type": "time_group_norm"}
    with pytest.raises(ValueError, match="norm_type='time_group_norm'"):
        EncodecDecoder.from_state_dict(config, _tensors(tiny_codec))


def test_import_does_not_load_transformers():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, model.codec.encodec; print('transformers' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("stride,kernel", [(8, 16), (5, 10), (4, 12), (3, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_polyphase_transposed_convolution_equals_pytorchs(batch, stride, kernel, bias):
    """The codec's upsampling as one ordinary convolution per output phase (model/codec/encodec.py)
    gives `conv_transpose1d`'s output, every sample, to float rounding."""
    import torch.nn.functional as F

    from model.codec.encodec import polyphase_transposed, polyphase_weight

    torch.manual_seed(stride * kernel + batch)
    w, x = torch.randn(24, 16, kernel) * 0.1, torch.randn(batch, 24, 37)
    b = torch.randn(16) if bias else None
    want = F.conv_transpose1d(x, w, b, stride=stride)
    got = polyphase_transposed(x, polyphase_weight(w, stride), b, stride)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
