"""The engine on other machines (issue #29): `musicbridge worker` on a real two-node Ray cluster, and
`generate`, `render` and `serve` with `--engine URL`, all real processes over loopback.

Tests run in file order and share one cluster and worker (tests/remote/conftest.py); the fault
tests, which kill replicas, come last and wait until the worker has both replicas again.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import soundfile as sf

from tests.bridge.osc_helpers import drain, expect
from tests.remote.conftest import KEY, Relay, mb, replica_stacks, replica_stats
from tests.remote.ray_cluster import free_port, listening_beyond_loopback, private_network


def test_generate_through_the_worker_writes_the_same_file_as_local(worker, tiny_melody_dir, tmp_path):
    common = ["--model", str(tiny_melody_dir), "--prompt", "lofi beat", "--seconds", "1.5", "--seed", "11",
              "--dtype", "float32", "--device", "cpu"]
    local = mb("generate", *common, "--out", str(tmp_path / "local.wav"))
    assert local.returncode == 0, local.stderr
    remote = mb("generate", *common, "--out", str(tmp_path / "remote.wav"), "--engine", worker.url,
                "--engine-key", KEY)
    assert remote.returncode == 0, remote.stderr + worker.log_text()[-3000:]
    a, b = (tmp_path / "local.wav").read_bytes(), (tmp_path / "remote.wav").read_bytes()
    assert len(a) > 1000 and a == b


def test_requests_without_the_key_or_with_a_wrong_one_never_reach_the_engine(worker, tiny_melody_dir, tmp_path):
    import urllib.error
    import urllib.request

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    before = replica_stats(worker)
    body = json.dumps({"prompt": "x", "seconds": 1.0, "params": {"seed": 1}}).encode()
    refused = 0
    for key in (None, "not-the-key-0123456789"):
        assert worker.get("/v1/info", key=key)[0] == 401
        headers = {"content-type": "application/json", **({} if key is None else {"x-musicbridge-key": key})}
        req = urllib.request.Request(worker.url + "/v1/tokens", data=body, headers=headers, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 401
        with pytest.raises(InvalidStatus) as ws:
            connect(worker.url.replace("http", "ws") + "/v1/jam",
                    additional_headers={} if key is None else {"x-musicbridge-key": key}, open_timeout=30)
        assert ws.value.response.status_code == 403
        refused += 3
    # Through the product: a wrong key is one line and exit status 2, before any generation.
    r = mb("generate", "--model", str(tiny_melody_dir), "--prompt", "x", "--seconds", "1", "--out",
           str(tmp_path / "x.wav"), "--engine", worker.url, "--engine-key", "wrong-key-0123456789")
    assert r.returncode == 2 and "refused" in r.stderr and "Traceback" not in r.stderr
    refused += 1
    short = mb("generate", "--model", str(tiny_melody_dir), "--prompt", "x", "--out", str(tmp_path / "y.wav"),
               "--engine", worker.url, "--engine-key", "short")
    assert short.returncode == 2 and "16-256 characters" in short.stderr
    assert not (tmp_path / "x.wav").exists() and not (tmp_path / "y.wav").exists()
    after = replica_stats(worker)
    assert set(after) == set(before)
    total = lambda stats, k: sum(s[k] for s in stats.values())  # noqa: E731
    assert total(after, "requests") == total(before, "requests")
    assert total(after, "engine_calls") == total(before, "engine_calls")
    assert total(after, "steps") == total(before, "steps")
    assert total(after, "jams") == total(before, "jams")
    assert total(after, "refused") >= total(before, "refused") + refused


def test_nothing_of_the_cluster_listens_beyond_loopback(worker):
    """Ray listens on every interface for several ports whatever --node-ip-address says; the test
    cluster runs where loopback is the only interface, so nothing it opens is reachable from
    outside this machine."""
    if not worker.cluster.private:
        pytest.skip("not root, or no unshare/ip: the cluster shares the machine's network namespace")
    assert worker.cluster.replica_pids(), "the worker's replicas are up"
    assert listening_beyond_loopback() == []


def test_a_replica_writes_its_threads_stacks_to_the_workers_log_on_sigusr1(worker):
    """For a stalled replica's bug report: `kill -USR1` on it puts every thread's stack in the log of
    `musicbridge worker`, and the replica keeps serving."""
    before = len(worker.log_text())
    text = replica_stacks(worker)[-(len(worker.log_text()) - before):]
    assert "most recent call first" in text and "Thread 0x" in text, text[-3000:]
    assert len(replica_stats(worker)) == 2  # both replicas still answer


def test_the_loopback_check_sees_a_socket_on_another_interface():
    """`listening_beyond_loopback` itself, in a namespace of its own given a second interface (a
    veth pair, 10.9.9.9): a listener there or on the wildcard is reported, one on 127.0.0.1 is not."""
    import socket
    import subprocess

    with private_network() as private:
        if not private:
            pytest.skip("not root, or no unshare/ip: no namespace to add an interface to")
        assert listening_beyond_loopback() == []
        subprocess.run("ip link add mbt0 type veth peer name mbt1 && ip addr add 10.9.9.9/24 dev mbt0 && "
                       "ip link set mbt0 up && ip link set mbt1 up", shell=True, check=True)
        socks = []
        for host in ("127.0.0.1", "0.0.0.0", "10.9.9.9"):
            s = socket.socket()
            s.bind((host, 0))
            s.listen()
            socks.append(s)
        try:
            found = listening_beyond_loopback()
            ports = {int(x.split(":")[1], 16) for x in found}
            assert ports == {socks[1].getsockname()[1], socks[2].getsockname()[1]}, found
        finally:
            for s in socks:
                s.close()


def test_an_unreachable_worker_is_one_clear_line_at_start(tiny_melody_dir, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    r = mb("generate", "--model", str(tiny_melody_dir), "--prompt", "x", "--out", str(tmp_path / "x.wav"),
           "--engine", url, "--engine-key", KEY)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cannot reach the engine at {url}: connection refused" in r.stderr
    s = mb("serve", "--model", str(tiny_melody_dir), "--port", "0", "--audio", "none", "--session-dir",
           str(tmp_path / "s"), "--engine", url, "--engine-key", KEY)
    assert s.returncode == 2 and "Traceback" not in s.stderr and "cannot reach the engine" in s.stderr


# Prompts of one token length (3): a melody checkpoint's conditioning is a prefix padded to the
# longest prompt of its batch, so its takes depend on their batch-mates' prompt lengths, locally too
# (render --batch-size 1 against 8). Serve batches what arrives together, so only prompts that
# pad alike make a remote render comparable bit for bit with a local one (docs/remote.md).
SESSION = """\
tempo = 120
signature = "4/4"

