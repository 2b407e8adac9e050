"""Fuzz and flood over every address in docs/osc.md, through `musicbridge serve` over loopback UDP.

tests/bridge/test_hostile_osc.py mutates a fixed handful of seed messages; here the messages are
built from docs/osc.md's list of addresses (so a newly documented one is fuzzed as soon as it is
documented): valid, with arguments of every type and boundary value, huge argument counts,
hostile track names and job ids, bundles, bundles nested past the depth limit, and floods of up
to 1024 copies of one message in a bundle. The daemon runs with `--follow osc`, so DAW feedback
is followed, not ignored. Afterwards it must answer /ping with nothing else on the way, its log
must have grown by a bounded amount with no traceback, and the session it saved must be one the
next `serve` starts on. Bounded by message count; timeouts only guard against a daemon that
stopped answering. The seed is in the test name: rerun with it to replay.
"""

from __future__ import annotations

import json

import pytest

from tests.bridge.hostile_packets import documented_addresses, documented_fuzz
from tests.bridge.osc_helpers import ANSWER_GUARD, drain, expect, ping, udp_drops

SEED = 20261207
PACKETS = 3000
BURST = 20  # datagrams between two /pings, or fewer when they hold more than BURST_BYTES
BURST_BYTES = 96 * 1024  # well inside the daemon's socket buffer (208 KiB by default): a /ping is never dropped
LOG_BOUND = 1_000_000  # bytes the log may grow by over the whole run


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def test_fuzz_seed_20261207_every_documented_address_then_restart(base, tiny_model_dir, serve_daemon):
    addresses = documented_addresses()
    flags = ("--follow", "osc", "--max-queued", "2", "--max-seconds", "2", "--max-tracks", "256")
    with serve_daemon(base, tiny_model_dir, *flags) as (d, pinger):
        # a socket of its own: the pinger's host stays apart from the fuzzed one's budget
        pinger.send("/track/fz/prompt", "lofi drums")
        expect(pinger, "/ok")
        log_before = d.log_path.stat().st_size
        drops_before = udp_drops(d.port)
        sent = sent_bytes = burst = burst_bytes = 0
        with d.client(listen_host="127.3.0.1") as attacker:
            for data in documented_fuzz(SEED, PACKETS, addresses):
                if burst_bytes + len(data) > BURST_BYTES or burst == BURST:
                    burst = burst_bytes = 0
                    drain(pinger, 0.0)
                    pinger.send("/ping")
                    assert pinger.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD) is not None, \
                        f"no /pong after {sent} packets (seed {SEED}):\n{d.log_text()[-3000:]}"
                    assert d.proc.poll() is None, f"the daemon died after {sent} packets:\n{d.log_text()[-3000:]}"
                attacker.send_raw(data)
                sent, sent_bytes = sent + 1, sent_bytes + len(data)
                burst, burst_bytes = burst + 1, burst_bytes + len(data)
        drain(pinger, 0.5)
        ping(pinger, f"{PACKETS} fuzzed packets")
        grown = d.log_path.stat().st_size - log_before
        drops = udp_drops(d.port) - drops_before
        log = d.log_text()
        pinger.send("/tracks")
        tracks = expect(pinger, "/tracks")
        print(f"\nfuzz seed {SEED}: {sent} datagrams ({sent_bytes} bytes) over {len(addresses)} "
              f"documented addresses; log +{grown} bytes; kernel drops {drops}; {len(tracks)} tracks")
        assert sent == PACKETS and drops == 0
        assert grown < LOG_BOUND, grown
        assert "Traceback" not in log and "internal error" not in log, log[log.find("Traceback") - 2000:][:4000]
        saved = json.loads((d.session_dir / "session.json").read_text())
    # the next serve starts on what the fuzzed daemon saved, with the same tracks
    with serve_daemon(base, tiny_model_dir, *flags, session_dir=d.session_dir) as (d2, c2):
        c2.send("/tracks")
        assert sorted(expect(c2, "/tracks")) == sorted(tracks) == sorted(saved["tracks"])
        for name in saved["tracks"]:
            c2.send(f"/track/{name}/state")
            assert json.loads(expect(c2, f"/track/{name}/state")[0])["prompt"] == saved["tracks"][name].get("prompt")
