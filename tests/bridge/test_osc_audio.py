"""`musicbridge serve --audio default` on a private JACK server (dummy driver): xruns in /status, jam over OSC."""

from __future__ import annotations

import signal
import time

from tests.bridge.osc_helpers import PLAIN_PRESET, DaemonProcess, expect
from tests.jack_server import jack_server


def test_serve_with_live_output_reports_xruns(tmp_path, tiny_model_dir):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    with jack_server(rate=48000, period=256):  # the daemon inherits JACK_DEFAULT_SERVER
        d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets, "--audio", "default")
        try:
            with d.client() as c:
                d.wait_ready(c)
                c.send("/status")
                status = expect(c, "/status")
                assert isinstance(status[4], int) and status[4] >= 0  # -1 would mean no live output

                c.send("/jam/start", "nobody")
                assert expect(c, "/error")[0] == "not_found"
                c.send("/track/lead/preset", "plain")
                expect(c, "/ok")
                c.send("/jam/start", "lead")
                assert expect(c, "/ok") == ["/jam/start"]
                c.send("/jam/start", "lead")
                assert expect(c, "/error")[0] == "bad_args"
                deadline = time.monotonic() + 60
                while True:  # poll until the first chunk is queued on the output (bounded, not timed)
                    c.send("/jam/status", "lead")
                    st = expect(c, "/jam/status")
                    if st[3] >= 1 or time.monotonic() > deadline:
                        break
                    time.sleep(0.2)
                assert st[0] == "lead" and st[1] in ("playing", "starting") and st[3] >= 1, st
                assert st[6] == "", st  # no error
                c.send("/jam/stop", "lead")
                assert expect(c, "/ok") == ["/jam/stop"]
                c.send("/jam/stop", "lead")
                assert expect(c, "/error")[0] == "not_found"
            assert "live audio goes to" in d.log_text()
        finally:
            assert d.stop(signal.SIGTERM) == 0, d.log_text()
