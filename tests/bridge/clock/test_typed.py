"""The default clock, `typed`: /transport/* messages, with the position running while it plays."""

from __future__ import annotations

import time

import pytest

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.bridge.osc_helpers import expect


def test_typed_transport_runs_while_playing_and_keeps_its_beat_across_a_tempo_change(tmp_path, tiny_model_dir):
    with following_daemon(tiny_model_dir, tmp_path) as (d, c):
        c.send("/transport/play", 8.0)
        expect(c, "/ok")
        t0 = time.monotonic()
        time.sleep(1.0)
        st = transport_state(c)
        assert st["source"] == "typed" and st["playing"] == 1 and 0 <= st["age"] < 2.0
        assert st["beat"] == pytest.approx(8.0 + (time.monotonic() - t0) * 2.0, abs=0.1)
        c.send("/transport/tempo", 60.0)  # a tempo change keeps the beat that is sounding
        expect(c, "/ok")
        before = 8.0 + (time.monotonic() - t0) * 2.0
        t1 = time.monotonic()
        time.sleep(1.0)
        st = transport_state(c)
        assert st["tempo"] == 60.0
        assert st["beat"] == pytest.approx(before + (time.monotonic() - t1) * 1.0, abs=0.1)
        c.send("/transport/stop")
        expect(c, "/ok")
        stopped = transport_state(c)["beat"]
        time.sleep(0.3)
        assert transport_state(c)["beat"] == stopped and stopped > 10.0
        c.send("/transport/locate", 32.0)
        expect(c, "/ok")
        assert transport_state(c)["beat"] == 32.0
