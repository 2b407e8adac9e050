"""Melodies under a jam stay bounded: a stored melody is expanded a chunk's window at a time
(never over its declared length, never on the OSC thread), and a flood of live notes keeps the
live melody's state under its caps."""

from __future__ import annotations

import random
import signal
import tracemalloc

import numpy as np
import pytest

from bridge.live.melody_source import LoopedMelody, stored_melody
from bridge.live.notes import MAX_HELD_NOTES, MAX_REMEMBERED_NOTES, LiveMelody
from model.conditioning.melody import ChromaMelody, NoteMelody, beats_to_seconds

RATE = 32000 / 4096


def _notes(count: int, beats: float, seed: int) -> list[list[float]]:
    """[pitch, start_beat, length_beats]: short notes spread over `beats`, a few long ones."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        start = rng.uniform(0.0, beats - 2.0)
        length = rng.uniform(0.25, 2.0) if i % 101 else rng.uniform(1.0, (beats - start) / 4)
        out.append([rng.randrange(128), start, length])
    return out


def test_a_looped_melody_reads_windows_equal_to_looping_the_whole_expansion():
    notes = _notes(120, 64.0, 1)
    source = NoteMelody(beats_to_seconds(notes, 120.0))
    whole = source.window(RATE, 0, source.frames(RATE))
    lazy, eager = LoopedMelody(source, RATE, bar_seconds=2.0), LoopedMelody(whole, RATE, bar_seconds=2.0)
    assert lazy.seconds == eager.seconds
    rng = random.Random(2)
    for _ in range(40):  # chunks anywhere, across loop wraps too
        start, seconds = rng.uniform(0.0, 500.0), rng.choice([0.5, 2.0, 4.0, 40.0])
        assert np.array_equal(lazy.chroma(start, seconds, RATE), eager.chroma(start, seconds, RATE))


def test_a_chunk_of_a_300000_second_melody_touches_only_its_notes():
    """2,048 notes over 100,000 beats at tempo 20: the loop is 300,000 s long, a chunk reads 4 s."""
    rec = {"kind": "notes", "notes": _notes(2048, 100_000.0, 3)}
    source = stored_melody(rec, RATE, 20.0)
    assert isinstance(source, NoteMelody)
    looped = LoopedMelody(source, RATE, bar_seconds=12.0)
    assert looped.seconds > 299_000
    secs = beats_to_seconds(rec["notes"], 20.0)
    for start in (0.0, 1234.5, 150_000.0, looped.seconds - 2.0):  # the last one wraps to the start
        before = source.notes_touched
        out = looped.chroma(start, 4.0, RATE)
        assert out.shape == (int(round(4.0 * RATE)), 12)
        # the notes sounding in the (at most two) windows read, with the loop's edges: a handful
        near = [n for n in secs if n.end > (start % looped.seconds) - 5 and n.start < (start % looped.seconds) + 5]
        near += [n for n in secs if n.start < 5.0] if start > looped.seconds - 5 else []
        assert source.notes_touched - before <= len(near)


def test_a_chroma_at_a_thousandth_of_a_frame_a_second_is_never_materialised():
    data = np.eye(12, dtype="<f4")[np.arange(1250) % 12]  # 60 KB at 0.001 fps: 1,250,000 s
    from bridge.state.session_check import chroma_to_text

    rec = {"kind": "chroma", "data": chroma_to_text(data.tobytes()), "frame_rate": 0.001}
    source = stored_melody(rec, RATE, 120.0)
    assert isinstance(source, ChromaMelody)
    looped = LoopedMelody(source, RATE, bar_seconds=2.0)
    tracemalloc.start()
    try:
        out = looped.chroma(654_321.0, 4.0, RATE)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (int(round(4.0 * RATE)), 12)
    assert peak < 64 * 1024  # window-sized arrays, not 9.8 million frames (470 MB)
    assert int(out[0].argmax()) == int(654_321.0 * 0.001) % 12


def test_a_stored_midi_file_is_read_by_the_first_chunk_not_at_jam_start(tmp_path):
    import mido

    mid = mido.MidiFile(ticks_per_beat=480)
    t = mido.MidiTrack()
    mid.tracks.append(t)
    t.append(mido.Message("note_on", note=62, velocity=90, time=0))
    t.append(mido.Message("note_off", note=62, velocity=0, time=2_000_000 * 480))  # ends at 10^6 s
    path = tmp_path / "far.mid"
    mid.save(path)
    loader = stored_melody({"kind": "midi", "path": str(path)}, RATE, 120.0)
    looped = LoopedMelody(loader, RATE, bar_seconds=2.0)
    assert not looped.loaded  # /jam/start builds this: nothing parsed yet
    out = looped.chroma(500_000.0, 2.0, RATE)  # the jam's thread, first chunk
    assert looped.loaded and out.shape == (16, 12)
    assert (out.argmax(axis=1) == 2).all() and looped.seconds == pytest.approx(1e6)


def test_a_note_flood_keeps_the_live_melody_under_its_caps_and_its_window_unchanged():
    now = [0.0]
    flood = LiveMelody(clock=lambda: now[0])
    events = []
    for i in range(100_000):  # note-ons without offs, 1 ms apart, over every pitch
        now[0] = i * 0.001
        pitch = (i * 7) % 128
        flood.note_on(pitch)
        events.append((now[0], pitch))
        assert flood.held_count <= MAX_HELD_NOTES and flood.remembered_count <= MAX_REMEMBERED_NOTES
    assert flood.held_count == MAX_HELD_NOTES and flood.remembered_count == MAX_REMEMBERED_NOTES
    assert len(flood.notes()) <= MAX_HELD_NOTES + MAX_REMEMBERED_NOTES
    # a jam's window: the last 2 s; a melody that only saw the notes of the last 3 s agrees
    end = now[0]
    recent = LiveMelody(clock=lambda: now[0])
    for t, pitch in events:
        if t >= end - 3.0:
            recent.note_on(pitch, at=t)
    for start, seconds in ((end - 2.0, 2.0), (end - 0.5, 1.0)):
        a, b = flood.chroma(start, seconds, RATE), recent.chroma(start, seconds, RATE)
        assert a.shape == (int(round(seconds * RATE)), 12)
        assert np.array_equal(a, b)


def test_held_notes_beyond_the_cap_end_the_oldest_first():
    now = [0.0]
    m = LiveMelody(clock=lambda: now[0], max_held=2)
    m.note_on(60)
    now[0] = 1.0
    m.note_on(64)
    now[0] = 2.0
    m.note_on(67)  # the third: 60, held longest, ends now
    assert sorted(p for p, _, off in m.notes() if off == float("inf")) == [64, 67]
    assert (60, 0.0, 2.0) in m.notes()


def test_jam_start_with_a_huge_stored_melody_leaves_the_daemon_answering(tmp_path, tiny_melody_dir):
    """Through `musicbridge serve` on a JACK dummy server: /jam/start on a track whose melody is
    2,048 notes over 100,000 beats at tempo 20 is answered, and a /ping sent right after it is
    answered before the jam's first chunk is reported."""
    from tests.bridge.osc_helpers import DaemonProcess, expect
    from tests.jack_server import jack_server

    presets = tmp_path / "presets"
    presets.mkdir()
    flat = [x for n in _notes(2048, 100_000.0, 5) for x in (int(n[0]), float(n[1]), float(n[2]))]
    with jack_server(rate=48000, period=256):
        d = DaemonProcess(tiny_melody_dir, tmp_path / "session", presets, "--audio", "default")
        try:
            with d.client() as c:
                d.wait_ready(c)
                c.send("/transport/tempo", 20.0)
                expect(c, "/ok")
                c.send("/track/lead/prompt", "sax")
                expect(c, "/ok")
                c.send("/track/lead/melody/notes", *flat)
                assert expect(c, "/ok") == ["/track/lead/melody/notes"]
                c.send("/jam/start", "lead")
                c.send("/ping")
                seen: list = []
                got = c.wait_for(lambda a, _: a == "/pong", 60.0, seen)
                assert got is not None, (seen, d.log_text())
                order = [a for a, _ in seen]
                assert "/error" not in order, seen
                assert "/jam/chunk" not in order, seen  # the OSC thread answered before any chunk
                assert "/ok" in order  # /jam/start itself was answered first
                c.send("/jam/stop", "lead")
        finally:
            assert d.stop(signal.SIGTERM) == 0, d.log_text()
