"""Runs INSIDE a private network namespace (see test_link.py): a daemon with --follow link and Link peers;
prints what the daemon and the peers reported as one JSON line.

Scenarios: `follow`: a second peer sets the tempo and starts playing; `late-joiners`: the daemon starts
first, then peers at different tempos enable Link one after another (each leaves before the next).

Usage: python -m tests.bridge.clock.link_driver MODEL_DIR WORK_DIR [follow|late-joiners]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.bridge.clock.helpers import following_daemon, transport_state


LATE_TEMPOS = (97.0, 103.0, 91.0, 110.0, 85.0)  # each differs from the daemon's typed 120 and from the others


def late_joiners(model_dir: str, work: str) -> dict:
    """Each round: a peer at its own tempo enables Link after the daemon is up; its tempo is sampled for
    3 s after the daemon follows it (a pulled peer would show 120, or the previous round's tempo)."""
    import link

    rounds = []
    with following_daemon(Path(model_dir), Path(work), "--follow", "link") as (d, c):
        before = transport_state(c)
        for bpm in LATE_TEMPOS:
            peer = link.Link(bpm)
            peer.startStopSyncEnabled = True
            peer.enabled = True
            r: dict = {"bpm": bpm, "peer_tempos": []}
            deadline = time.monotonic() + 10
            while not ((st := transport_state(c))["age"] >= 0 and abs(st["tempo"] - bpm) < 0.01
                       and peer.numPeers() >= 1):
                r["peer_tempos"].append(peer.captureAppSessionState().tempo())
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            r["followed"] = st
            r["peers"] = peer.numPeers()
            end = time.monotonic() + 3.0
            while time.monotonic() < end:
                r["peer_tempos"].append(peer.captureAppSessionState().tempo())
                time.sleep(0.05)
            r["after"] = transport_state(c)
            peer.enabled = False
            del peer
            rounds.append(r)
            time.sleep(2.5)  # the daemon notices it is alone and goes back to listening
    return {"before": before, "rounds": rounds}


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
    scenario = sys.argv[3] if len(sys.argv) > 3 else "follow"
    run = {"follow": main, "late-joiners": late_joiners}[scenario]
    print("LINK-RESULT " + json.dumps(run(sys.argv[1], sys.argv[2])), flush=True)
