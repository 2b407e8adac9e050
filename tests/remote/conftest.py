"""The remote tests' shared cluster: two Ray nodes on loopback and `musicbridge worker` on them,
started once per test session (tens of seconds) and stopped, every process of it, at the end."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.remote.ray_cluster import ROOT, Cluster, env, free_port, ray_cluster

KEY = "studio-key-0123456789"


@dataclass
class Worker:
    url: str
    cluster: Cluster
    proc: subprocess.Popen
    log: Path
    ca_file: str | None = None  # the certificate to trust for an https:// worker

    def get(self, path: str, key: str | None = KEY) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, headers={} if key is None else {"x-musicbridge-key": key})
        context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        try:
            with urllib.request.urlopen(req, timeout=30, context=context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def mb(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """A real `musicbridge` subprocess (this worktree's code)."""
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout, **kw)


@contextlib.contextmanager
def run_worker(cluster: Cluster, model_dir: Path, log: Path, *extra: str, replicas: int = 2,
               scheme: str = "http") -> Iterator[Worker]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bridge.cli", "worker", "--address", cluster.address,
                             "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--key", KEY,
                             "--http-port", str(port), "--replicas", str(replicas), "--cpus-per-replica", "1",
                             *extra], cwd=ROOT, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    w = Worker(f"{scheme}://127.0.0.1:{port}", cluster, proc, log)
    try:
        deadline = time.monotonic() + 240
        while "engine serving at" not in w.log_text():
            assert proc.poll() is None, f"the worker exited {proc.returncode}:\n{w.log_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the worker did not come up:\n{w.log_text()[-4000:]}"
            time.sleep(0.5)
        yield w
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# Package-scoped: the cluster's network namespace, which the test thread enters, ends with this
# package's tests.
@pytest.fixture(scope="package")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with ray_cluster(tmp_path_factory.mktemp("ray")) as c:
        yield c


@pytest.fixture(scope="package")
def worker(cluster, tiny_melody_dir, tmp_path_factory) -> Iterator[Worker]:
    """The tiny melody model (jams follow notes) served by two replicas, one on each node (each node has
    one CPU for them)."""
    with run_worker(cluster, tiny_melody_dir, tmp_path_factory.mktemp("worker") / "worker.log") as w:
        yield w


def replica_stacks(worker: Worker) -> str:
    """Every replica's thread stacks (`kill -USR1`, model/remote/app.py), as the worker's log shows
    them: for the message of a test that found a replica stalled."""
    for pid in worker.cluster.replica_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(3.0)  # Ray forwards the replicas' output to the worker's log
    return worker.log_text()[-12000:]


def replica_stats(worker: Worker, n: int = 2, timeout: float = 180.0) -> dict[str, dict]:
    """/v1/status of each of n replicas (Serve routes each call to one; ask until all have answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} replicas answered: {list(seen)}"
        try:
            code, st = worker.get("/v1/status")
        except OSError:
            time.sleep(0.5)
            continue
        if code == 200:
            seen[st["served_by"]["replica"]] = st
        else:
            time.sleep(0.5)
    return seen


class Relay:
    """A TCP relay in front of the worker: the network between daemon and worker, which a test can cut."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._socket, self._threading = socket, threading
        self._conns: list = []
        self._server = None
        self.resume()

    def resume(self) -> None:
        s = self._socket.socket()
        s.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        self._server = s
        self._threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def _accept(self, server) -> None:
        while True:
            try:
                a, _ = server.accept()
            except OSError:
                return
            try:
                b = self._socket.create_connection(self.target)
            except OSError:
                a.close()
                continue
            self._conns += [a, b]
            for x, y in ((a, b), (b, a)):
                self._threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(x, y) -> None:
        try:
            while data := x.recv(65536):
                y.sendall(data)
        except OSError:
            pass
        finally:
            for s in (x, y):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        """Nothing gets through: the listener closes and every connection is dropped."""
        self._server.close()
        for c in self._conns:
            with contextlib.suppress(OSError):
                c.shutdown(self._socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                c.close()
        self._conns = []

    def close(self) -> None:
        self.cut()
