"""A real daemon following a clock, asked /transport/state over loopback UDP (shared by the clock tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import DaemonProcess, drain, expect, serving


@contextlib.contextmanager
def following_daemon(model_dir: Path, base: Path, *extra: str) -> Iterator[tuple[DaemonProcess, OscClient]]:
    """The daemon with replies to a fixed port (as a DAW's), plus `extra` (e.g. --follow ...)."""
    with serving(base, model_dir, *extra, reply_to=True, exit_code=None) as (d, c):
        yield d, c


def transport_state(c: OscClient) -> dict:
    """/transport/state as a dict: source, tempo, numerator, denominator, playing, beat, age, quarter_notes."""
    drain(c, 0.05)
    c.send("/transport/state")
    v = expect(c, "/transport/state", 5.0)
    keys = ("source", "tempo", "numerator", "denominator", "playing", "beat", "age", "quarter_notes")
    assert len(v) == len(keys), v
    return dict(zip(keys, v))
