"""Bars to exact sample counts, tempo estimation, stretching to the grid, seamless loops."""

from __future__ import annotations

import numpy as np
import pytest

from plugin_host.tempo import (TempoError, TimeSignature, bars_to_samples, bars_to_seconds,
                               estimate_tempo, exact_length, loop_crossfade_samples, make_loop,
                               stretch_to_tempo)

SR = 32000


def click_track(bpm: float, seconds: float, sr: int = SR) -> np.ndarray:
    """Noise bursts on every beat (accented downbeats): a drum-like signal of known tempo."""
    rng = np.random.default_rng(0)
    x = np.zeros((1, int(seconds * sr)), np.float32)
    n = int(0.03 * sr)
    burst = np.exp(-np.arange(n) / 300.0)
    for i, t in enumerate(np.arange(0.0, seconds - 0.05, 60.0 / bpm)):
        s = int(round(t * sr))
        x[0, s:s + n] += (rng.standard_normal(n) * burst * (1.0 if i % 4 == 0 else 0.6)).astype(np.float32)
    return x


def test_four_bars_at_120_in_4_4_are_eight_seconds_sample_exact():
    sig = TimeSignature.parse("4/4")
    assert bars_to_seconds(4, 120, sig) == 8.0
    assert bars_to_samples(4, 120, sig, 48000) == 384000
    assert bars_to_samples(2, 120, TimeSignature(6, 8), 48000) == 144000  # 6/8: 3 quarters a bar
    assert bars_to_samples(7, 97, sig, 44100) == round(7 * 4 * 60 / 97 * 44100)


@pytest.mark.parametrize("text", ["4", "4/3", "0/4", "x/y", "4/4/4", ""])
def test_bad_time_signatures(text):
    with pytest.raises(TempoError, match="time signature"):
        TimeSignature.parse(text)


@pytest.mark.parametrize("bpm", [0, -5, 1000, float("nan"), True])
def test_bad_tempos(bpm):
    with pytest.raises(TempoError, match="tempo"):
        bars_to_seconds(4, bpm)


@pytest.mark.parametrize("bpm", [95.0, 117.0, 126.0, 140.0])
def test_estimates_the_tempo_of_a_click_track(bpm):
    est = estimate_tempo(click_track(bpm, 8.0), SR)
    assert est.bpm == pytest.approx(bpm, abs=0.75)
    assert est.confidence > 0.5


def test_estimate_near_a_tempo_stays_on_its_metrical_level():
    est = estimate_tempo(click_track(240.0, 8.0), SR, near=120)  # double-time feel of 120
    assert est.bpm == pytest.approx(120.0, abs=0.75)


def test_noise_has_no_confident_tempo():
    x = (np.random.default_rng(3).standard_normal((1, SR * 6)) * 0.3).astype(np.float32)
    assert estimate_tempo(x, SR, near=120).confidence < 0.3


def test_drifting_take_is_stretched_onto_the_grid():
    x = click_track(126.0, 9.0)
    y, fit = stretch_to_tempo(x, SR, 120.0)
    assert fit.estimated_bpm == pytest.approx(126.0, abs=0.75)
    assert fit.stretch_factor == pytest.approx(120.0 / fit.estimated_bpm)
    assert y.shape[1] == pytest.approx(x.shape[1] * 126.0 / 120.0, rel=0.01)
    assert estimate_tempo(y, SR, near=120).bpm == pytest.approx(120.0, abs=0.75)


@pytest.mark.parametrize("bpm", [120.4, 170.0])
def test_on_grid_or_unrelated_tempos_are_left_alone(bpm):
    x = click_track(bpm, 8.0)
    y, fit = stretch_to_tempo(x, SR, 120.0)
    assert fit.stretch_factor == 1.0
    assert y is x


def test_exact_length_trims_and_pads():
    x = np.ones((2, 10), np.float32)
    assert exact_length(x, 4).shape == (2, 4)
    padded = exact_length(x, 12)
    assert padded.shape == (2, 12) and padded[:, 10:].sum() == 0


def test_loop_is_seamless_at_the_wrap():
    n, xf = SR * 2, 4000
    t = np.arange(n + xf) / SR
    x = (0.5 * np.sin(2 * np.pi * 441.3 * t)).astype(np.float32)[None, :]  # not a whole number of cycles
    loop = make_loop(x, n, xf)
    assert loop.shape == (1, n)
    max_step = np.abs(np.diff(x[0])).max()
    wrap = abs(float(loop[0, 0] - loop[0, -1]))
    assert wrap <= max_step * 1.01  # the end runs into the start like any two neighbouring samples
    naive = abs(float(x[0, 0] - x[0, n - 1]))
    assert naive > 3 * max_step  # cutting without the crossfade clicks
    np.testing.assert_array_equal(loop[:, xf:], x[:, xf:n])  # only the head is touched


def test_loop_needs_audio_past_the_end():
    with pytest.raises(TempoError, match="needs 1100 samples"):
        make_loop(np.zeros((1, 1000), np.float32), 1000, 100)
    assert loop_crossfade_samples(120, SR, SR * 8) == SR // 2
    assert loop_crossfade_samples(60, SR, SR) == SR // 4
