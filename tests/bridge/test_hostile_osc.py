"""Hostile datagrams against the real daemon (`musicbridge serve`) over loopback UDP.

Issue #13: one 24-byte packet used to hang the daemon for good. Here every malformed packet
of a corpus, and 100,000 fuzzed ones, must leave /ping answered, the log small and the session
unchanged. The daemon reads its one socket in order, so a /pong says every packet sent before the
/ping was read and handled. These assert order and bounds only, never how long something took
(a reply's timeout is a guard against a daemon that stopped answering). The fuzz seed is in the
test name: rerun with the same seed to replay.
"""

from __future__ import annotations

import socket
import time

import pytest

from bridge.osc.udp import OscClient, encode
from tests.bridge.hostile_packets import corpus, fuzz_packets
from tests.bridge.osc_helpers import ANSWER_GUARD, drain, expect, ping, udp_drops

LOG_BOUND = 1_000_000  # bytes


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_dir, serve_daemon):
    # --max-queued 0: a fuzzed generate is answered busy instead of running the model for minutes
    # --max-tracks 512: fuzzed names must not use up the tracks the later tests create
    with serve_daemon(tmp_path_factory.mktemp("hostile"), tiny_model_dir, "--max-queued", "0",
                      "--max-tracks", "512") as (d, pinger):
        yield d, pinger


def test_malformed_corpus_leaves_ping_answered(daemon):
    d, pinger = daemon
    pinger.send("/transport/tempo", 120.0)
    expect(pinger, "/ok")
    drain(pinger, 0.0)
    cases = corpus()
    lines_before = len(d.log_text().splitlines())
    drops_before = udp_drops(d.port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        # another host: answers to one host share its bytes-a-second cap (docs/osc.md), and the
        # attacker's error replies must not be what keeps the pinger's /pong from being sent
        attacker.bind(("127.0.0.2", 0))
        for name, data in cases:
            attacker.sendto(data, ("127.0.0.1", d.port))
            ping(pinger, repr(name))  # queued behind the bad packet: answered only once it was read
            assert d.proc.poll() is None, f"daemon died on {name!r}:\n{d.log_text()[-3000:]}"
    print(f"\n{len(cases)} malformed packets, each followed by an answered /ping; "
          f"log {d.log_path.stat().st_size} bytes")
    assert udp_drops(d.port) == drops_before  # every bad packet reached the daemon before its /ping
    pinger.send("/status")
    status = expect(pinger, "/status")
    assert status[5] == 120.0  # the truncated /transport/tempo was not applied
    assert status[11] == "cpu" and status[12] in ("float32", "bfloat16", "int8", "int4")  # where the model runs
    assert d.log_path.stat().st_size < LOG_BOUND
    log = d.log_text()
    assert len(log.splitlines()) - lines_before <= len(cases)  # at most one line per bad packet
    assert "Traceback" not in log and "internal error" not in log


def test_corpus_packets_get_bad_packet_errors(daemon):
    """A malformed packet is answered /error bad_packet naming the problem (when the budget allows)."""
    d, _ = daemon
    time.sleep(1.1)  # the daemon sends at most 200 error replies a second: let the corpus's second pass
    with OscClient("127.0.0.1", d.port, listen_host="127.0.0.7") as c:
        assert c.prove()  # each /error is larger than the malformed packet it answers
        for data, why in [(b"#bundle\0" + b"\0\0\0\0\0\0\0\1\xff\xff\xff\xfc/ping\0\0\0,\0\0\0", "declares -4 bytes"),
                          (encode("/transport/tempo", [120.0])[:25], "not a multiple of 4")]:
            c.send_raw(data)
            err = expect(c, "/error")
            assert err[0] == "bad_packet" and why in err[1], err


def test_fuzz_seed_20261125_100k_packets(daemon):
    """100,000 fuzzed datagrams in bursts of 100; after each burst /ping is answered, none lost."""
    d, pinger = daemon
    seed, total, burst = 20261125, 100_000, 100
    drops_before = udp_drops(d.port)
    sent = 0
    t0 = time.monotonic()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        # another host: answers to one host share its bytes-a-second cap (docs/osc.md), and the
        # attacker's error replies must not be what keeps the pinger's /pong from being sent
        attacker.bind(("127.0.0.2", 0))
        batch = []
        for data in fuzz_packets(seed, total):
            batch.append(data)
            if len(batch) < burst:
                continue
            for p in batch:
                attacker.sendto(p, ("127.0.0.1", d.port))
            sent += len(batch)
            batch = []
            # catch up: the burst waits in the socket buffer; a /ping queued behind it is answered once read
            pinger.send("/ping")
            assert pinger.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD) is not None, \
                f"no /pong after {sent} packets (seed {seed}):\n{d.log_text()[-3000:]}"
    elapsed = time.monotonic() - t0
    size = d.log_path.stat().st_size
    drops = udp_drops(d.port) - drops_before
    print(f"\nfuzz seed {seed}: {sent} packets in {elapsed:.1f} s; "
          f"log {size} bytes; kernel drops {drops}")
    assert sent == total
    assert drops == 0, f"{drops} datagrams never reached the daemon"
    assert size < LOG_BOUND
    log = d.log_text()
    assert "Traceback" not in log and "internal error" not in log


def _reply_bytes(sock: socket.socket, quiet: float = 0.5) -> tuple[int, int]:
    """(bytes, datagrams) received until `quiet` seconds pass without one."""
    sock.settimeout(quiet)
    total = count = 0
    while True:
        try:
            total += len(sock.recv(65535))
            count += 1
        except (TimeoutError, socket.timeout):
            return total, count


