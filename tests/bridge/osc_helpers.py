"""Starting the real daemon as a subprocess and talking to it over loopback UDP (shared by the OSC tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from bridge.osc.udp import OscClient

ROOT = Path(__file__).resolve().parents[2]

PLAIN_PRESET = """description = "test preset"
prompt = "lofi drums"
add_bpm = false

[params]
top_k = 50
seed = 1
"""


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonProcess:
    """`python -m bridge.cli serve ...` on a free loopback port; stderr goes to a log file."""

    def __init__(self, model_dir: Path, session_dir: Path, presets_dir: Path, *extra: str):
        self.port = free_udp_port()
        self.session_dir = session_dir
        self.log_path = session_dir.parent / f"daemon-{self.port}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   MUSICBRIDGE_PRESETS=str(presets_dir))
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bridge.cli", "serve", "--model", str(model_dir), "--device", "cpu",
             "--dtype", "float32", "--port", str(self.port), "--session-dir", str(session_dir),
             "--audio", "none", *extra],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def client(self, **kw) -> OscClient:
        return OscClient("127.0.0.1", self.port, **kw)

    def wait_ready(self, client: OscClient, timeout: float = 120.0, prove: bool = True) -> None:
        """Until /ping is answered; then (prove) the client's host proves its address, as a DAW's
        client does at start, so job events reach it whatever their size (docs/osc.md)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon exited early:\n{self.log_text()}"
            client.send("/ping")
            if client.wait_for(lambda a, _: a == "/pong", 0.5):
                assert not prove or client.prove(), f"the cookie round trip failed:\n{self.log_text()[-3000:]}"
                return
        raise AssertionError(f"daemon never answered /ping:\n{self.log_text()}")

    def io(self) -> dict[str, int]:
        """The daemon's I/O counters so far, all threads (Linux /proc/<pid>/io): rchar and wchar are
        the bytes it read and wrote through read()/write() and their kin, files and pipes alike."""
        with open(f"/proc/{self.proc.pid}/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f if line.strip())}

    def log_text(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if not self.log.closed:
            self.log.close()
        return rc


ANSWER_GUARD = 30.0  # seconds: only a daemon that stopped answering waits this long (not a speed claim)


def ping(c: OscClient, after: str) -> None:
    """/ping answered /pong, with nothing else on the way: `after` was read and the daemon goes on."""
    c.send("/ping")
    seen: list = []
    assert c.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD, seen) is not None, f"no /pong after {after}"
    assert seen == [], f"after {after}: {seen}"


def udp_drops(port: int) -> int:
    """Datagrams the kernel dropped on the daemon's socket (its receive buffer was full)."""
    with open("/proc/net/udp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(f":{port:04X}"):
                return int(cols[-1])
    raise AssertionError(f"no UDP socket on port {port}")


def expect(client: OscClient, address: str, timeout: float = 10.0, seen: list | None = None):
    r = client.wait_for(lambda a, _: a == address, timeout, seen)
    assert r is not None, f"no {address} reply within {timeout} s (other replies: {seen})"
    return r[1]


def drain(client: OscClient, quiet: float = 0.3) -> list:
    return list(client.replies(quiet))


def finished(client: OscClient, ids: list[int], timeout: float = 120.0) -> dict[int, Path]:
    """Wait for every job in `ids` to finish: job id -> its stem (a job's /error fails the test)."""
    done: dict[int, Path] = {}
    seen: list = []
    while len(done) < len(ids):
        r = client.wait_for(lambda a, v: a in ("/job/done", "/error") and v and v[0] in ids, timeout, seen)
        assert r is not None and r[0] == "/job/done", seen
        done[r[1][0]] = Path(r[1][1])
    return {i: done[i] for i in ids}


def stem_of(client: OscClient, track: str, *args) -> str:
    """Ask `track` for one stem (`/track/<track>/generate *args`) and wait for its file."""
    drain(client, 0.05)
    client.send(f"/track/{track}/generate", *args)
    job, _track = expect(client, "/job/accepted")
    seen: list = []
    r = client.wait_for(lambda a, v: a in ("/job/done", "/error") and v and (v[0] == job or v[-1] == job), 120,
                        seen)
    assert r is not None and r[0] == "/job/done", (r, seen)
    return r[1][1]


@contextlib.contextmanager
def serving(base: Path, model_dir: Path, *extra: str, session_dir: Path | None = None,
           allow_dir: Path | None = None, reply_to: bool = False, exit_code: int | None = 0):
    """`musicbridge serve` on `base`/session (or `session_dir`) with the plain preset in `base`/presets;
    yields (DaemonProcess, OscClient) once it answers /ping.

    allow_dir: passed as the first --allow-dir. reply_to: the client's port is given as --reply-to
    (a DAW's fixed reply port) instead of replies going to the sender. However the block ends, the
    daemon is stopped (SIGTERM, then SIGKILL), reaped and the client's socket closed; when the block
    ended without an error, the daemon's exit status must be `exit_code` (None: not checked).
    """
    presets = base / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    args = [*(("--allow-dir", str(allow_dir)) if allow_dir is not None else ())]
    client = OscClient("127.0.0.1", 0) if reply_to else None
    if client is not None:
        args += ["--reply-to", f"127.0.0.1:{client.port}"]
    try:
        d = DaemonProcess(model_dir, session_dir or base / "session", presets, *args, *extra)
    except BaseException:
        if client is not None:
            client.sock.close()
        raise
    if client is None:
        client = d.client()
    else:
        client.target = ("127.0.0.1", d.port)
    try:
        d.wait_ready(client)
        yield d, client
    finally:
        rc = d.stop()
        client.sock.close()
    if exit_code is not None:
        assert rc == exit_code, f"the daemon exited {rc}, not {exit_code}:\n{d.log_text()[-3000:]}"
