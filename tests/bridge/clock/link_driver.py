"""Runs INSIDE a private network namespace (see test_link.py): a daemon with --follow link and a second
Link peer that sets the tempo and starts playing; prints what the daemon reported as one JSON line.

Usage: python -m tests.bridge.clock.link_driver MODEL_DIR WORK_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.bridge.clock.helpers import following_daemon, transport_state


def main(model_dir: str, work: str) -> dict:
    import link

    out: dict = {}
    with following_daemon(Path(model_dir), Path(work), "--follow", "link") as (d, c):
        peer = link.Link(120.0)
        peer.startStopSyncEnabled = True
        peer.enabled = True
        deadline = time.monotonic() + 10
        while peer.numPeers() < 1:
            if time.monotonic() > deadline:
                return {"error": "the daemon's Link peer was never found"}
            time.sleep(0.05)
        out["peers"] = peer.numPeers()
        s = peer.captureAppSessionState()
        now = peer.clock().micros()
        s.setTempo(97.0, now)
        s.setIsPlayingAndRequestBeatAtTime(True, now, 0.0, 4.0)
        peer.commitAppSessionState(s)
        deadline = time.monotonic() + 5
        while not (st := transport_state(c))["playing"] or abs(st["tempo"] - 97.0) > 0.01:
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        out["playing"] = st

        def peer_phase() -> float:
            s = peer.captureAppSessionState()
            return s.phaseAtTime(peer.clock().micros(), 4.0)

        samples = []
        for _ in range(5):  # the daemon's phase, bracketed by the peer's just before and after
            before = peer_phase()
            st = transport_state(c)
            after = peer_phase()
            samples.append([before, st["beat"] % 4.0, after])
            time.sleep(0.1)
        out["phases"] = samples
        s = peer.captureAppSessionState()
        s.setIsPlaying(False, peer.clock().micros())
        peer.commitAppSessionState(s)
        deadline = time.monotonic() + 5
        while (st := transport_state(c))["playing"] and time.monotonic() < deadline:
            time.sleep(0.05)
        out["stopped"] = st
        peer.enabled = False
    return out


if __name__ == "__main__":
    print("LINK-RESULT " + json.dumps(main(sys.argv[1], sys.argv[2])), flush=True)
