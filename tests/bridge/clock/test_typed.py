"""The default clock, `typed`: /transport/* messages, with the position running while it plays."""

from __future__ import annotations

import time

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.bridge.osc_helpers import expect

EPS = 1e-6  # beats: rounding only


def test_typed_transport_runs_while_playing_and_keeps_its_beat_across_a_tempo_change(tmp_path, tiny_model_dir):
    with following_daemon(tiny_model_dir, tmp_path) as (d, c):
        # The daemon's clock is time.monotonic (--audio none). Each change happened between its
        # sending and its /ok, each reading between asking and the answer: the beat lies between
        # the bounds those instants give, however slowly the machine runs.
        def change(address, *args):
            """Send a change; the instants before sending and after its /ok bound when it happened."""
            before = time.monotonic()
            c.send(address, *args)
            expect(c, "/ok")
            return before, time.monotonic()

        def read_after(seconds):
            """The transport `seconds` on; the instants before asking and after the answer."""
            time.sleep(seconds)
            asked = time.monotonic()
            st = transport_state(c)
            return st, asked, time.monotonic()

        t_play, t_playing = change("/transport/play", 8.0)
        st, t_ask, t_got = read_after(1.0)
        assert st["source"] == "typed" and st["playing"] == 1 and 0 <= st["age"] <= t_got - t_play + EPS
        assert 8.0 + (t_ask - t_playing) * 2.0 - EPS <= st["beat"] <= 8.0 + (t_got - t_play) * 2.0 + EPS
        t_change, t_changed = change("/transport/tempo", 60.0)  # a tempo change keeps the beat that is sounding
        st, t_ask, t_got = read_after(1.0)
        assert st["tempo"] == 60.0
        low = 8.0 + (t_change - t_playing) * 2.0 + (t_ask - t_changed) * 1.0
        high = 8.0 + (t_changed - t_play) * 2.0 + (t_got - t_change) * 1.0
        assert low - EPS <= st["beat"] <= high + EPS
        c.send("/transport/stop")
        expect(c, "/ok")
        stopped = transport_state(c)["beat"]
        time.sleep(0.3)
        assert transport_state(c)["beat"] == stopped and stopped > 10.0
        c.send("/transport/locate", 32.0)
        expect(c, "/ok")
        assert transport_state(c)["beat"] == 32.0
