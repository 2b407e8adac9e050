"""A private JACK server (dummy driver: a real audio server with no sound card) for one test.

Each server gets a unique name and every client must see it through JACK_DEFAULT_SERVER, so
tests running in parallel never share one. `jack_server()` sets that variable for this process
(and restores it), waits until a client can connect, yields the name, and kills the server.
PortAudio scans host APIs when sounddevice is first imported: import it after the server is up,
or call plugin_host.output.refresh_devices(). If sounddevice is already imported, this module
re-initialises PortAudio once the server is up, and terminates it before the server goes away
(PortAudio's JACK backend aborts the process at exit if its server vanished under it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@dataclasses.dataclass(frozen=True)
class JackServer:
    name: str
    log: IO[bytes]  # everything jackd printed (xruns, "not finished" clients), readable while it runs

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


@contextlib.contextmanager
def jack_server(rate: int = 48000, period: int = 256, timeout: float = 10.0) -> Iterator[str]:
    with jack_server_process(rate, period, timeout) as server:
        yield server.name


@contextlib.contextmanager
def jack_server_process(rate: int = 48000, period: int = 256, timeout: float = 10.0,
                        realtime: bool = False) -> Iterator[JackServer]:
    """The server with its log; `realtime` runs its process thread at real-time priority, as a
    studio's JACK runs, so that timing tests measure the client under test and not a starved server."""
    jackd = shutil.which("jackd")
    if jackd is None:
        raise RuntimeError("jackd is not installed (Debian package jackd2; run scripts/setup.sh)")
    name = f"mbtest-{uuid.uuid4().hex[:10]}"
    old = os.environ.get("JACK_DEFAULT_SERVER")
    os.environ["JACK_DEFAULT_SERVER"] = name
    # A file, not a pipe: jackd logs every xrun, and a full pipe would block the server.
    log = tempfile.TemporaryFile()
    command = [jackd, "--realtime" if realtime else "--no-realtime", "-n", name, "-d", "dummy", "-r", str(rate),
               "-p", str(period)]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=_die_with_parent)
    try:
        try:
            _wait_ready(proc, name, timeout, log)
        except RuntimeError as e:
            if "Too many servers" not in str(e) or not release_dead_servers():
                raise
            log.seek(0)
            log.truncate()
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
            _wait_ready(proc, name, timeout, log)
        _portaudio(start=True)
        yield JackServer(name, log)
    finally:
        _portaudio(start=False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if old is None:
            os.environ.pop("JACK_DEFAULT_SERVER", None)
        else:
            os.environ["JACK_DEFAULT_SERVER"] = old


def release_dead_servers() -> list[str]:
    """Free the slots of JACK servers that died without closing (killed with -9, as a test run cut
    off by a timeout kills its servers): jackd2 keeps a few server slots in shared memory and
    refuses a new server ("Too many servers already active") once dead ones hold them all. A
    server started under a dead one's name and stopped cleanly gives its slot back. Returns the
    names released."""
    try:
        registry = open("/dev/shm/jack-shm-registry", "rb").read()
    except OSError:
        return []
    names = {m.group(1).decode() for m in re.finditer(rb"jack-\d+:([A-Za-z0-9_.-]+):", registry)}
    running = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            args = cmdline.read_bytes().split(b"\0")
            if args and args[0].endswith(b"jackd") and b"-n" in args:
                running.add(args[args.index(b"-n") + 1].decode(errors="replace"))
    released = []
    for name in sorted(names - running):
        proc = subprocess.Popen(["jackd", "--no-realtime", "-n", name, "-d", "dummy"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        with contextlib.suppress(RuntimeError):
            _wait_ready(proc, name, 5.0, tempfile.TemporaryFile())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
            released.append(name)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return released


def _wait_ready(proc: subprocess.Popen, name: str, timeout: float, log) -> None:
    import jack

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise RuntimeError(f"jackd {name} exited with {proc.returncode}: {err[-400:]}")
        try:
            client = jack.Client("mb-probe", no_start_server=True, servername=name)
        except jack.JackError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"jackd {name} did not become ready in {timeout} s") from None
            time.sleep(0.1)
            continue
        client.close()
        return


def _portaudio(start: bool) -> None:
    sd = sys.modules.get("sounddevice")
    if sd is None:
        return
    while sd._initialized:
        sd._terminate()
    if start:
        sd._initialize()


def _die_with_parent() -> None:
    """Linux: the server gets SIGTERM if the test process is killed (no orphan servers)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
