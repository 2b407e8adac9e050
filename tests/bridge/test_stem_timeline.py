"""A stem's BWF time reference is its place on the DAW timeline: the bar line at or before the
transport position when it was asked for, or the bar named with `at`; the done list names it."""

from __future__ import annotations

import json

import soundfile as sf

from plugin_host.bwf import read_bext
from tests.bridge.clock.helpers import following_daemon
from tests.bridge.osc_helpers import expect, stem_of


def test_stems_land_on_the_bar_line(tmp_path, tiny_model_dir):
    with following_daemon(tiny_model_dir, tmp_path) as (d, c):
        c.send("/track/drums/preset", "plain")
        expect(c, "/ok")
        c.send("/transport/tempo", 120.0)
        expect(c, "/ok")
        c.send("/transport/locate", 32.0)
        expect(c, "/ok")
        stems = {"located": stem_of(c, "drums", 1, "bars")}
        c.send("/transport/locate", 34.5)  # inside bar 9: snapped back to its bar line
        expect(c, "/ok")
        stems["snapped"] = stem_of(c, "drums", 1.0, "bars", 3)  # Pd sends floats; with a priority
        stems["at bar 9"] = stem_of(c, "drums", 1, "bars", "at", 9)
        stems["at bar 9 prio"] = stem_of(c, "drums", 0.5, 2, "at", 9.0)
        c.send("/transport/locate", 0.0)
        expect(c, "/ok")
        stems["start"] = stem_of(c, "drums", 1, "bars")
        c.send("/track/drums/generate", 1, "bars", "at", 0)
        err = expect(c, "/error")
        assert err[0] == "bad_args" and "bar" in err[1]
        for name, path in stems.items():
            rate = sf.info(path).samplerate
            want = 0 if name == "start" else round(16.0 * rate)
            assert read_bext(path)["time_reference"] == want, name
            side = json.loads(open(path.rsplit(".", 1)[0] + ".json").read())
            assert side["timeline"]["bar"] == (1 if name == "start" else 9), side["timeline"]
        done = (tmp_path / "session" / "done-list.txt").read_text().splitlines()
        assert [ln.split("\t")[2] for ln in done] == list(stems.values())
        assert all(ln.split("\t")[1] == "drums" for ln in done)