def _long_track_names(pinger: OscClient) -> None:
    """40 tracks with 32-character names: /tracks answers about 1.5 KB."""
    for i in range(40):
        pinger.send(f"/track/{'n' * 28}{i:04d}/prompt", "pad")
    for _ in range(40):
        expect(pinger, "/ok")


def _fresh_host_socket(host: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((host, 0))
    return s


def test_bundles_of_queries_get_no_more_bytes_back_than_they_sent(daemon):
    """Issue #13: a 16 KB bundle of /tracks and /ping once brought back 506 KB (149x with long names)."""
    from tests.bridge.hostile_packets import bundle

    d, pinger = daemon
    _long_track_names(pinger)
    queries = [encode("/tracks"), encode("/ping"), encode("/status")]
    # from 127.0.0.3: a host with no credit banked by the other tests' traffic
    with _fresh_host_socket("127.0.0.3") as s:
        sent = 0
        for k in range(10):
            data = bundle(*[queries[(k + i) % 3] for i in range(1000)])
            s.sendto(data, ("127.0.0.1", d.port))
            sent += len(data)
        got, replies = _reply_bytes(s)
    print(f"\nbundles of queries: sent {sent} bytes, got back {got} bytes in {replies} replies "
          f"({got / sent:.2f}x)")
    assert 0 < got <= sent

    with _fresh_host_socket("127.0.0.4") as s:  # pongs are no bigger than pings: every one is answered
        data = bundle(*[encode("/ping")] * 1000)
        s.sendto(data, ("127.0.0.1", d.port))
        got, replies = _reply_bytes(s)
    assert replies == 1000 and got <= len(data)


def test_lone_queries_get_back_at_most_what_they_sent(daemon):
    """A fresh host's single-message packets earn their own size in answers, no more: 3000 lone
    /tracks (each answer bigger than its question) get back some answers, within the bytes sent."""
    d, _ = daemon
    with _fresh_host_socket("127.0.0.5") as s:
        sent = 0
        for i in range(3000):
            data = encode("/tracks")
            s.sendto(data, ("127.0.0.1", d.port))
            sent += len(data)
            if i % 100 == 99:
                time.sleep(0.01)  # stay inside the daemon's socket buffer
        got, replies = _reply_bytes(s)
    print(f"\nlone /tracks: sent {sent} bytes, got back {got} ({replies} replies)")
    assert 0 < got <= sent and replies < 3000


def test_a_pad_in_the_bundle_pays_for_a_big_answer(daemon):
    from tests.bridge.hostile_packets import bundle

    d, pinger = daemon
    _long_track_names(pinger)
    with _fresh_host_socket("127.0.0.6") as s:
        s.sendto(bundle(encode("/tracks")), ("127.0.0.1", d.port))
        assert _reply_bytes(s, 0.3) == (0, 0)  # a fresh host's bundle cannot pay for a 1.5 KB list
        pad = encode("/pad", [b"\0" * 2000])
        s.sendto(bundle(encode("/tracks"), pad), ("127.0.0.1", d.port))
        got, replies = _reply_bytes(s, 0.3)
        assert replies == 1 and 1000 < got <= 2000 + 40


def test_a_burst_of_valid_changes_is_saved_once_and_does_not_stall_ping(daemon):
    """A 40 KB bundle of 1000 prompt changes once cost one fsync each: /ping waited ~10 s.
    Now the bundle is saved once: the daemon writes about one session file, not a thousand."""
    import json

    from tests.bridge.hostile_packets import bundle

    d, pinger = daemon
    drain(pinger, 0.1)
    changes = [encode(f"/track/burst{i % 8}/prompt", [f"take {i}"]) for i in range(1000)]
    saved_before = (d.session_dir / "session.json").stat().st_size
    log_before, wrote_before = d.log_path.stat().st_size, d.io()["wchar"]
    pinger.send_raw(bundle(*changes))  # one group: its changes are saved, then acknowledged
    pinger.send("/ping")
    seen: list = []
    assert pinger.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD, seen) is not None, seen
    wrote = d.io()["wchar"] - wrote_before
    # every change acknowledged, in order, before the /pong (replies are held until the save)
    assert [a for a, _ in seen] == ["/ok"] * 1000 and [v[0] for _, v in seen] == [
        f"/track/burst{i % 8}/prompt" for i in range(1000)], seen[:3]
    saved = json.loads((d.session_dir / "session.json").read_text())
    assert saved["tracks"]["burst7"]["prompt"] == "take 999"  # the last change is on disk
    size = (d.session_dir / "session.json").stat().st_size
    logged = d.log_path.stat().st_size - log_before
    print(f"\n1000 changes in one bundle: {len(seen)} /ok; the daemon wrote {wrote} bytes "
          f"(session file {saved_before} -> {size} bytes, log +{logged})")
    # one save per change would write at least 1000 x the smaller session file
    assert wrote <= 2 * size + logged + 64 * 1024 < 1000 * saved_before, wrote

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:  # the same as single packets
        flood.bind(("127.0.0.2", 0))  # another host: its /ok replies do not share the pinger's cap
        for i in range(2000):
            flood.sendto(encode(f"/track/burst{i % 8}/prompt", [f"again {i}"]), ("127.0.0.1", d.port))
            if i % 100 == 99:
                time.sleep(0.05)  # stay inside the socket buffer (a dropped /ping would never be answered)
        pinger.send("/ping")  # read after all 2000 changes: answered once they were handled and saved
        assert pinger.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD) is not None
        saved = json.loads((d.session_dir / "session.json").read_text())
    assert saved["tracks"]["burst7"]["prompt"] == "again 1999"
