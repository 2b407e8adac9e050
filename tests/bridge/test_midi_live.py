"""Live notes: the rolling melody, and notes arriving through a real JACK MIDI port."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bridge.midi import LiveMelody, MidiInput

RATE = 7.8125


def test_rolling_melody_highest_note_and_silence():
    now = [100.0]
    m = LiveMelody(clock=lambda: now[0])
    m.note_on(48)
    now[0] = 100.5
    m.note_on(64)
    now[0] = 101.0
    m.note_off(64)
    now[0] = 101.5
    m.note_off(48)
    c = m.chroma(100.0, 2.0, RATE)
    centres = 100.0 + (np.arange(len(c)) + 0.5) / RATE
    for t, row in zip(centres, c):
        want = 4 if 100.5 <= t < 101.0 else 0 if t < 101.5 else None
        if want is None:
            assert row.sum() == 0
        else:
            assert row.argmax() == want and row.sum() == 1


def test_held_note_sounds_until_released():
    now = [10.0]
    m = LiveMelody(clock=lambda: now[0])
    m.note_on(67)
    now[0] = 12.0
    assert (m.chroma(10.0, 2.0, RATE).argmax(axis=1) == 7).all()
    m.all_off()
    assert m.chroma(12.5, 1.0, RATE).sum() == 0
    with pytest.raises(ValueError):
        m.note_on(200)


def test_jack_midi_notes_reach_the_melody():
    import mido

    from tests.jack_server import jack_server

    with jack_server():
        melody = LiveMelody()
        with MidiInput(melody, api="UNIX_JACK", virtual_name="mb-live-in"):
            backend = mido.Backend("mido.backends.rtmidi/UNIX_JACK")
            names = [n for n in backend.get_output_names() if "mb-live-in" in n]
            assert names, backend.get_output_names()
            with backend.open_output(names[0]) as keys:
                t0 = time.monotonic()
                keys.send(mido.Message("note_on", note=62, velocity=90))
                deadline = time.monotonic() + 10
                while melody.chroma(t0, 0.2, RATE)[-1].sum() == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(0.3)
                keys.send(mido.Message("note_on", note=69, velocity=90))
                keys.send(mido.Message("note_off", note=62))
                time.sleep(0.4)
                t1 = time.monotonic()
        c = melody.chroma(t0, t1 - t0, 20.0)
        bins = [int(r.argmax()) for r in c if r.sum() > 0]
        assert bins and bins[0] == 2 and bins[-1] == 9 and set(bins) == {2, 9}
        assert melody.chroma(t1 + 0.5, 1.0, RATE).sum() == 0  # closing the input releases held notes
