"""`serve --follow midi-clock:PORT`: 24 ppqn clock, Start/Stop/Continue and Song Position Pointer over a
real JACK MIDI port, with the clock's timing jittered by +-1 ms."""

from __future__ import annotations

import random
import time

import pytest

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.jack_server import jack_server, jack_server_process

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


def test_a_stamp_is_the_driver_time_plus_the_smallest_recent_read_delay():
    from bridge.clock.grid import Grid
    from bridge.clock.midi_clock import STAMP_WINDOW, MidiClockFollower

    f = MidiClockFollower(PORT, Grid(tempo=120.0))
    # read 3 ms after arrival, then a 150 ms stall delays three reads, then 1 ms: offset 100 + delay
    assert f.stamp(0.0, 100.003) == pytest.approx(100.003)
    assert f.stamp(0.02, 100.170) == pytest.approx(100.023)  # the stall does not move the clock's time
    assert f.stamp(0.04, 100.171) == pytest.approx(100.043)
    assert f.stamp(0.06, 100.061) == pytest.approx(100.061)  # a quicker read lowers the offset
    assert f.stamp(0.08, 100.090) == pytest.approx(100.081)
    # once the quick read is older than the window, the smallest offset within it rules
    late = 0.06 + STAMP_WINDOW + 0.5
    assert f.stamp(late, 100.0 + late + 0.004) == pytest.approx(100.0 + late + 0.004)


STALL_SENDER = r"""
import sys, time, rtmidi
out = rtmidi.MidiOut(rtmidi.API_UNIX_JACK, name="mb-test-clock")
deadline = time.monotonic() + 10
while not (names := [i for i, n in enumerate(out.get_ports()) if sys.argv[1] in n]):
    assert time.monotonic() < deadline, out.get_ports()
    time.sleep(0.05)
out.open_port(names[0])
# the test connects a probe too; the clocks start once both listen
import jack
jc = jack.Client("mb-test-clock-watch", no_start_server=True)
mine = [p for p in jc.get_ports(is_midi=True, is_output=True) if p.name.startswith("mb-test-clock:")]
while len(jc.get_all_connections(mine[0])) < 2:
    assert time.monotonic() < deadline + 10, jc.get_all_connections(mine[0])
    time.sleep(0.05)
jc.close()
time.sleep(0.5)  # the connections settle before the first message
out.send_message([0xFA])
interval, t0 = 60.0 / 120.0 / 24, time.monotonic()
for k in range(4 * 96):  # four bars at 120 bpm, on time
    while (left := t0 + k * interval - time.monotonic()) > 0:
        time.sleep(left)
    out.send_message([0xF8])
# rtmidi's JACK output hands messages to JACK's next cycle; a process that exits at once can take the
# last clock with it. Closing the port after a few cycles lets it go out.
time.sleep(0.2)
out.close_port()
print("sent")
"""


def test_a_stall_in_the_daemon_does_not_move_the_followed_tempo(tmp_path):
    """Clocks sent on time by another process while this one holds the interpreter lock for 200 ms,
    twice: every delivered clock is counted, and every tempo published after the first bar stays
    within 0.5 bpm of 120."""
    import subprocess
    import sys

    import jack
    import rtmidi

    from bridge.clock.grid import Grid
    from bridge.clock.midi_clock import MidiClockFollower
    from tests.bridge.osc_helpers import ROOT

    published = []
    # The server and the sender run at real-time priority, as a DAW's clock does, so that the clocks
    # leave on time even when the machine is busy and only the daemon's own stall is under test.
    # A probe on the sender's port counts what JACK delivered: under heavy load rtmidi's own JACK
    # output can lose a message before JACK sees it, and what the follower must not lose is what
    # was delivered.
    with jack_server_process(realtime=True) as server, jack.Client("mb-test-probe", no_start_server=True) as jc:
        probe = rtmidi.MidiIn(rtmidi.API_UNIX_JACK, name="mb-test-probe-in", queue_size_limit=4096)
        probe.ignore_types(timing=False)
        probe.open_virtual_port("in")
        delivered = []
        with MidiClockFollower(PORT, Grid(tempo=90.0), on_update=published.append, api="jack") as f:
            sender = subprocess.Popen(["chrt", "-f", "20", sys.executable, "-c", STALL_SENDER, PORT], cwd=ROOT,
                                      stdout=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 20
                while not (outs := jc.get_ports("mb-test-clock:", is_midi=True, is_output=True)):
                    assert time.monotonic() < deadline and sender.poll() is None, "the sender never opened its port"
                    time.sleep(0.02)
                jc.connect(outs[0], jc.get_ports("mb-test-probe-in:", is_midi=True, is_input=True)[0])
                while f.clocks < 96:  # the first bar
                    time.sleep(0.01)
                t = time.perf_counter()
                sum(range(1_000_000))
                n = int(1_000_000 * 0.2 / max(time.perf_counter() - t, 1e-4))  # about 200 ms of it
                for _ in range(2):
                    sum(range(n))  # one C call that keeps the interpreter lock while clocks arrive
                    time.sleep(0.3)
                out, _ = sender.communicate(timeout=60)
            finally:
                sender.kill()
            assert out.strip() == "sent"
            time.sleep(0.5)
            while (m := probe.get_message()) is not None:
                delivered.append(m[0][0])
            clocks = delivered.count(0xF8)
            deadline = time.monotonic() + 10
            while f.clocks < clocks - 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        probe.close_port()
        probe.delete()
        jackd_says = server.log_text()
    assert delivered[0] == 0xFA and clocks >= 3 * 96, delivered[:3]
    # Every delivered clock was counted (the first is the downbeat itself), but for cycles that the
    # follower's own JACK client missed: a client that misses cycles loses events from them (a
    # receiver stopped for 100 ms three times lost 3 of 200 clocks, with 32 "not finished" lines
    # naming it), and at 120 bpm a 256-frame cycle holds one clock at most. The follower runs no
    # Python in that thread; a cycle it missed is the machine's.
    missed = jackd_says.count("client = musicbridge was not finished")
    assert clocks - 1 - missed <= f.clocks <= clocks - 1, (f.clocks, clocks, jackd_says[-3000:])
    tempos = [g.tempo for g in published[96:]]
    assert len(tempos) >= 2 * 96
    assert max(abs(t - 120.0) for t in tempos) < 0.5, (min(tempos), max(tempos))
