"""A real daemon following a clock, asked /transport/state over loopback UDP (shared by the clock tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import PLAIN_PRESET, DaemonProcess, drain, expect


@contextlib.contextmanager
def following_daemon(model_dir: Path, base: Path, *extra: str) -> Iterator[tuple[DaemonProcess, OscClient]]:
    presets = base / "presets"
    presets.mkdir(exist_ok=True)
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    client = OscClient("127.0.0.1", 0)
    d = DaemonProcess(model_dir, base / "session", presets, "--reply-to", f"127.0.0.1:{client.port}", *extra)
    client.target = ("127.0.0.1", d.port)
    try:
        d.wait_ready(client)
        yield d, client
    finally:
        d.stop()
        client.sock.close()


def transport_state(c: OscClient) -> dict:
    """/transport/state as a dict: source, tempo, numerator, denominator, playing, beat, age, quarter_notes."""
    drain(c, 0.05)
    c.send("/transport/state")
    v = expect(c, "/transport/state", 5.0)
    keys = ("source", "tempo", "numerator", "denominator", "playing", "beat", "age", "quarter_notes")
    assert len(v) == len(keys), v
    return dict(zip(keys, v))
