"""Faults through `musicbridge serve`: kill -9 mid-job then restart, a damaged session.json,
a full disk, and lengths too short for the model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import PLAIN_PRESET, ROOT, DaemonProcess, drain, expect


@pytest.fixture
def presets(tmp_path):
    p = tmp_path / "presets"
    p.mkdir()
    (p / "plain.toml").write_text(PLAIN_PRESET)
    return p


def failed_reports(c: OscClient, ids: set[int], timeout: float = 120.0) -> dict[int, str]:
    got: dict[int, str] = {}
    while set(got) != ids:
        r = c.wait_for(lambda a, v: a == "/job/failed", timeout)
        assert r is not None, f"only {got} reported of {ids}"
        got[r[1][0]] = r[1][1]
    return got


def test_kill_9_mid_job_then_restart_reports_the_interrupted_jobs(tmp_path, presets, tiny_model_dir):
    session = tmp_path / "session"
    d1 = DaemonProcess(tiny_model_dir, session, presets)
    c = d1.client()  # the same reply address across the restarts, as a DAW's
    try:
        d1.wait_ready(c)
        c.send("/track/t/preset", "plain")
        expect(c, "/ok")
        c.send("/track/t/generate", 30.0)
        running = expect(c, "/job/accepted")[0]
        c.send("/track/t/generate", 29.0)
        queued = expect(c, "/job/accepted")[0]
        assert c.wait_for(lambda a, v: a == "/job/progress" and v[0] == running, 30.0)
        stems = session / "stems"
        (stems / ".t.x8k2m.part.wav").write_bytes(b"")  # what a kill during a stem write leaves
        (session / ".session.abc.json.tmp").write_bytes(b"{")
        session_before = json.loads((session / "session.json").read_text())
        d1.stop(signal.SIGKILL)

        d2 = DaemonProcess(tiny_model_dir, session, presets)
        c.target = ("127.0.0.1", d2.port)
        try:
            assert failed_reports(c, {running, queued}) == {running: "interrupted", queued: "interrupted"}
            d2.wait_ready(c)
            assert [p.name for p in stems.iterdir() if ".part" in p.name] == []
            assert not (session / ".session.abc.json.tmp").exists()
            assert json.loads((session / "session.json").read_text()) == session_before
            c.send("/track/t/state")
            assert json.loads(expect(c, "/track/t/state")[0])["preset"] == "plain"
            log = d2.log_text()
            assert f"job {running} (/track/t/generate) was interrupted" in log and "stale temporary" in log

            # with --resume the interrupted job is queued again, under a new id
            c.send("/track/t/generate", 30.0)
            again = expect(c, "/job/accepted")[0]
            assert again == queued + 1  # ids continue across the crash
            assert c.wait_for(lambda a, v: a == "/job/progress" and v[0] == again, 30.0)
        finally:
            d2.stop(signal.SIGKILL)
        d3 = DaemonProcess(tiny_model_dir, session, presets, "--resume", "--grace", "0")
        c.target = ("127.0.0.1", d3.port)
        try:
            r = c.wait_for(lambda a, v: a == "/job/accepted", 120.0)
            assert r is not None and r[1] == [again + 1, "t"], r
            c.send(f"/job/{again + 1}/cancel")
            assert c.wait_for(lambda a, v: a == "/job/cancelled" and v[0] == again + 1, 60.0)
        finally:
            assert d3.stop() == 0
    finally:
        c.sock.close()


@pytest.mark.parametrize("field,value,says", [
    ("next_job_id", 1e30, "next_job_id must be a whole number"),
    ("next_job_id", -5, "next_job_id must be a whole number"),
    ("transport.position", float("inf"), "transport.position"),
    ("transport.denominator", 3, "transport.denominator"),
    ("tracks.t.params.top_k", -1, "params.top_k"),
])
def test_a_session_json_field_out_of_range_stops_serve_with_its_name(tmp_path, tiny_model_dir, field, value, says):
    session = tmp_path / "session"
    session.mkdir()
    data = {"version": 1, "transport": {"tempo": 120.0, "numerator": 4, "denominator": 4, "playing": False,
                                       "position": 0.0},
            "tracks": {"t": {"prompt": "pad", "preset": "", "params": {"top_k": 50}, "melody": None,
                             "continuation": None}}, "next_job_id": 3}
    node = data
    *parents, last = field.split(".")
    for k in parents:
        node = node[k]
    node[last] = value
    (session / "session.json").write_text(json.dumps(data))  # inf/1e30 as JSON numbers
    out = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(tiny_model_dir),
                          "--port", "0", "--session-dir", str(session)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and says in out.stderr and "session.json" in out.stderr, out.stderr


def test_lengths_below_one_frame_are_refused_when_the_message_arrives(tmp_path, presets, tiny_model_dir):
    d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets)
    try:
        with d.client() as c:
            d.wait_ready(c)
            c.send("/track/t/preset", "plain")
            expect(c, "/ok")
            c.send("/track/t/generate", 1e-9)
            err = expect(c, "/error")
            assert err[0] == "bad_args" and "shorter than one frame" in err[1], err
            drain(c, 0.3)
            assert "job" not in d.log_text().split("shorter than one frame")[-1]
    finally:
        assert d.stop() == 0


def test_a_native_crash_leaves_every_threads_stack_in_the_log(tmp_path, presets, tiny_model_dir):
    """serve enables faulthandler: a segmentation fault (here sent as the signal) is not a bare
    exit status but a stack of each thread in the daemon's log."""
    d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets)
    try:
        with d.client() as c:
            d.wait_ready(c)
        d.proc.send_signal(signal.SIGSEGV)
        rc = d.proc.wait(30)
    finally:
        d.stop(signal.SIGKILL)
    assert rc == -signal.SIGSEGV
    log = d.log_text()
    assert "Fatal Python error: Segmentation fault" in log, log[-2000:]
    assert "Current thread" in log or "Thread 0x" in log, log[-2000:]


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0,
                    reason="needs root and unshare to mount a tiny private tmpfs")
