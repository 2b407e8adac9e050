"""`serve --follow jack`: the daemon follows a JACK timebase master on a private dummy JACK server."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.bridge.osc_helpers import expect
from tests.jack_server import jack_server

RATE = 48000
BPM = 97.0


@pytest.fixture
def jack_master():
    """jack_transport as timebase master at 97 bpm (stopped); its stdin stays open for more commands."""
    with jack_server(rate=RATE) as name:
        p = subprocess.Popen(["jack_transport"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True)
        p.stdin.write(f"master\ntempo {BPM:g}\n")
        p.stdin.flush()
        try:
            yield name, p
        finally:
            try:
                p.stdin.write("stop\nquit\n")
                p.stdin.close()
                p.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                p.kill()
                p.wait()


def test_transport_state_follows_the_jack_timebase_master(tmp_path, tiny_model_dir, jack_master):
    import jack

    _name, master = jack_master
    with following_daemon(tiny_model_dir, tmp_path, "--follow", "jack") as (d, c):
        probe = jack.Client("mb-test-probe", no_start_server=True)
        try:
            bar5 = round(16 * 60.0 / BPM * RATE)  # 4 bars of 4 beats before bar 5
            master.stdin.write(f"locate {bar5}\nplay\n")
            master.stdin.flush()
            deadline = time.monotonic() + 10
            while (st := transport_state(c))["source"] != "jack" or not st["playing"]:
                assert time.monotonic() < deadline, st
                time.sleep(0.1)
            assert st["tempo"] == pytest.approx(BPM, abs=0.01)
            assert (st["numerator"], st["denominator"]) == (4, 4)
            assert 0 <= st["age"] < 1.0
            # Where JACK says the transport is, asked at (almost) the same moment: within 0.1 beat.
            _state, pos = probe.transport_query()
            jack_beat = (pos["bar"] - 1) * 4 + (pos["beat"] - 1) + pos["tick"] / pos["ticks_per_beat"]
            st = transport_state(c)
            assert 16.0 <= jack_beat < 16.0 + 20 * BPM / 60.0, pos  # rolling from bar 5 for seconds, not more
            assert st["beat"] == pytest.approx(jack_beat, abs=0.1)
            # The followed transport is saved in the session (a restart resumes it).
            deadline = time.monotonic() + 5
            saved = tmp_path / "session" / "session.json"  # written once the daemon has saved
            while not saved.exists() or json.loads(saved.read_text())["transport"]["tempo"] != BPM:
                assert time.monotonic() < deadline, saved.exists() and saved.read_text()
                time.sleep(0.1)
            # Stopping the master stops the follower, and the position stays put.
            master.stdin.write("stop\n")
            master.stdin.flush()
            deadline = time.monotonic() + 5
            while (st := transport_state(c))["playing"]:
                assert time.monotonic() < deadline, st
                time.sleep(0.05)
            time.sleep(0.3)
            assert transport_state(c)["beat"] == pytest.approx(st["beat"], abs=1e-6)
            # /status names the leading clock too.
            c.send("/status")
            status = expect(c, "/status")
            assert status[5] == pytest.approx(BPM, abs=0.01) and status[6] == "4/4" and status[9] == "jack"
        finally:
            probe.close()


def test_follow_jack_without_a_server_is_a_clear_error(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("JACK_DEFAULT_SERVER", "mb-no-such-server")
    from tests.bridge.osc_helpers import DaemonProcess

    presets = tmp_path / "presets"
    presets.mkdir()
    d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets, "--follow", "jack")
    try:
        rc = d.proc.wait(120)
    finally:
        d.stop()
    assert rc == 2, d.log_text()
    assert "cannot follow the jack clock" in d.log_text() and "start jackd" in d.log_text()
