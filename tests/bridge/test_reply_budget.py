"""Issue #31's reply budget through `musicbridge serve` over loopback UDP: from a fresh source
address the bytes sent back, job events included, never exceed the bytes received, for every
address in docs/osc.md.

Each address is sent from two fresh host addresses of its own (127.1.k.1 and 127.1.k.2; the
budget is per host IP): the first sends it alone with valid arguments, then malformed (no
arguments, one too many, every type swapped, truncated); the second sends the same as one bundle. Tracks have `variations 16`, so a `/generate` queues 16
takes. Everything sent back to those addresses is collected until the daemon has finished every
job, and counted. Bounds are on bytes only; the timeouts are guards against a daemon that
stopped answering, never speed claims.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from audiofile import write_audio
from bridge.daemon import Daemon, DaemonConfig
from bridge.osc.udp import OscClient, decode, encode
from tests.bridge.hostile_packets import (bundle, documented_addresses, example_args, malformed_args,
                                          truncated)
from tests.bridge.osc_helpers import DaemonProcess, drain, expect
from tests.jack_server import jack_server

GUARD = 600.0  # seconds: only a daemon that stopped working waits this long
TAKES = 16


def _tune(path) -> None:
    """A one-note MIDI file (format 0, 96 ticks a beat)."""
    track = bytes([0x00, 0x90, 60, 100, 0x60, 0x80, 60, 0, 0x00, 0xFF, 0x2F, 0x00])
    path.write_bytes(b"MThd" + (6).to_bytes(4, "big") + bytes([0, 0, 0, 1, 0, 96])
                     + b"MTrk" + len(track).to_bytes(4, "big") + track)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_dir, serve_daemon):
    import numpy as np

    base = tmp_path_factory.mktemp("budget")
    allowed = base / "inputs"
    allowed.mkdir()
    t = np.arange(16000, dtype=np.float32) / 16000
    write_audio(allowed / "take.wav", (0.3 * np.sin(2 * np.pi * 220 * t))[None, :], 16000)
    _tune(allowed / "tune.mid")
    with serve_daemon(base, tiny_model_dir, "--max-queued", "200", "--max-tracks", "200",
                      allow_dir=allowed) as (d, pinger):
        yield d, pinger, allowed


def _host(ip: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # holds every reply until it is read
    s.bind((ip, 0))
    return s


def _collect(s: socket.socket) -> list[bytes]:
    """Every datagram waiting on `s` (the daemon sent them before the /pong that preceded this)."""
    s.setblocking(False)
    got = []
    while True:
        try:
            got.append(s.recv(65535))
        except BlockingIOError:
            return got


def _track(pinger: OscClient, name: str) -> None:
    pinger.send(f"/track/{name}/prompt", "lofi drums")
    pinger.send(f"/track/{name}/param", "variations", TAKES)
    expect(pinger, "/ok")
    expect(pinger, "/ok")


def _idle(pinger: OscClient) -> None:
    """Until the daemon has no job queued or running; then every event of every job has been sent."""
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:
        pinger.send("/status")
        st = expect(pinger, "/status")
        if st[2] == 0 and st[3] == 0:
            pinger.send("/ping")
            expect(pinger, "/pong")
            return
        time.sleep(0.2)
    raise AssertionError("the daemon's jobs never finished")


def _accepted(datagrams: list[bytes]) -> set[int]:
    return {args[0] for d in datagrams for address, args in decode(d) if address == "/job/accepted"}


def test_no_documented_address_gets_more_bytes_back_than_it_sent(daemon):
    d, pinger, allowed = daemon
    addresses = documented_addresses()
    names = [a for a, _ in addresses]
    # the parser found the document's addresses, the ones the issue names among them
    assert len(addresses) >= 40 and {"/track/<name>/generate", "/jam/status", "/cookie", "/prove",
                                     "/job/<id>/status", "/position/bbt"} <= set(names), names
    pinger.send("/track/setup/prompt", "lofi drums")
    expect(pinger, "/ok")
    pinger.send("/track/setup/generate", 0.5)
    first_job = expect(pinger, "/job/accepted")[0]
    expect(pinger, "/job/done")
    cases = []  # (address, socket of a fresh host, its datagrams, whether they are one bundle)
    results = []  # (address, bundle?, bytes sent, bytes back, replies, job ids accepted, seconds)
    try:
        for k, (template, spec) in enumerate(addresses):
            track = f"b{k}"
            _track(pinger, track)
            address = template.replace("<name>", track).replace("<id>", str(first_job))
            path = allowed / ("tune.mid" if template.endswith("/melody/midi") else "take.wav")
            args = example_args(spec, {"path": str(path), "track": track})
            valid = encode(address, args)
            wrong = [encode(address, a) for a in malformed_args(args)]
            cases += [(address, _host(f"127.1.{k}.1"), [valid, *wrong, truncated(valid)], False),
                      (address, _host(f"127.1.{k}.2"), [bundle(valid, *wrong)], True)]
        started = []
        for i, (address, s, datagrams, grouped) in enumerate(cases):
            started.append(time.monotonic())
            for data in datagrams:
                s.sendto(data, ("127.0.0.1", d.port))
            if i % 8 == 7:  # let the daemon catch up: a full socket buffer would drop what we count
                pinger.send("/ping")
                expect(pinger, "/pong", GUARD)
        _idle(pinger)
        for (address, s, datagrams, grouped), t0 in zip(cases, started):
            got = _collect(s)
            results.append((address, grouped, sum(map(len, datagrams)), sum(map(len, got)), len(got),
                            _accepted(got), time.monotonic() - t0))
    finally:
        for _, s, _, _ in cases:
            s.close()
    print()
    for address, grouped, sent, back, n, _, _ in results:
        kind = "bundle" if grouped else "lone"
        print(f"{kind:6s} {address[:40]:40s} sent {sent:6d} B, got {back:5d} B in {n} replies")
    for address, grouped, sent, back, *_ in results:
        assert back <= sent, f"{address} ({'bundle' if grouped else 'lone'}): sent {sent} B, got {back} B back"
    # answers that cost no more than their questions still come: /pong, and /ok to a prompt
    back_of = {(address.split("/")[-1], grouped): back for address, grouped, _, back, *_ in results}
    assert back_of[("ping", False)] >= 12 and back_of[("prompt", False)] > 0, back_of
    # the lone /generate paid for its first /job/accepted only; its 16 takes (ids taken one after
    # another) all ran to the end, their stems on the generating track, though no event was sent
    track, jobs = next((address.split("/")[2], ids) for address, grouped, *_, ids, _ in results
                       if address.endswith("/generate") and not grouped)
    assert len(jobs) == 1, jobs
    for job in range(min(jobs), min(jobs) + TAKES):
        pinger.send(f"/job/{job}/status")
        status = expect(pinger, "/job/status")
        assert status[1] == "done" and Path(status[3]).name.startswith(track), status


def test_a_host_that_proves_its_address_gets_every_event(daemon):
    d, pinger, _ = daemon
    _track(pinger, "proven")
    with OscClient("127.0.0.1", d.port, listen_host="127.2.0.1") as c:
        assert c.prove()
        c.send("/track/proven/generate", 0.5)
        done: list = []
        while len(done) < TAKES:
            r = c.wait_for(lambda a, _: a in ("/job/done", "/error"), GUARD)
            assert r is not None and r[0] == "/job/done", (r, done)
            done.append(r[1][0])
    assert len(set(done)) == TAKES


def test_a_cookie_proves_only_the_address_it_was_sent_to(daemon):
    d, _, _ = daemon
    with (OscClient("127.0.0.1", d.port, listen_host="127.2.0.2") as a,
          OscClient("127.0.0.1", d.port, listen_host="127.2.0.3") as b,
          OscClient("127.0.0.1", d.port, listen_host="127.2.0.2") as a2):
        a.send("/cookie", bytes(64))
        cookie = expect(a, "/cookie")[0]
        for other in (b, a2):  # pads, so its refusal is paid: a forger pays for what it is told
            other.send("/pad", bytes(1000))
        for other in (b, a2):  # another host, and another port of the same host
            other.send("/prove", cookie)  # what a forger that saw the cookie would send from another address
            err = expect(other, "/error")
            assert err[0] == "forbidden" and "/cookie" in err[1], err
        b.send("/prove", "short")
        err = expect(b, "/error")
        assert err[0] == "bad_args" and "32" in err[1], err
        a.send("/prove", cookie)
        assert expect(a, "/ok") == ["/prove"]


def test_padding_pays_for_a_jobs_events_without_a_proof(daemon):
    """A bundle of a /generate and a 4 KB /pad: its 16 /job/done fit the credit, and no more comes back."""
    d, pinger, _ = daemon
    _track(pinger, "padded")
    with _host("127.2.0.4") as s:
        data = bundle(encode("/track/padded/generate", [0.5]), encode("/pad", [bytes(4000)]))
        s.sendto(data, ("127.0.0.1", d.port))
        _idle(pinger)
        got = _collect(s)
    back = sum(map(len, got))
    done = [args[0] for g in got for address, args in decode(g) if address == "/job/done"]
    print(f"\npadded /generate: sent {len(data)} B, got {back} B: {len(done)} /job/done")
    assert len(done) == TAKES and back <= len(data)
    drain(pinger, 0.0)


class _PlayingJam:
    """A jam that is playing, as /jam/status reads it (a real one needs a live audio output)."""

    state = "playing"

    def status(self) -> dict:
        return {"track": "lead", "state": "playing", "behind": False, "chunks": 12, "realtime_factor": 1.7,
                "underruns": 0, "error": None, "chunk_latency": 1.1, "note_latency": 0.3,
                "first_audio_seconds": 0.2, "prefills": 1}

    def close(self) -> None:
        """Nothing to stop: the daemon closes every jam on exit."""


def test_a_flood_of_jam_status_from_a_fresh_host_is_paid_like_any_answer(tmp_path, tiny_engine):
    """Issue #31: 2,000 lone 24-byte /jam/status from a fresh host once brought 150 KB back."""
    with Daemon(tiny_engine, DaemonConfig(port=0, session_dir=tmp_path / "session", grace=0.0)) as d:
        d.live.jams["lead"] = _PlayingJam()
        with _host("127.2.0.5") as s:
            query = encode("/jam/status", ["lead"])
            paid = bundle(query, encode("/pad", ["x" * 200]))  # the first question pays for its answer
            s.sendto(paid, ("127.0.0.1", d.server.port))
            raw = s.recv(65535)
            first = decode(raw)[0]
            assert first[0] == "/jam/status" and first[1][:4] == ["lead", "playing", 0, 12], first
            for i in range(1, 2000):
                s.sendto(query, ("127.0.0.1", d.server.port))
                if i % 100 == 0:  # stay inside the daemon's socket buffer
                    with OscClient("127.0.0.1", d.server.port) as pinger:
                        pinger.send("/ping")
                        expect(pinger, "/pong")
            with OscClient("127.0.0.1", d.server.port) as pinger:
                pinger.send("/ping")
                expect(pinger, "/pong")
            later = _collect(s)
    sent = len(paid) + 1999 * len(query)
    got = len(raw) + sum(map(len, later))
    print(f"\n2000 /jam/status: sent {sent} B, got {got} B back")
    assert len(raw) > len(query)  # each answer is bigger than its question
    assert got <= sent
    assert later  # the questions' bytes together paid for some answers: the credit is the host's, not a packet's