def test_a_full_disk_fails_the_job_naming_cause_and_path(tmp_path, presets, tiny_model_dir):
    """The stems folder is a 256 KB tmpfs in the daemon's own mount namespace."""
    stems = tmp_path / "stems"
    stems.mkdir()
    port_client = OscClient("127.0.0.1", 0)
    from tests.bridge.osc_helpers import free_udp_port

    port = free_udp_port()
    log = open(tmp_path / "daemon.log", "w")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MUSICBRIDGE_PRESETS=str(presets))
    cmd = (f"mount -t tmpfs -o size=256k tmpfs {stems} && exec {sys.executable} -m bridge.cli serve "
           f"--model {tiny_model_dir} --device cpu --dtype float32 --port {port} "
           f"--session-dir {tmp_path / 'session'} --stems-dir {stems} --audio none")
    proc = subprocess.Popen(["unshare", "-m", "sh", "-c", cmd], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        c = port_client
        c.target = ("127.0.0.1", port)
        for _ in range(240):
            c.send("/ping")
            if c.wait_for(lambda a, _: a == "/pong", 0.5):
                break
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
        assert c.prove()  # the job's /error is an event: it reaches a host that proved its address
        c.send("/track/t/preset", "plain")
        expect(c, "/ok")
        c.send("/track/t/generate", 10.0)  # 10 s at 48 kHz stereo 24-bit is 2.9 MB
        job = expect(c, "/job/accepted")[0]
        err = c.wait_for(lambda a, v: a == "/error" and v[-1] == job, 120.0)
        assert err is not None, (tmp_path / "daemon.log").read_text()
        assert err[1][0] == "failed" and "the disk is full" in err[1][1] and str(stems) in err[1][1], err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        port_client.sock.close()
