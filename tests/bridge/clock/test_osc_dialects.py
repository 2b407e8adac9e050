"""`serve --follow osc`: REAPER's default pattern, Bitwig's DrivenByMoss and Ardour's feedback, sent over
real UDP to the daemon's own port; the Ardour test socket also checks the /set_surface/feedback handshake."""

from __future__ import annotations

import time

import pytest
import soundfile as sf

from bridge.osc.udp import OscClient
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


def _port_8000():
    """A socket standing for port 8000, where Ardour's default Manual port mode sends feedback (a free
    port: port 8000 itself may be taken on a shared machine)."""
    s = OscClient("127.0.0.1", 0)
    s.sock.settimeout(0.05)
    return s


def test_ardour_with_its_default_manual_port_mode_is_followed(tmp_path, tiny_model_dir):
    """Ardour's defaults (Port Mode: Manual, reply port 8000): the handshake's /set_surface/port 0 makes it
    answer the daemon's own port; play, position, derived tempo and stop are followed."""
    from tests.bridge.clock.ardour_standin import ArdourStandIn

    p8000 = _port_8000()
    try:
        with ArdourStandIn(manual_port=p8000.port, bpm=97.0, beat=16.0) as ardour, \
                following_daemon(tiny_model_dir, tmp_path, "--follow", "osc",
                                 "--ardour", f"127.0.0.1:{ardour.port}") as (d, c):
            ardour.wait_for_surface()
            assert [a for a, _ in ardour.received[:2]] == ["/set_surface/port", "/set_surface/feedback"]
            assert ardour.received[1][1] == [48]
            assert list(ardour.surfaces) == [("127.0.0.1", d.port)]  # feedback to the daemon's port
            ardour.play(True)  # the user presses play in Ardour
            time.sleep(2.0)
            before = ardour.position()
            st = transport_state(c)
            after = ardour.position()
            assert st["source"] == "osc" and st["playing"] == 1 and 0 <= st["age"] < 1.0
            assert st["tempo"] == pytest.approx(97.0, abs=0.5)  # derived from how the BBT advances
            # Between where Ardour's playhead stood just before the question and just after the answer
            # (less a tick's rounding and the fit's slack), however slowly the machine ran.
            assert before - 0.15 <= st["beat"] <= after + 0.15, (before, st["beat"], after)
            c.send("/status")
            assert len(expect(c, "/status")) == 15  # no note: nothing to change
            ardour.play(False)
            st = _settle(c, lambda s: s["playing"] == 0)
            assert st["beat"] == pytest.approx(ardour.position(), abs=0.15)
            # Nothing went to port 8000, and nothing of Ardour's feedback was answered.
            assert [m for m in drain(p8000, 0.3)] == []
            assert all(a.startswith("/set_surface/") for a, _ in ardour.received), ardour.received
    finally:
        p8000.sock.close()


def test_ardour_in_auto_port_mode_is_followed(tmp_path, tiny_model_dir):
    from tests.bridge.clock.ardour_standin import ArdourStandIn

    with ArdourStandIn(manual_port=1, auto=True, bpm=120.0, beat=0.0) as ardour, \
            following_daemon(tiny_model_dir, tmp_path, "--follow", "osc",
                             "--ardour", f"127.0.0.1:{ardour.port}") as (d, c):
        ardour.wait_for_surface()
        ardour.play(True)
        time.sleep(1.5)
        st = transport_state(c)
        assert st["playing"] == 1 and st["tempo"] == pytest.approx(120.0, abs=0.5)
        assert st["beat"] == pytest.approx(ardour.position(), abs=0.15)


def test_ardour_that_answers_port_8000_only_is_explained_in_the_log_and_status(tmp_path, tiny_model_dir):
    """An Ardour that ignores /set_surface/port keeps sending to port 8000: the daemon hears nothing, and
    /status and the log say what to change in Ardour."""
    from tests.bridge.clock.ardour_standin import ArdourStandIn

    p8000 = _port_8000()
    try:
        with ArdourStandIn(manual_port=p8000.port, honours_set_port=False) as ardour, \
                following_daemon(tiny_model_dir, tmp_path, "--follow", "osc",
                                 "--ardour", f"127.0.0.1:{ardour.port}") as (d, c):
            ardour.play(True)
            deadline = time.monotonic() + 15
            while True:
                c.send("/status")
                status = expect(c, "/status")
                if len(status) == 16:
                    break
                assert time.monotonic() < deadline, status
                time.sleep(0.2)
            note = status[15]
            assert f"no feedback from Ardour at 127.0.0.1:{ardour.port}" in note
            assert "Port Mode to Auto" in note and "Reply Manual Port" in note
            assert status[9] == "osc" and status[10] == -1.0  # never heard
            assert "Port Mode to Auto" in d.log_text()
            got = [p8000.receive(0.5) for _ in range(5)]  # Ardour keeps talking, to port 8000
            assert any(m is not None and m[0] == "/position/bbt" for m in got), got
    finally:
        p8000.sock.close()


