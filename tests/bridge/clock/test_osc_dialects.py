"""`serve --follow osc`: REAPER's default pattern, Bitwig's DrivenByMoss and Ardour's feedback, sent over
real UDP to the daemon's own port; the Ardour test socket also checks the /set_surface/feedback handshake."""

from __future__ import annotations

import time

import pytest
import soundfile as sf

from bridge.osc.udp import OscClient, decode
from tests.bridge.clock.helpers import following_daemon, transport_state
from plugin_host.bwf import read_bext
from tests.bridge.osc_helpers import drain, expect


def _settle(c, want, timeout=3.0):
    deadline = time.monotonic() + timeout
    while not want(st := transport_state(c)):
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    return st


def test_reaper_and_bitwig_feedback(tmp_path, tiny_model_dir):
    with following_daemon(tiny_model_dir, tmp_path, "--follow", "osc") as (d, c):
        daw = OscClient("127.0.0.1", 0)  # REAPER / Bitwig: sends feedback to the daemon's port
        daw.target = ("127.0.0.1", d.port)
        try:
            st = transport_state(c)
            assert st["source"] == "osc" and st["age"] == -1.0  # nothing heard yet
            daw.send("/tempo/raw", 97.0)
            daw.send("/beat/str", "5.1.00")
            daw.send("/play", 1.0)
            daw.send("/stop", 0.0)
            t_sent = time.monotonic()
            st = _settle(c, lambda s: s["playing"] == 1)
            assert st["tempo"] == pytest.approx(97.0, abs=1e-3)
            assert 0 <= st["age"] < 1.0
            elapsed = time.monotonic() - t_sent
            assert 16.0 <= st["beat"] <= 16.0 + (elapsed + 0.05) * 97 / 60
            # Feedback is never answered (a DAW would take /error replies for its own input).
            assert [a for a, _ in drain(daw, 0.3)] == []
            # /stop 1: stopped where it was; then a position from /time alone (no /beat/str for a second).
            daw.send("/stop", 1.0)
            st = _settle(c, lambda s: s["playing"] == 0)
            time.sleep(1.1)
            daw.send("/time", 12.0)
            st = _settle(c, lambda s: abs(s["beat"] - 12.0 * 97 / 60) < 1e-3)
            # Bitwig (DrivenByMoss): a time signature and its four-part beat string.
            daw.send("/time/signature", "3 / 4")
            daw.send("/beat/str", "2.1.1.00")
            st = _settle(c, lambda s: s["numerator"] == 3)
            assert (st["numerator"], st["denominator"]) == (3, 4)
            assert st["beat"] == pytest.approx(3.0)
            # Bad feedback is logged and dropped; the daemon still answers its own protocol.
            daw.send("/tempo/raw", "fast")
            daw.send("/beat/str", "one")
            assert transport_state(c)["tempo"] == pytest.approx(97.0, abs=1e-3)
            # The followed clock drives stems: 1 bar of 3/4 at 97 bpm, placed on bar 2 (beat 3).
            c.send("/track/drums/preset", "plain")
            expect(c, "/ok")
            c.send("/track/drums/generate", 1, "bars")
            job, _ = expect(c, "/job/accepted")
            r = c.wait_for(lambda a, v: a in ("/job/done", "/error") and v and (v[0] == job or v[-1] == job), 120)
            assert r is not None and r[0] == "/job/done", r
            path = r[1][1]
            info = sf.info(path)
            assert info.frames == round(3 * 60 / 97 * info.samplerate)
            assert read_bext(path)["time_reference"] == round(3 * 60 / 97 * info.samplerate)
        finally:
            daw.sock.close()


def test_ardour_handshake_and_derived_tempo(tmp_path, tiny_model_dir):
    ardour = OscClient("127.0.0.1", 0)  # plays Ardour's OSC surface port
    try:
        with following_daemon(tiny_model_dir, tmp_path, "--follow", "osc",
                              "--ardour", f"127.0.0.1:{ardour.port}") as (d, c):
            # The daemon asks "Ardour" for transport (16) and bar/beat (32) feedback.
            ardour.sock.settimeout(10)
            data, sender = ardour.sock.recvfrom(65536)
            (address, args), = [m for m in decode(data)]
            assert address == "/set_surface/feedback" and args == [48]
            assert sender[1] == d.port  # from the daemon's own port, where Ardour then sends feedback
            # Ardour's feedback: rolling from bar 5 at 97 bpm, BBT every 50 ms (ticks of 1920 a beat).
            ardour.target = ("127.0.0.1", d.port)
            ardour.send("/transport_stop", 0.0)
            ardour.send("/transport_play", 1.0)
            ardour.send("/heartbeat", 1.0)       # Ardour's other feedback is dropped quietly
            ardour.send("/master/gain", -3.0)
            t0 = time.monotonic()
            while (dt := time.monotonic() - t0) < 2.0:
                beat = 16.0 + dt * 97.0 / 60.0
                bar, rest = divmod(beat, 4.0)
                ardour.send("/position/bbt", f"{int(bar) + 1:03d}|{int(rest) + 1:02d}|{int(rest % 1 * 1920):04d}")
                time.sleep(0.05)
            st = transport_state(c)
            t_got = time.monotonic()
            assert st["source"] == "osc" and st["playing"] == 1
            assert st["tempo"] == pytest.approx(97.0, abs=0.5)  # derived from how the BBT advances
            # At least the last position sent (less a tick's rounding and the fit's slack); at most where
            # Ardour's playhead stood when the answer came back: however slowly the machine ran.
            assert beat - 0.15 <= st["beat"] <= 16.0 + (t_got - t0) * 97 / 60 + 0.15
            ardour.send("/transport_play", 0.0)
            ardour.send("/transport_stop", 1.0)
            st = _settle(c, lambda s: s["playing"] == 0)
            # Nothing of Ardour's feedback was answered.
            ardour.sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                ardour.sock.recvfrom(65536)
    finally:
        ardour.sock.close()


def test_feedback_is_ignored_when_following_typed(tmp_path, tiny_model_dir):
    with following_daemon(tiny_model_dir, tmp_path) as (d, c):
        drain(c, 0.1)
        c.send("/tempo/raw", 97.0)
        c.send("/play", 1.0)
        assert [a for a, _ in drain(c, 0.3)] == []  # not followed, not answered
        st = transport_state(c)
        assert st["source"] == "typed" and st["tempo"] == 120.0 and st["playing"] == 0


def test_serve_refuses_ardour_without_follow_osc_and_unknown_sources(tmp_path):
    import subprocess
    import sys

    from tests.bridge.osc_helpers import ROOT

    for extra, says in ((["--ardour", "127.0.0.1:3819"], "only --follow osc follows"),
                        (["--follow", "ableton"], "--follow must be typed, jack, link, midi-clock:PORT or osc"),
                        (["--follow", "osc", "--ardour", "3819"], "expected HOST:PORT")):
        r = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", "tiny", "--session-dir",
                            str(tmp_path / "s"), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and says in r.stderr, (extra, r.stderr)
