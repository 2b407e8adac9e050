"""Melody conditioning: audio chroma, MIDI (tempo maps, tracks), notes, the metric, bad input."""

from __future__ import annotations

import subprocess
import sys

import mido
import numpy as np
import pytest

from model.conditioning.chroma import FRAME_RATE, audio_chroma, chroma_filter_bank
from model.conditioning.melody import (MelodyError, beats_to_seconds, chroma_cosine_similarity, load_melody, midi_notes,
                          notes_to_chroma)

SR = 32000


def _tone(midi: int, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    f = 440.0 * 2 ** ((midi - 69) / 12)
    # A few harmonics, as an instrument has: the fundamental's class must still win.
    x = sum(a * np.sin(2 * np.pi * f * k * t) for k, a in ((1, 1.0), (2, 0.4), (3, 0.2)))
    return (0.3 * x).astype(np.float32)


def _write_midi(path, notes, ticks_per_beat=480, tempos=((0, 120.0),), name="lead", extra_tracks=()):
    """notes: (pitch, start_beat, length_beats) on one track; tempos: (beat, bpm)."""
    mid = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    meta = mido.MidiTrack()
    mid.tracks.append(meta)
    last = 0
    for beat, bpm in tempos:
        tick = int(beat * ticks_per_beat)
        meta.append(mido.MetaMessage("set_tempo", tempo=mido.bpm2tempo(bpm), time=tick - last))
        last = tick
    for tname, tnotes in list(extra_tracks) + [(name, notes)]:
        tr = mido.MidiTrack()
        tr.append(mido.MetaMessage("track_name", name=tname, time=0))
        events = []
        for p, s, n in tnotes:
            events.append((int(s * ticks_per_beat), 1, "note_on", p))
            events.append((int((s + n) * ticks_per_beat), 0, "note_off", p))
        now = 0
        for tick, _, kind, p in sorted(events):
            tr.append(mido.Message(kind, note=p, velocity=90 if kind == "note_on" else 0, time=tick - now))
            now = tick
        mid.tracks.append(tr)
    mid.save(str(path))
    return path


def test_filter_bank_matches_an_independent_implementation():
    from transformers.audio_utils import chroma_filter_bank as theirs

    ours = chroma_filter_bank()
    ref = theirs(num_frequency_bins=16384, num_chroma=12, sampling_rate=32000, tuning=0)
    assert ours.shape == ref.shape == (12, 8193)
    np.testing.assert_allclose(ours, ref, atol=1e-9)


@pytest.mark.parametrize("pitch_class", range(12))
def test_pure_tone_maps_to_its_bin_at_every_frame(pitch_class):
    midi = 60 + pitch_class
    c = audio_chroma(np.sin(2 * np.pi * 440 * 2 ** ((midi - 69) / 12) * np.arange(2 * SR) / SR)
                     .astype(np.float32), SR)
    assert c.shape == (16, 12) and set(c.sum(axis=1)) == {1.0}
    assert (c[1:-1].argmax(axis=1) == pitch_class).all()


def test_chord_root_wins_when_loudest_and_other_rates_resample():
    x = _tone(62, 2.0) + 0.5 * _tone(66, 2.0) + 0.5 * _tone(69, 2.0)  # D major, D loudest
    c = audio_chroma(x, SR)
    assert (c[1:-1].argmax(axis=1) == 2).all()
    y = np.repeat(_tone(67, 2.0, 48000)[None], 2, axis=0)  # stereo at 48 kHz
    c48 = audio_chroma(y, 48000)
    assert (c48[1:-1].argmax(axis=1) == 7).all()


def test_midi_and_the_same_notes_as_audio_agree(tmp_path):
    notes = [(60, 0, 2), (64, 2, 2), (67, 4, 2), (72, 6, 1), (71, 7, 1), (69, 8, 4)]  # beats at 120
    path = _write_midi(tmp_path / "m.mid", notes)
    from_midi = load_melody(path, FRAME_RATE)
    audio = np.zeros(int(6.0 * SR) + SR, np.float32)
    for p, s, n in notes:
        a, b = int(s * 0.5 * SR), int((s + n) * 0.5 * SR)
        audio[a:b] += _tone(p, (b - a) / SR)[: b - a]
    from_audio = audio_chroma(audio, SR)
    n = min(len(from_midi), len(from_audio))
    voiced = from_midi[:n].max(axis=1) > 0
    agree = (from_midi[:n].argmax(axis=1) == from_audio[:n].argmax(axis=1))[voiced].mean()
    assert agree >= 0.9, agree


def test_tempo_change_moves_the_frames(tmp_path):
    notes = [(60, 0, 4), (67, 4, 4)]
    steady = load_melody(_write_midi(tmp_path / "a.mid", notes), FRAME_RATE)
    faster = load_melody(_write_midi(tmp_path / "b.mid", notes, tempos=((0, 120.0), (2, 240.0))), FRAME_RATE)
    # At 120 bpm the G starts at 2.0 s; with 240 bpm from beat 2 it starts at 1.0 + 0.5 = 1.5 s
    # and the file ends at 1.0 + 6 * 0.25 = 2.5 s. A frame belongs to the note at its centre.
    def first(c, cls):
        return int(np.nonzero((c.argmax(axis=1) == cls) & (c.max(axis=1) > 0))[0][0])

    assert first(steady, 7) == int(np.ceil(2.0 * FRAME_RATE - 0.5))
    assert first(faster, 7) == int(np.ceil(1.5 * FRAME_RATE - 0.5))
    assert len(steady) == round(4.0 * FRAME_RATE) and len(faster) == round(2.5 * FRAME_RATE)


def test_highest_note_wins_and_silence_is_zero():
    c = notes_to_chroma([(48, 0.0, 2.0), (64, 0.5, 1.0)], FRAME_RATE, seconds=3.0)
    assert c.shape == (round(3 * FRAME_RATE), 12)
    centres = (np.arange(len(c)) + 0.5) / FRAME_RATE
    for t, row in zip(centres, c):
        if 0.5 <= t < 1.5:
            assert row.argmax() == 4 and row.sum() == 1
        elif t < 2.0:
            assert row.argmax() == 0 and row.sum() == 1
        else:
            assert row.sum() == 0


def test_track_choice_by_name_and_index(tmp_path):
    path = _write_midi(tmp_path / "t.mid", [(62, 0, 4)], name="lead", extra_tracks=[("bass", [(40, 0, 4)])])
    assert midi_notes(path)[0].pitch == 40  # the first track with notes
    assert midi_notes(path, "lead")[0].pitch == 62
    assert midi_notes(path, 2)[0].pitch == 62
    with pytest.raises(MelodyError, match="no track named 'drums'"):
        midi_notes(path, "drums")
    with pytest.raises(MelodyError, match="no track 9"):
        midi_notes(path, 9)


def test_beats_to_seconds():
    (n,) = beats_to_seconds([(60, 2.0, 1.0)], 120.0)
    assert (n.start, n.end) == (1.0, 1.5)
    with pytest.raises(MelodyError):
        beats_to_seconds([(60, 0, 1)], 0.0)


@pytest.mark.parametrize("case", ["empty_midi", "no_notes", "corrupt_wav", "empty_wav", "missing", "bad_npy"])
def test_bad_input_names_the_problem(case, tmp_path):
    from audiofile import write_audio

    if case == "empty_midi":
        p = tmp_path / "e.mid"
        p.write_bytes(b"")
        msg = "not a readable MIDI file"
    elif case == "no_notes":
        p = _write_midi(tmp_path / "n.mid", [])
        msg = "has no notes"
    elif case == "corrupt_wav":
        p = tmp_path / "c.wav"
        p.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
        msg = "not a readable audio file"
    elif case == "empty_wav":
        p = write_audio(tmp_path / "z.wav", np.zeros((1, 0), np.float32), SR)
        msg = "no audio"
    elif case == "missing":
        p = tmp_path / "gone.mid"
        msg = "does not exist"
    else:
        p = tmp_path / "b.npy"
        np.save(p, np.zeros((5, 7), np.float32))
        msg = "shape \\(frames, 12\\)"
    with pytest.raises(MelodyError, match=msg):
        load_melody(p, FRAME_RATE)


def test_chroma_cosine_similarity():
    a = notes_to_chroma([(60, 0, 1), (62, 1, 1)], FRAME_RATE)
    assert chroma_cosine_similarity(a, a) == pytest.approx(1.0)
    b = notes_to_chroma([(60, 0, 1), (65, 1, 1)], FRAME_RATE)
    assert chroma_cosine_similarity(a, b) == pytest.approx(0.5, abs=0.07)
    assert chroma_cosine_similarity(a, np.zeros_like(a)) == 0.0


def test_melody_reaches_the_melody_models_conditioning(tmp_path, tiny_melody_engine):
    """Our chroma is what transformers' MusicGen-Melody takes as input_features, and our engine
    and its generate follow it identically."""
    from model.bench.reference import reference_generate_tokens
    from model.types import GenerationRequest, SamplingParams

    path = _write_midi(tmp_path / "m.mid", [(60, 0, 1), (64, 1, 1), (67, 2, 2)])
    chroma = load_melody(path, tiny_melody_engine.chroma_frame_rate, seconds=0.6)
    assert chroma.shape == (round(0.6 * FRAME_RATE), 12) and chroma.dtype == np.float32
    req = [GenerationRequest("piano", 0.6, SamplingParams(greedy=True), melody=chroma)]
    ours = tiny_melody_engine.generate_tokens(req)[0]
    theirs, _ = reference_generate_tokens(tiny_melody_engine.hf, tiny_melody_engine.tokenizer, req)
    np.testing.assert_array_equal(ours, theirs[0])
    other = [GenerationRequest("piano", 0.6, SamplingParams(greedy=True), melody=np.roll(chroma, 5, axis=1))]
    assert (tiny_melody_engine.generate_tokens(other)[0] != ours).any()


def test_cli_chroma_generate_and_score(tmp_path, tiny_melody_dir, tiny_model_dir):
    mid = _write_midi(tmp_path / "riff.mid", [(60, 0, 1), (67, 1, 1)])
    run = lambda *a: subprocess.run([sys.executable, "-m", "bridge.cli", *a], capture_output=True,
                                    text=True, timeout=300)
    r = run("chroma", "--midi", str(mid), "--out", str(tmp_path / "c.npy"), "--seconds", "2")
    assert r.returncode == 0, r.stderr
    c = np.load(tmp_path / "c.npy")
    assert c.shape == (round(2 * FRAME_RATE), 12) and c[:7].argmax(axis=1).tolist()[:3] == [0, 0, 0]
    r = run("generate", "--model", str(tiny_melody_dir), "--prompt", "lead", "--seconds", "1",
            "--melody", str(mid), "--out", str(tmp_path / "g.wav"), "--seed", "1")
    assert r.returncode == 0, r.stderr
    r = run("score-melody", str(mid), str(tmp_path / "g.wav"))
    assert r.returncode == 0 and "chroma cosine similarity:" in r.stdout
    r = run("generate", "--model", str(tiny_model_dir), "--prompt", "lead", "--melody", str(mid),
            "--out", str(tmp_path / "x.wav"))
    assert r.returncode == 2 and "MusicGen-Melody" in r.stderr
    r = run("chroma", "--midi", str(tmp_path / "nope.mid"), "--out", str(tmp_path / "n.npy"))
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "n.npy").exists()
