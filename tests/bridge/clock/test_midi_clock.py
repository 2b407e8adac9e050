"""`serve --follow midi-clock:PORT`: 24 ppqn clock, Start/Stop/Continue and Song Position Pointer over a
real JACK MIDI port, with the clock's timing jittered by +-1 ms."""

from __future__ import annotations

import random
import time

import pytest

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.jack_server import jack_server

PORT = "mb-clock-in"


def _clock_out():
    import rtmidi

    out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="mb-test-clock")
    deadline = time.monotonic() + 10
    while not (names := [i for i, n in enumerate(out.get_ports()) if PORT in n]):
        assert time.monotonic() < deadline, out.get_ports()
        time.sleep(0.1)
    out.open_port(names[0])
    return out


def _send_clocks(out, bpm: float, count: int, jitter: float, rng: random.Random) -> None:
    """`count` clocks at `bpm`, each sent up to `jitter` seconds early or late (never drifting)."""
    interval = 60.0 / bpm / 24
    t0 = time.monotonic()
    for k in range(count):
        due = t0 + k * interval + rng.uniform(-jitter, jitter)
        while (left := due - time.monotonic()) > 0:
            time.sleep(left)
        out.send_message([0xF8])


def test_midi_clock_tempo_position_and_transport(tmp_path, tiny_model_dir):
    rng = random.Random(11)
    with jack_server(), following_daemon(tiny_model_dir, tmp_path, "--follow", f"midi-clock:{PORT}") as (d, c):
        out = _clock_out()
        try:
            assert transport_state(c)["source"] == "midi-clock"
            # Song Position Pointer to bar 3 (32 sixteenths = 8 beats), then Continue and 2 bars of clock.
            out.send_message([0xF2, 32 & 0x7F, 32 >> 7])
            out.send_message([0xFB])
            _send_clocks(out, 120.0, 2 * 96 + 1, 0.001, rng)  # the first clock is the downbeat itself
            st = transport_state(c)
            assert st["playing"] == 1
            assert st["tempo"] == pytest.approx(120.0, abs=0.5)
            assert st["beat"] == pytest.approx(16.0, abs=0.25)  # bar 3 + 2 bars, give or take a clock
            # Stop: the position stays where the clock left it.
            out.send_message([0xFC])
            time.sleep(0.2)
            stopped = transport_state(c)
            assert stopped["playing"] == 0
            time.sleep(0.3)
            assert transport_state(c)["beat"] == pytest.approx(stopped["beat"], abs=1e-6)
            # Start: from the top at a new tempo; 2 bars later it has followed the change.
            out.send_message([0xFA])
            _send_clocks(out, 97.0, 2 * 96 + 1, 0.001, rng)
            st = transport_state(c)
            assert st["playing"] == 1
            assert st["tempo"] == pytest.approx(97.0, abs=0.5)
            assert st["beat"] == pytest.approx(8.0, abs=0.25)
        finally:
            out.close_port()
            del out


def test_midi_clock_port_name_is_required():
    from bridge.clock import parse_follow

    with pytest.raises(ValueError, match="midi-clock:PORT"):
        parse_follow("midi-clock")
    assert parse_follow("midi-clock:Clock Out").port == "Clock Out"
