"""A private two-node Ray cluster on loopback for the remote-engine tests.

Both nodes run on this machine, bound to 127.0.0.1, CPU only, with a private temp dir and
usage statistics off. Each node is one `ray start --block` process in its own process group:
SIGTERM makes it stop the processes it started, and the group is killed after that, so only
this cluster's processes ever go (never `ray stop`, which stops every cluster of the user).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """What every process of the cluster (and the worker command) sees: our code, one thread each."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
                HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@dataclass
class Cluster:
    address: str  # host:port of the head's GCS
    temp_dir: Path
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def node_pids(self, node: int) -> set[int]:
        """Every process one node started: its `ray start` and all its descendants (Ray starts its
        workers in process groups of their own, so the group alone does not find them)."""
        return descendants(self.nodes[node].pid)

    def replica_pids(self) -> dict[int, int]:
        """pid -> node index of every Serve replica of the musicbridge app on this cluster."""
        out = {}
        for node in range(len(self.nodes)):
            for pid in self.node_pids(node):
                with contextlib.suppress(OSError):
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                    if "ServeReplica:musicbridge" in cmd:
                        out[pid] = node
        return out


def descendants(root: int) -> set[int]:
    """`root` and every process below it, by parent links in /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += children.get(p, [])
    return out


def _node_args() -> list[str]:
    # Ports a second node on the same machine would otherwise take from the first (fixed defaults).
    return ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0",
            "--object-store-memory", str(200 << 20), "--disable-usage-stats", "--block",
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port())]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", *args], env=env(), cwd=ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM every node's group at once, a short grace, then SIGKILL what is left of each group
    and of every process the nodes had started (found before the first signal)."""
    started = {pid: _start_time(pid) for pid in set().union(*(descendants(p.pid) for p in nodes))
               - {p.pid for p in nodes}}
    for p in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 8.0
    for p in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in nodes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)
    for pid, t in started.items():
        if t is not None and _start_time(pid) == t:  # still ours: a recycled pid has another start time
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _start_time(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _wait_nodes(address: str, n: int, timeout: float, logs: list[Path]) -> None:
    """Until `ray status` on this cluster sees n nodes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run([RAY, "status", "--address", address], env=env(), capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.count(" node_") >= n:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster at {address} did not show {n} nodes in {timeout} s:\n"
                       + "\n".join(p.read_text()[-2000:] for p in logs))


@contextlib.contextmanager
def ray_cluster(base: Path, nodes: int = 2, timeout: float = 120.0) -> Iterator[Cluster]:
    temp = Path(f"/tmp/mbray-{os.getpid()}-{free_port()}")  # Ray's socket paths must stay short
    port = free_port()
    address = f"127.0.0.1:{port}"
    cluster = Cluster(address, temp)
    logs = [base / f"ray-node-{i}.log" for i in range(nodes)]
    try:
        cluster.nodes.append(_start(["--head", "--port", str(port), "--include-dashboard=false",
                                     "--ray-client-server-port", str(free_port()), "--temp-dir", str(temp),
                                     *_node_args()], logs[0]))
        _wait_nodes(address, 1, timeout, logs)
        for i in range(1, nodes):
            cluster.nodes.append(_start(["--address", address, *_node_args()], logs[i]))
        _wait_nodes(address, nodes, timeout, logs)
        yield cluster
    finally:
        _stop(cluster.nodes)
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
