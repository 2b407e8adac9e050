"""A jam started while `serve --follow jack` follows a JACK timebase master begins on that master's next
bar line: checked in the audio an independent JACK capture client records (tests/plugin_host/jack_capture.py)."""

from __future__ import annotations

import statistics
import subprocess
import time

import numpy as np

from tests.bridge.clock.helpers import transport_state
from tests.bridge.osc_helpers import PLAIN_PRESET, DaemonProcess, expect
from tests.jack_server import jack_server
from tests.plugin_host.jack_capture import capture

SR, PERIOD = 48000, 256
BPM = 97.0
BAR = 4 * 60.0 / BPM * SR  # frames per bar of 4/4
# The output clock advances a callback (one period) at a time and the recorder may sit one cycle
# after the output in JACK's graph: a part "on the bar line" lands within 3 periods of it (plus
# whatever cycles the server skipped meanwhile, see the end of the test).
TOLERANCE = 3 * PERIOD


def _transport_minus_frame_time(probe) -> int:
    """JACK transport frame - JACK frame time while rolling (constant); the most frequent of a few reads."""
    reads = []
    for _ in range(9):
        _state, pos = probe.transport_query()
        reads.append(pos["frame"] - probe.last_frame_time)
        time.sleep(0.01)
    return int(statistics.mode(reads))


def test_jam_begins_on_the_next_bar_line_of_the_followed_jack_master(tmp_path, tiny_model_dir):
    import jack

    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    with jack_server(rate=SR, period=PERIOD):
        master = subprocess.Popen(["jack_transport"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL, text=True)
        master.stdin.write(f"master\ntempo {BPM:g}\n")
        master.stdin.flush()
        d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets, "--audio", "default", "--follow", "jack")
        probe = jack.Client("mb-test-probe", no_start_server=True)
        probe.activate()
        try:
            with capture(40.0) as cap, d.client() as c:
                d.wait_ready(c)
                c.send("/track/lead/preset", "plain")
                expect(c, "/ok")
                cap.connect("PortAudio")
                master.stdin.write(f"locate {round(16 * 60.0 / BPM * SR)}\nplay\n")  # bar 5, rolling
                master.stdin.flush()
                deadline = time.monotonic() + 10
                while not (st := transport_state(c))["playing"]:
                    assert time.monotonic() < deadline, st
                    time.sleep(0.05)
                offset = _transport_minus_frame_time(probe)
                asked = probe.transport_query()[1]["frame"]
                asked_time = probe.frame_time
                c.send("/jam/start", "lead")
                expect(c, "/ok")
                time.sleep(3 * BAR / SR)
                c.send("/jam/stop", "lead")
                expect(c, "/ok")
                time.sleep(2 * BAR / SR)
        finally:
            probe.close()
            assert d.stop() == 0, d.log_text()
            master.stdin.write("quit\n")
            master.stdin.close()
            master.wait(5)
    rec = np.abs(cap.audio).max(axis=0)
    nz = np.nonzero(rec > 1e-6)[0]
    assert len(nz), "the jam never played"
    start = cap.jack_frame(int(nz[0])) + offset  # the part's first sound, in JACK transport frames
    bar_line = round(start / BAR) * BAR
    # A non-realtime JACK server on a loaded machine skips cycles: JACK time runs on while the output
    # renders nothing, so audio placed before a skip is heard that much later. The recorder's own
    # block times say how many frames were skipped between the request and the first sound.
    between = (cap.block_frames > asked_time) & (cap.block_frames <= cap.jack_frame(int(nz[0])))
    steps = np.diff(cap.block_frames)[between[1:]]
    skipped = int((steps - PERIOD).clip(min=0).sum())
    assert -TOLERANCE <= start - bar_line <= skipped + TOLERANCE, (start, bar_line, start - bar_line, skipped)
    assert asked < bar_line + TOLERANCE  # after it was asked for ...
    assert bar_line - asked <= 3 * BAR  # ... on the next bar line the first chunk could make
