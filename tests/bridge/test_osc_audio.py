"""`musicbridge serve --audio default` on a private JACK server (dummy driver): /status reports xruns."""

from __future__ import annotations

import signal

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
            assert "live audio goes to" in d.log_text()
        finally:
            assert d.stop(signal.SIGTERM) == 0, d.log_text()
