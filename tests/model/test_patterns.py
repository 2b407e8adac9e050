"""Codebook patterns: every (codebook, frame) once, round trips, and the checkpoints' layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.decode.patterns import PATTERNS, get_pattern

SHAPES = [(k, c, t) for k in (1, 2, 4, 8) for c in (1, 2) if k % c == 0 for t in (1, 2, 7, 50)]


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("k, channels, t", SHAPES)
def test_round_trip_and_coverage(name, k, channels, t):
    p = get_pattern(name, k, channels)
    idx = p.index(t)
    for cb in range(k):
        frames = idx[cb][idx[cb] >= 0]
        assert sorted(frames.tolist()) == list(range(t)), "each frame exactly once per codebook"
    codes = np.random.default_rng(k * 100 + t).integers(0, 2048, (k, t))
    seq = p.build(codes, pad_id=2048)
    assert seq.shape == (k, p.n_steps(t))
    assert (seq[idx < 0] == 2048).all()
    np.testing.assert_array_equal(p.revert(seq, t), codes)


def test_step_counts():
    assert get_pattern("delay", 4).n_steps(10) == 13
    assert get_pattern("delay", 8, channels=2).n_steps(10) == 13
    assert get_pattern("parallel", 4).n_steps(10) == 10
    assert get_pattern("flatten", 4).n_steps(10) == 40
    assert get_pattern("coarse_first", 4).n_steps(10) == 20


def test_first_complete_step_delay():
    p = get_pattern("delay", 4)
    np.testing.assert_array_equal(p.first_complete_step(5), np.arange(5) + 3)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_stereo_dir"])
def test_delay_matches_transformers_layout(fixture, request):
    from transformers import MusicgenForConditionalGeneration

    model = MusicgenForConditionalGeneration.from_pretrained(request.getfixturevalue(fixture))
    k = model.decoder.num_codebooks
    channels = model.decoder.config.audio_channels
    pad = model.decoder.config.pad_token_id
    t = 9
    p = get_pattern("delay", k, channels)
    idx = p.index(t)
    # From a BOS-only start, transformers marks with -1 the grid cells the model must fill
    # and with the pad id the cells the delay pattern forces; column 0 is BOS.
    bos = torch.full((k, 1), pad)
    _, mask = model.decoder.build_delay_pattern_mask(bos, pad_token_id=pad, max_length=idx.shape[1] + 1)
    mask = mask.reshape(k, -1).numpy()
    assert mask.shape == (k, idx.shape[1] + 1)
    np.testing.assert_array_equal(mask[:, 1:] == -1, idx >= 0)
    np.testing.assert_array_equal(mask[:, 1:][idx < 0], pad)


def test_unknown_pattern_is_named():
    with pytest.raises(ValueError, match="expected one of"):
        get_pattern("zigzag", 4)
