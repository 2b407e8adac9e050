"""`serve --follow link`: a second Link peer sets the tempo and starts playing; the daemon follows the
tempo, the phase (bar = quantum) and the start/stop.

Link finds peers by multicast, so the daemon and the peer both run inside a private network
namespace (`unshare -n`: loopback up, multicast on lo, a route for 224.0.0.0/4 on lo) that this
test makes; nothing reaches the machine's real interfaces. Where no namespace can be made, the
test fails and says why: it never skips.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.bridge.osc_helpers import ROOT

NETNS_SETUP = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"


def _in_private_netns(command: str, timeout: float) -> subprocess.CompletedProcess:
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            raise AssertionError(f"cannot make a private network namespace for the Link test: {tool} is not "
                                 "installed (util-linux / iproute2)")
    probe = subprocess.run(["unshare", "-n", "bash", "-c", NETNS_SETUP], capture_output=True, text=True)
    if probe.returncode != 0:
        raise AssertionError("cannot make a private network namespace for the Link test (unshare -n needs "
                             f"CAP_SYS_ADMIN, e.g. root or a user namespace): {probe.stderr.strip()}")
    return subprocess.run(["unshare", "-n", "bash", "-c", f"{NETNS_SETUP} && exec {command}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def _phase_between(before: float, x: float, after: float, q: float = 4.0, tol: float = 0.05) -> bool:
    """x lies on the circle of circumference q between before and after (allowing `tol` either side)."""
    span = (after - before) % q
    return (x - before + tol) % q <= span + 2 * tol


def test_follows_a_link_peer_in_a_private_network_namespace(tmp_path, tiny_model_dir):
    r = _in_private_netns(f"{sys.executable} -m tests.bridge.clock.link_driver {tiny_model_dir} {tmp_path}", 240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("LINK-RESULT ")]
    assert r.returncode == 0 and lines, f"driver failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    out = json.loads(lines[-1][len("LINK-RESULT "):])
    assert "error" not in out, out
    assert out["peers"] >= 1
    playing = out["playing"]
    assert playing["source"] == "link" and playing["playing"] == 1
    assert abs(playing["tempo"] - 97.0) < 0.01
    assert 0 <= playing["age"] < 1.0
    for before, daemon, after in out["phases"]:
        assert _phase_between(before, daemon, after), (before, daemon, after)
    assert out["stopped"]["playing"] == 0


def test_a_peer_that_joins_after_the_daemon_keeps_its_tempo(tmp_path, tiny_model_dir):
    """The daemon (typed tempo 120) starts first; five peers, each at its own tempo, enable Link one after
    another. In Link the older session wins, so a daemon that had founded a session would pull each
    of them to 120 (or to the previous peer's tempo); it must join theirs and follow it instead."""
    from tests.bridge.clock.link_driver import LATE_TEMPOS

    r = _in_private_netns(f"{sys.executable} -m tests.bridge.clock.link_driver {tiny_model_dir} {tmp_path} "
                          "late-joiners", 240)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("LINK-RESULT ")]
    assert r.returncode == 0 and lines, f"driver failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    out = json.loads(lines[-1][len("LINK-RESULT "):])
    # Before any peer: the typed transport under Link's name, never heard (nothing proposed).
    assert out["before"]["source"] == "link" and out["before"]["age"] == -1.0 and out["before"]["tempo"] == 120.0
    assert [x["bpm"] for x in out["rounds"]] == list(LATE_TEMPOS)
    for x in out["rounds"]:
        bpm = x["bpm"]
        assert x["peers"] >= 1, x  # the daemon did join the peer's session
        assert x["followed"]["source"] == "link" and x["followed"]["tempo"] == pytest.approx(bpm, abs=0.01), x
        assert len(x["peer_tempos"]) >= 50
        assert max(abs(t - bpm) for t in x["peer_tempos"]) < 1e-6, (bpm, sorted(set(x["peer_tempos"])))
        assert x["after"]["tempo"] == pytest.approx(bpm, abs=0.01) and 0 <= x["after"]["age"] < 1.0


def test_link_discovery_datagrams_are_read_for_node_and_tempo():
    import struct

    from bridge.clock.link import parse_discovery

    node = b"ABCDEFGH"
    tmln = b"tmln" + struct.pack(">I", 24) + struct.pack(">qqq", round(60e6 / 97.0), 0, 0)
    sess = b"sess" + struct.pack(">I", 8) + node
    alive = b"_asdp_v\x01" + bytes([1, 5, 0, 0]) + node + tmln + sess
    kind, got_node, ttl, tempo = parse_discovery(alive)
    assert (kind, got_node, ttl) == (1, node, 5) and tempo == pytest.approx(97.0, abs=1e-3)
    assert parse_discovery(b"_asdp_v\x01" + bytes([3, 0, 0, 0]) + node)[:3] == (3, node, 0)  # bye, no tempo
    assert parse_discovery(b"not link at all, twenty bytes+") is None
    assert parse_discovery(alive[:12]) is None