def test_the_note_on_a_silent_ardour_is_in_the_log_once_as_soon_as_status_can_show_it(monkeypatch, caplog):
    """/status reads the note when it asks; the log used to get it only at the next handshake, so a
    client could see it in /status before the log said it."""
    import logging

    from bridge.clock import osc_dialects
    from bridge.clock.grid import Grid

    monkeypatch.setattr(osc_dialects, "NOTE_AFTER", 0.0)
    f = osc_dialects.OscDialectFollower(Grid(), ardour=("127.0.0.1", 1), send=lambda *a: None)
    with caplog.at_level(logging.WARNING, logger=osc_dialects.log.name):
        f.handshake()  # the first handshake; Ardour never answers
        caplog.clear()
        assert "Port Mode to Auto" in f.note
        assert [r.getMessage() for r in caplog.records] == [f.note]
        f.handshake()
        assert f.note and len(caplog.records) == 1  # once


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


def test_ardour_playhead_that_stands_still_is_a_stop():
    """Ardour 7.3 reports /position/bbt only while its playhead moves, and a locate that stops a rolling
    transport sends no /transport_stop (tests/bridge/clock/test_ardour_real.py): with --ardour, playing
    with no report for HELD_AFTER seconds stops at the last reported position; two reports in a row that
    each move a little ahead play again, a lone report (a locate while stopped) does not."""
    from bridge.clock.grid import Grid
    from bridge.clock.osc_dialects import HELD_AFTER, OscDialectFollower, parse

    now = [100.0]
    f = OscDialectFollower(Grid(), clock=lambda: now[0], ardour=("127.0.0.1", 1), send=lambda *a: None)

    def feed(address, value, at):
        now[0] = at
        f.feed(parse(address, [value]))

    feed("/transport_play", 1.0, 100.0)
    for i in range(6):  # 120 bpm: a fifth of a beat every 100 ms, from bar 2
        feed("/position/bbt", f"002|01|{384 * i:04d}", 100.05 + 0.1 * i)
    feed("/position/bbt", "006|01|0000", 100.6)  # locate to bar 6 that stops Ardour: one report, no stop
    now[0] = 100.6 + HELD_AFTER - 0.01
    f.hold_if_still()
    assert f.grid.playing  # reports are due only every 100 ms: not yet
    now[0] = 100.6 + HELD_AFTER + 0.01
    f.hold_if_still()
    g = f.grid
    assert not g.playing and g.beat_at(now[0] + 5.0) == pytest.approx(20.0)
    feed("/position/bbt", "003|01|0000", 102.0)  # a locate while stopped
    feed("/position/bbt", "003|01|0096", 104.0)  # ... and another, just ahead of it
    assert not f.grid.playing and f.grid.beat_at(105.0) == pytest.approx(8.05)
    feed("/position/bbt", "003|01|0480", 104.1)  # the playhead moves on (a locate and roll)
    g = f.grid
    assert g.playing and g.beat_at(104.1) == pytest.approx(8.25)
    now[0] = 104.1 + HELD_AFTER + 0.01
    f.hold_if_still()
    assert not f.grid.playing
    feed("/transport_play", 1.0, 105.0)  # Ardour's own word: playing
    assert f.grid.playing
    feed("/transport_stop", 1.0, 105.1)
    now[0] = 110.0
    f.hold_if_still()
    feed("/position/bbt", "004|01|0000", 110.1)
    feed("/position/bbt", "004|01|0192", 110.2)
    assert not f.grid.playing  # stopped by Ardour's word: only its word plays again


def test_reaper_without_ardour_is_never_held():
    from bridge.clock.grid import Grid
    from bridge.clock.osc_dialects import OscDialectFollower, parse

    now = [100.0]
    f = OscDialectFollower(Grid(), clock=lambda: now[0])
    f.feed(parse("/play", [1.0]))
    f.feed(parse("/beat/str", ["5.1.00"]))
    now[0] = 160.0  # REAPER's default pattern may send no position for a minute
    f.hold_if_still()
    assert f.grid.playing
