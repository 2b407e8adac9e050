"""Live notes: the rolling melody, and notes arriving through a real JACK MIDI port."""

from __future__ import annotations

import time

import numpy as np
import pytest

from bridge.live.notes import LiveMelody, MidiInput

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


CLOSE_UNDER_STREAM = r"""
import sys, threading, time
import mido
from bridge.midi.ports import MidiReader, open_input_port

out = mido.Backend("mido.backends.rtmidi/UNIX_JACK").open_output("mb-stream", virtual=True)
stop = threading.Event()

def stream():  # a dense stream of notes into whatever input is connected, never pausing for a close
    n = 0
    while not stop.is_set():
        out.send(mido.Message("note_on", note=60 + n % 12, velocity=1 + n % 126))
        n += 1
        time.sleep(0.0005)

threading.Thread(target=stream, daemon=True).start()
import jack
client = jack.Client("mb-patcher", no_start_server=True)
total = 0
for i in range(40):
    got = []
    def slow(data, _driver_t):  # a handler that takes its time: it runs on the port's reader, not JACK's thread
        got.append(data[1])
        time.sleep(0.001)
    with MidiReader(open_input_port("UNIX_JACK", None, f"mb-in-{i}"), slow, f"mb-in-{i}"):
        src = [p.name for p in client.get_ports(is_midi=True, is_output=True) if "mb-stream" in p.name][0]
        dst = [p.name for p in client.get_ports(is_midi=True, is_input=True) if f"mb-in-{i}" in p.name][0]
        client.connect(src, dst)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.001)
    assert got and all(60 <= n < 72 for n in got), got[:10]
    total += len(got)
stop.set()
print("opened and closed 40 times under a stream; messages", total)
"""


def test_a_port_closed_while_messages_stream_in_closes_cleanly(tmp_path):
    """Closing an input while the MIDI system delivers to it, 40 times: in a child process, so a crash
    in the MIDI library is a failure here rather than the end of the test run."""
    import subprocess
    import sys

    from tests.bridge.osc_helpers import ROOT
    from tests.jack_server import jack_server

    with jack_server():
        r = subprocess.run([sys.executable, "-c", CLOSE_UNDER_STREAM], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    assert "opened and closed 40 times" in r.stdout
