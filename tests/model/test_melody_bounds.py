"""Melodies expand only the window asked for: work bounded by the window and the notes
overlapping it, never by the melody's declared length, and the same values as a whole expansion."""

from __future__ import annotations

import random
import tracemalloc

import numpy as np

from model.conditioning.melody import ChromaMelody, Note, NoteMelody, beats_to_seconds, load_melody, notes_to_chroma

RATE = 7.8125


def _slow_chroma(notes: list[Note], frame_rate: float, frames: int, f0: int = 0) -> np.ndarray:
    """The reference: a pass over every frame of [f0, frames) for every note."""
    centres = (np.arange(f0, frames) + 0.5) / frame_rate
    top = np.full(frames - f0, -1, dtype=np.int64)
    for n in notes:
        on = (centres >= n.start) & (centres < n.end)
        top[on] = np.maximum(top[on], n.pitch)
    out = np.zeros((frames - f0, 12), dtype=np.float32)
    voiced = top >= 0
    out[np.nonzero(voiced)[0], top[voiced] % 12] = 1.0
    return out


def _hostile_notes(count: int, beats: float, seed: int) -> list[tuple[int, float, float]]:
    """(pitch, start_beat, length_beats): short notes over `beats`, a few very long ones among them."""
    rng = random.Random(seed)
    notes = []
    for i in range(count):
        start = rng.uniform(0.0, beats - 1.0)
        length = rng.uniform(0.1, 2.0) if i % 97 else rng.uniform(beats / 10, beats - start)
        notes.append((rng.randrange(128), start, length))
    return notes


def test_windows_equal_the_slow_whole_expansion_on_a_small_case():
    notes = beats_to_seconds(_hostile_notes(200, 400.0, 1), 90.0)
    m = NoteMelody(notes)
    frames = m.frames(RATE)
    whole = _slow_chroma(notes, RATE, frames)
    assert np.array_equal(notes_to_chroma(notes, RATE), whole)
    rng = random.Random(2)
    for _ in range(50):
        f0 = rng.randrange(frames)
        f1 = f0 + rng.randrange(1, 200)
        want = np.zeros((f1 - f0, 12), np.float32)
        inside = whole[f0:f1]
        want[: len(inside)] = inside
        assert np.array_equal(m.window(RATE, f0, f1), want), (f0, f1)


def test_a_window_of_a_huge_melody_touches_only_the_notes_overlapping_it():
    """2,048 notes over 100,000 beats at tempo 20 (300,000 s): one 10 s window."""
    notes = beats_to_seconds(_hostile_notes(2048, 100_000.0, 3), 20.0)
    m = NoteMelody(notes)
    assert m.frames(RATE) > 2_000_000
    rng = random.Random(4)
    for _ in range(20):
        f0 = rng.randrange(m.frames(RATE))
        f1 = f0 + int(10 * RATE)
        centres = (np.arange(f0, f1) + 0.5) / RATE
        overlapping = [n for n in notes if n.start <= centres[-1] and n.end > centres[0]]
        before = m.notes_touched
        win = m.window(RATE, f0, f1)
        assert win.shape == (f1 - f0, 12)
        assert m.notes_touched - before == len(overlapping)  # not one note more
        assert np.array_equal(win, _slow_chroma(notes, RATE, f1, f0))  # the slow way, every note


def test_a_window_over_a_long_note_and_the_notes_starting_inside():
    notes = [Note(40, 0.0, 1e6), Note(70, 5.0, 5.5), Note(30, 20.0, 30.0)] + [Note(50, 1000.0 + i, 1000.5 + i)
                                                                              for i in range(500)]
    m = NoteMelody(notes)
    before = m.notes_touched
    win = m.window(RATE, 0, int(10 * RATE))
    assert m.notes_touched - before == 2  # the long note and the one inside; not the 500 later ones
    assert np.array_equal(win, _slow_chroma(notes, RATE, int(10 * RATE)))


def test_a_chroma_at_a_thousandth_of_a_frame_a_second_allocates_only_its_window():
    src = np.eye(12, dtype=np.float32)[np.arange(1250) % 12]  # 60 KB: 1,250,000 s at 0.001 fps
    m = ChromaMelody(src, 0.001)
    assert m.frames(RATE) == int(round(1250 / 0.001 * RATE))
    f0, f1 = 5_000_000, 5_000_000 + int(10 * RATE)
    tracemalloc.start()
    try:
        win = m.window(RATE, f0, f1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert win.shape == (f1 - f0, 12)
    assert peak < 64 * 1024  # a few window-sized arrays (78 frames), not 9.8 million frames
    want = src[np.floor(np.arange(f0, f1) * 0.001 / RATE + 1e-9).astype(np.int64)]
    assert np.array_equal(win, want)


def test_a_midi_file_with_a_far_note_expands_only_the_seconds_asked(tmp_path):
    import mido

    mid = mido.MidiFile(ticks_per_beat=480)
    t = mido.MidiTrack()
    mid.tracks.append(t)
    t.append(mido.Message("note_on", note=60, velocity=90, time=0))
    t.append(mido.Message("note_on", note=64, velocity=90, time=480))
    t.append(mido.Message("note_off", note=64, velocity=0, time=480))
    t.append(mido.Message("note_off", note=60, velocity=0, time=2_000_000 * 480))  # ends at 10^6 s
    path = tmp_path / "far.mid"
    mid.save(path)
    tracemalloc.start()
    try:
        c = load_melody(path, RATE, seconds=2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert c.shape == (int(round(2.0 * RATE)), 12)
    assert peak < 2 * 1024 * 1024  # not a 7.8-million-frame chroma (375 MB)
    assert [int(r.argmax()) for r in c] == [0] * 4 + [4] * 4 + [0] * 8