[[track]]
name = "drums"
prompt = "lofi drums"
bars = 2
seed = 1

[[track]]
name = "bass"
prompt = "lofi bass"
bars = 2
seed = 2

[[track]]
name = "pad"
prompt = "warm pad"
seconds = 3.0
seed = 3

[[track]]
name = "keys"
prompt = "lofi horn"
seconds = 2.5
seed = 4
"""


def test_render_spreads_a_sessions_tracks_over_both_nodes(worker, tiny_melody_dir, tmp_path):
    song = tmp_path / "song.toml"
    song.write_text(SESSION)
    model = ["--model", str(tiny_melody_dir), "--device", "cpu", "--dtype", "float32"]
    remote = mb("render", str(song), *model, "--out", str(tmp_path / "remote"), "--engine", worker.url,
                "--engine-key", KEY)
    assert remote.returncode == 0, remote.stderr
    local = mb("render", str(song), *model, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    summary = json.loads((tmp_path / "remote" / "song.render.json").read_text())
    served = summary["engine"]["served_by"]
    assert len(served) == 4
    assert len({s["node"] for s in served}) == 2, served  # both Ray nodes made takes
    pids = worker.cluster.replica_pids()
    assert {s["pid"] for s in served} <= set(pids) and {pids[s["pid"]] for s in served} == {0, 1}
    for track in ("drums", "bass", "pad", "keys"):  # every stem is the one a local render makes
        a = json.loads((tmp_path / "remote" / f"{track}.json").read_text())["result"]["raw_sha256"]
        b = json.loads((tmp_path / "local" / f"{track}.json").read_text())["result"]["raw_sha256"]
        assert a == b, track
        ra, rb = (sf.read(str(tmp_path / d / f"{track}.wav"), dtype="int32")[0] for d in ("remote", "local"))
        assert ra.shape == rb.shape and (ra == rb).all(), track  # the files differ only in their BWF time stamp


@pytest.fixture(scope="module")
def daemon(worker, tiny_melody_dir, serve_daemon, tmp_path_factory):
    """`musicbridge serve --engine URL` (stems only)."""
    base = tmp_path_factory.mktemp("remote-serve")
    with serve_daemon(base, tiny_melody_dir, "--engine", worker.url, "--engine-key", KEY, "--max-seconds", "600",
                      exit_code=None) as (d, c):
        yield d, c


def _job(c, address: str, *args, timeout: float = 240.0, seen: list | None = None) -> tuple[int, tuple]:
    c.send(address, *args)
    job_id, _track = expect(c, "/job/accepted", 30.0)
    r = c.wait_for(lambda a, v: a in ("/job/done", "/job/failed", "/job/cancelled") and v and v[0] == job_id,
                   timeout, seen)
    assert r is not None, f"job {job_id} never finished; replies: {seen}"
    return job_id, r


def test_serve_with_a_remote_engine_runs_osc_jobs_there(daemon, tiny_melody_dir, tmp_path):
    d, c = daemon
    drain(c, 0.1)
    c.send("/track/drums/preset", "plain")
    expect(c, "/ok")
    c.send("/status")
    status = expect(c, "/status")
    assert status[-1].startswith("remote http://127.0.0.1:") and status[-1].endswith(": ok")
    _id, (address, args) = _job(c, "/track/drums/generate", 2.0)
    assert address == "/job/done", args
    stem = Path(args[1])
    assert stem.is_file() and stem.stat().st_size > 1000
    # The stem's sidecar regenerates, locally, to the same audio: the remote take is the local take.
    again = mb("render", "--from-sidecar", str(stem.with_suffix(".json")), "--model", str(tiny_melody_dir),
               "--out", str(tmp_path))
    assert again.returncode == 0 and "identical to" in again.stdout, again.stdout + again.stderr


def test_status_says_when_the_worker_cannot_be_reached(worker, tiny_melody_dir, serve_daemon, tmp_path):
    relay = Relay(int(worker.url.rsplit(":", 1)[1]))
    try:
        with serve_daemon(tmp_path, tiny_melody_dir, "--engine", f"http://127.0.0.1:{relay.port}", "--engine-key",
                          KEY, exit_code=None) as (d, c):
            def engine_line() -> str:
                drain(c, 0.05)
                c.send("/status")
                return expect(c, "/status")[-1]

            assert engine_line().endswith(": ok")
            relay.cut()
            deadline = time.monotonic() + 60
            while "unreachable" not in (line := engine_line()):
                assert time.monotonic() < deadline, line
                time.sleep(0.5)
            assert "connection refused" in line
            c.send("/ping")
            expect(c, "/pong")
            relay.resume()
            deadline = time.monotonic() + 60
            while not (line := engine_line()).endswith(": ok"):
                assert time.monotonic() < deadline, line
                time.sleep(0.5)
    finally:
        relay.close()


def test_bench_remote_measures_concurrent_jams_and_offline_jobs(worker, tiny_melody_dir):
    r = mb("bench", "--remote", worker.url, "--engine-key", KEY, "--model", str(tiny_melody_dir), "--jams", "2",
           "--jobs", "2", "--jam-seconds", "4", "--seconds", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| jam ") or ln.startswith("| 2 offline")]
    assert len(rows) == 3, r.stdout
    assert "B/s of codes" in r.stdout and "error:" not in r.stdout


# ---------------------------------------------------------------- faults (last: they kill replicas)


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _busy_replica(worker, timeout: float = 60.0) -> int:
    """The replica process that is decoding: the one whose CPU time grows (the other idles)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = list(worker.cluster.replica_pids())
        t0 = {p: _cpu_ticks(p) for p in pids}
        time.sleep(1.0)
        grew = {p: _cpu_ticks(p) - t0[p] for p in pids}
        busy = [p for p, g in grew.items() if g >= 30]  # 0.3 s of CPU in 1 s: decoding, not idling
        if len(busy) == 1:
            return busy[0]
    raise AssertionError("no replica was decoding")


