"""daw/ardour: the session script is valid Lua (luac5.4 -p) and, run with stand-ins for Ardour's bindings,
sends tempo, signature and transport exactly when they change."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bridge.osc_helpers import ROOT

SCRIPT = ROOT / "daw" / "ardour" / "musicbridge_sync.lua"


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (Debian package lua5.4; run scripts/setup.sh)"
    return path


def test_session_script_compiles():
    r = subprocess.run([_tool("luac5.4"), "-p", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_session_script_sends_changes_only():
    r = subprocess.run([_tool("lua5.4"), str(Path(__file__).with_name("ardour_standin.lua")), str(SCRIPT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    phases: dict[str, list[tuple]] = {}
    current = None
    for line in r.stdout.splitlines():
        kind, *rest = line.split("\t")
        if kind == "MARK":
            current = rest[0]
            phases[current] = []
        else:
            url, path, types, *args = rest
            assert url == "osc.udp://127.0.0.1:9010"
            phases[current].append((path, types, *[float(a) for a in args]))
    assert phases["start"] == [("/transport/tempo", "f", 120.0), ("/transport/signature", "ii", 4.0, 4.0),
                               ("/transport/stop", "f", 0.0)]
    assert phases["idle"] == []
    assert phases["tempo"] == [("/transport/tempo", "f", 97.0)]
    (locate,) = phases["locate"]
    assert locate[:2] == ("/transport/locate", "f") and locate[2] == pytest.approx(16.0, abs=1e-3)
    (play,) = phases["play"]  # once: playback itself is not a locate
    # Sent at the first check after rolling starts (one check in 0.1 s), with the position then.
    assert play[:2] == ("/transport/play", "f") and 16.0 <= play[2] <= 16.0 + 0.11 * 97 / 60
    assert phases["signature"] == [("/transport/signature", "ii", 6.0, 8.0)]
    (stop,) = phases["stop"]
    assert stop[:2] == ("/transport/stop", "f") and stop[2] > 16.0
    assert phases["end"] == []
