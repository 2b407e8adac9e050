"""A stem asked at a bar lands on that bar's true place under a tempo and meter map: `serve --follow jack`
with klick as JACK timebase master playing 8 bars of 4/4 at 97, 4 bars of 6/8 at 90 (quarters), then
4/4 at 120. Bar 9 starts at 8 x 4 quarters at 97 bpm = 19.794 s, where one constant tempo (120, the
tempo when it was asked) put it at 16.0 s. Also the Timeline's arithmetic on exact numbers."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time

import pytest

from plugin_host.bwf import read_bext
from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.bridge.osc_helpers import expect, stem_of
from tests.jack_server import jack_server

RATE = 48000
TEMPO_MAP = "8 4/4 97\n4 6/8 90\n8 4/4 120\n"
BAR9 = 8 * 4 * 60.0 / 97.0            # seconds: 8 bars of 4/4 at 97
BAR11 = BAR9 + 2 * 2.0                # + 2 bars of 6/8 (3 quarters) at 90
BAR13 = BAR9 + 4 * 2.0                # + 4 bars of 6/8
BAR14 = BAR13 + 2.0                   # + 1 bar of 4/4 at 120


@contextlib.contextmanager
def klick_master(map_file):
    """klick as JACK transport master following the tempo map file (stopped at frame 0)."""
    if shutil.which("klick") is None:
        raise AssertionError("klick is not installed (Debian package klick; run scripts/setup.sh)")
    map_file.write_text(TEMPO_MAP)
    p = subprocess.Popen(["klick", "-T", "-n", "mb-klick", "-f", str(map_file)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        yield p
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait(c, want, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while not want(st := transport_state(c)):
        assert time.monotonic() < deadline, (what, st)
        time.sleep(0.05)
    return st


def test_stems_land_on_their_bars_under_klicks_tempo_and_meter_map(tmp_path, tiny_model_dir):
    import jack

    with jack_server(rate=RATE), klick_master(tmp_path / "map.txt") as klick, \
            following_daemon(tiny_model_dir, tmp_path, "--follow", "jack") as (d, c):
        c.send("/track/drums/preset", "plain")
        expect(c, "/ok")
        probe = jack.Client("mb-test-probe", no_start_server=True)
        try:
            # Into the 6/8 part (bar 11), stopped: the meter and tempo there are followed.
            probe.transport_frame = round(BAR11 * RATE)
            st = _wait(c, lambda s: s["numerator"] == 6, 10, "6/8 at bar 11")
            assert (st["numerator"], st["denominator"]) == (6, 8) and st["tempo"] == pytest.approx(90.0, abs=1e-6)
            assert st["beat"] == pytest.approx(10 * 6, abs=0.01)  # bar 11 = 10 bars of six eighths
            # Roll on into the 4/4 part at 120 (bar 13 at 27.79 s), then ask for stems.
            probe.transport_start()
            st = _wait(c, lambda s: s["numerator"] == 4 and s["beat"] >= 13 * 4 + 0.5, 15, "4/4 at 120 past bar 14")
            assert st["tempo"] == pytest.approx(120.0, abs=1e-6) and st["playing"] == 1
            at9 = stem_of(c, "drums", 1, "bars", "at", 9)    # after the meter change: bar 9 is in the 4/4-at-97 past
            at11 = stem_of(c, "drums", 1, "bars", "at", 11)  # in the 6/8 part, where the transport was located
            at13 = stem_of(c, "drums", 1, "bars", "at", 13)  # the first bar at 120
            here = stem_of(c, "drums", 1, "bars")            # the bar line at or before where the transport is
            probe.transport_stop()
        finally:
            probe.close()
        assert klick.poll() is None, klick.stdout.read().decode(errors="replace")[-500:]
    # To the sample: the time reference is the bar line on klick's own timeline (transport frames).
    assert read_bext(at9)["time_reference"] == round(BAR9 * RATE), "bar 9"
    assert read_bext(at11)["time_reference"] == round(BAR11 * RATE), "bar 11"
    assert read_bext(at13)["time_reference"] == round(BAR13 * RATE), "bar 13"
    ref = read_bext(here)["time_reference"]
    bar = round((ref / RATE - BAR13) / 2.0) + 13
    assert bar >= 14 and ref == round((BAR13 + (bar - 13) * 2.0) * RATE), (ref, bar)


def test_timeline_places_bars_under_a_tempo_and_meter_map():
    from bridge.clock.grid import Timeline

    tl = Timeline()
    assert tl.seconds_at_bar(3.0) is None
    # A master that rounds its position down to whole ticks (1920 a beat), read at odd frames.
    rate, tpb = 48000, 1920
    parts = [(0, 8, 97.0, 4, 4), (8, 12, 90.0, 6, 8), (12, 20, 120.0, 4, 4)]
    start_s = 0.0
    for first, last, tempo, num, den in parts:
        bar_s = num * 240.0 / (tempo * den)
        frame = round(start_s * rate) + 37
        while frame / rate < start_s + (last - first) * bar_s:
            exact = first + (frame / rate - start_s) / bar_s  # bar position at this frame
            beats = (exact - first) * num
            floored = first + (int(beats) + int((beats % 1) * tpb) / tpb) / num  # whole ticks, rounded down
            late = 256 * (frame % 7 == 0)  # now and then a master that missed a cycle: its BBT a period old
            tl.observe(floored - late / rate / bar_s, tempo, num, den, seconds=frame / rate,
                       resolution=1.0 / (tpb * num))
            frame += 1013  # not a multiple of anything musical
        start_s += (last - first) * bar_s
    assert [(s.tempo, s.numerator) for s in tl.spans] == [(97.0, 4), (90.0, 6), (120.0, 4)]
    assert tl.seconds_at_bar(8.0) * rate == pytest.approx(BAR9 * rate, abs=0.5)
    assert tl.seconds_at_bar(12.0) * rate == pytest.approx(BAR13 * rate, abs=0.5)
    assert tl.seconds_at_bar(10.0) * rate == pytest.approx(BAR11 * rate, abs=0.5)
    assert tl.seconds_at_bar(4.0) == pytest.approx(4 * 240 / 97.0, abs=1e-5)
    assert tl.seconds_at_bar(25.0) == pytest.approx(BAR13 + 13 * 2.0, abs=1e-5)  # beyond: at the last tempo


def test_timeline_without_seconds_sums_the_observed_tempos():
    from bridge.clock.grid import Timeline

    tl = Timeline(tempo_tolerance=0.5)
    for k in range(40):  # 4/4 at 97 from bar 3 (a clock that continued from a song position)
        tl.observe(2.0 + k * 0.1, 97.0 + (0.01 if k % 2 else -0.01), 4, 4)
    for k in range(20):
        tl.observe(8.0 + k * 0.1, 120.0, 4, 4)
    assert len(tl.spans) == 2
    assert tl.seconds_at_bar(8.0) == pytest.approx(BAR9, abs=0.01)  # the first tempo reaches back to bar 1
    assert tl.seconds_at_bar(12.0) == pytest.approx(BAR9 + 8.0, abs=0.01)