def test_a_replica_killed_mid_job_retries_it_with_the_same_seed(daemon, worker, tiny_melody_dir, tmp_path):
    d, c = daemon
    replica_stats(worker)  # both replicas up
    drain(c, 0.1)
    c.send("/track/long/preset", "plain")
    expect(c, "/ok")
    pinger = d.client()
    pongs, stop = [], threading.Event()

    def ping() -> None:
        while not stop.is_set():
            pinger.send("/ping")
            pongs.append(pinger.wait_for(lambda a, _: a == "/pong", 10.0) is not None)
            time.sleep(0.3)

    t = threading.Thread(target=ping, daemon=True)
    t.start()
    try:
        c.send("/track/long/generate", 240.0)
        job_id, _ = expect(c, "/job/accepted", 30.0)
        victim = _busy_replica(worker)
        os.kill(victim, signal.SIGKILL)
        seen: list = []
        r = c.wait_for(lambda a, v: a in ("/job/done", "/job/failed") and v and v[0] == job_id, 300.0, seen)
    finally:
        stop.set()
        t.join(15)
        pinger.sock.close()
    assert r is not None, f"job {job_id} neither finished nor failed: {seen[-5:]}"
    assert pongs and all(pongs), f"{pongs.count(False)} of {len(pongs)} pings unanswered"
    assert "sending it again with the same seed" in d.log_text()
    assert r[0] == "/job/done", r
    stem = Path(r[1][1])
    again = mb("render", "--from-sidecar", str(stem.with_suffix(".json")), "--model", str(tiny_melody_dir),
               "--out", str(tmp_path))
    assert again.returncode == 0 and "identical to" in again.stdout, again.stdout + again.stderr
    stem.unlink()
    replica_stats(worker)  # Serve has replaced the killed replica