def test_the_issues_generate_with_16_variations_gets_only_its_acceptances_back(daemon):
    """Issue #31: one 28-byte /generate with `variations 16` sent 5,620 bytes (200x) to its source
    address. Now it earns 28 bytes back: its first /job/accepted, and nothing more."""
    d, pinger, _ = daemon
    _track(pinger, "v")
    with _host("127.2.0.6") as s:
        data = encode("/track/v/generate", [1.0])
        s.sendto(data, ("127.0.0.1", d.port))
        _idle(pinger)
        got = [decode(g)[0] for g in _collect(s)]
    back = sum(len(encode(a, v)) for a, v in got)
    print(f"\n/generate with variations {TAKES}: sent {len(data)} B, got {back} B back ({len(got)} replies)")
    assert len(data) == 28 and [a for a, _ in got] == ["/job/accepted"]
    assert back <= len(data)


def _jam_until(d: DaemonProcess, pinger: OscClient, done) -> None:
    """Ask /jam/status lead (answered to the pinger) every half second until done(its arguments)."""
    deadline = time.monotonic() + GUARD
    while True:
        drain(pinger, 0.0)
        pinger.send("/jam/status", "lead")
        if done(expect(pinger, "/jam/status")):
            return
        assert time.monotonic() < deadline, d.log_text()[-3000:]
        time.sleep(0.5)


def test_a_jam_started_from_an_unproven_address_sends_it_no_unpaid_chunk(tmp_path, tiny_melody_dir):
    """A jam's /jam/chunk and /jam/status events go to the address that started it, paid from its
    credit: a fresh host's 24-byte /jam/start buys its /ok and nothing more, however long the jam
    plays. The jam plays on (the proven pinger sees its chunks counted)."""
    presets = tmp_path / "presets"
    presets.mkdir()
    with jack_server(rate=48000, period=256):
        d = DaemonProcess(tiny_melody_dir, tmp_path / "session", presets, "--audio", "default")
        try:
            with d.client() as pinger, _host("127.2.0.8") as s:
                d.wait_ready(pinger)  # proves the pinger's address
                pinger.send("/transport/tempo", 240.0)  # one bar a second: a chunk (2 bars) every 2 s
                pinger.send("/track/lead/prompt", "sax")
                expect(pinger, "/ok")
                expect(pinger, "/ok")
                start = encode("/jam/start", ["lead"])
                s.sendto(start, ("127.0.0.1", d.port))
                _jam_until(d, pinger, lambda st: st[3] >= 3)  # three chunks made
                pinger.send("/jam/stop", "lead")
                expect(pinger, "/ok")
                _jam_until(d, pinger, lambda st: st[1] == "stopped")  # its own status events went to s
                got = [decode(g)[0] for g in _collect(s)]
        finally:
            assert d.stop() == 0, d.log_text()[-3000:]
    back = sum(len(encode(a, v)) for a, v in got)
    print(f"\njam from an unproven address: sent {len(start)} B, got {back} B back: {[a for a, _ in got]}")
    assert [a for a, _ in got] == ["/ok"] and back <= len(start)


def test_prove_against_a_daemon_without_cookies_says_so_at_the_first_answer():
    """An older daemon answers /cookie `bad_address`: prove() returns False on that answer, so
    `musicbridge send` goes on at once; the reply after it is still there to read."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as old, OscClient("127.0.0.1", 0) as c:
        old.bind(("127.0.0.1", 0))
        c.target = old.getsockname()
        old.settimeout(GUARD)

        def answer(data: bytes, to) -> None:
            address = decode(data)[0][0]
            old.sendto(encode("/error", ["bad_address", f"unknown address {address!r}", address, 0]), to)
            old.sendto(encode("/pong"), to)

        threading.Thread(target=lambda: answer(*old.recvfrom(65535)), daemon=True).start()
        assert c.prove(GUARD) is False
        assert c.receive(GUARD) == ("/pong", [])