# ---------------------------------------------------------------- jams (JACK dummy server)


def _jam_replica(worker) -> tuple[int, dict]:
    """(pid, status) of the replica holding the one open jam."""
    stats = replica_stats(worker)
    holding = [s for s in stats.values() if s["jams_open"] == 1]
    assert len(holding) == 1, stats
    return holding[0]["served_by"]["pid"], holding[0]


def test_a_jam_through_a_remote_engine_plays_and_follows_notes_and_survives_its_replica(
        worker, tiny_melody_dir, tmp_path):
    """serve --engine URL --audio default on a JACK dummy server: the jam streams continuously into a
    JACK capture client, the notes sent to the daemon condition the chunks on the replica, and when
    the replica holding the jam is killed (-9) the jam reports behind, reconnects and goes on."""
    import numpy as np

    from tests.bridge.osc_helpers import DaemonProcess
    from tests.bridge.test_daemon_live import SR, TEMPO, Chunks, _follow_a_change
    from tests.jack_server import jack_server
    from tests.plugin_host.jack_capture import capture

    presets = tmp_path / "presets"
    presets.mkdir()
    with jack_server(rate=SR, period=256):
        d = DaemonProcess(tiny_melody_dir, tmp_path / "session", presets, "--audio", "default", "--engine",
                          worker.url, "--engine-key", KEY)
        try:
            with d.client() as c, capture(90.0) as cap:
                d.wait_ready(c)
                cap.connect("PortAudio")
                for msg in (("/transport/tempo", TEMPO), ("/track/lead/prompt", "sax")):
                    c.send(*msg)
                    expect(c, "/ok")
                c.send("/track/lead/note", 64, 100)  # E held (notes are not answered)
                c.send("/jam/start", "lead")
                expect(c, "/ok")
                ch = Chunks(c)

                def change():
                    c.send("/track/lead/note", 64, 0)
                    c.send("/track/lead/note", 69, 80)  # A

                # The chroma in each /jam/chunk is what the replica reports conditioning it on.
                _follow_a_change(ch, change, "9", "4")
                ch.until(6)
                c.send("/jam/status", "lead")
                st = ch.expect("/jam/status")
                steady = len(ch.chunks)
                pid, before = _jam_replica(worker)
                os.kill(pid, signal.SIGKILL)
                ch.until(steady + 4, timeout=240.0)
                behind = [o[1] for o in ch.other if o[0] == "/jam/status" and o[1][2] == 1]
                _pid, after = _jam_replica(worker)
                c.send("/ping")
                ch.expect("/pong")
                c.send("/jam/stop", "lead")
                ch.expect("/ok")
                time.sleep(1.0)
        finally:
            assert d.stop(signal.SIGTERM) == 0, d.log_text()
    # Before the kill: no underruns, and the part ran on without a gap over >= 5 chunks.
    assert st[1] == "playing" and st[5] == 0 and st[6] == "", st
    rec = cap.audio[0]
    nz = np.nonzero(rec)[0]
    body = rec[nz[0]:nz[0] + 5 * 2 * SR + SR]  # the first five 2 s chunks and a bit
    assert len(body) == 5 * 2 * SR + SR
    zero = np.concatenate([[0], (body == 0).astype(np.int8), [0]])
    runs = np.diff(np.nonzero(np.diff(zero))[0])[::2] if zero.any() else np.array([0])
    assert runs.max(initial=0) < 256, f"a silent gap of {runs.max()} frames"
    # The kill: reported behind, resumed on a replica from the jam's own codes, chunks in order.
    assert behind, ch.other[-10:]
    assert "jam lost its replica" in d.log_text()
    assert after["resumed_jams"] >= 1 and after["served_by"]["pid"] != pid
    assert [int(a[1]) for a in ch.chunks] == list(range(len(ch.chunks)))
    replica_stats(worker)  # both replicas back for what follows
