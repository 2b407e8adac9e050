"""A private two-node Ray cluster on loopback for the remote-engine tests.

Both nodes run on this machine, bound to 127.0.0.1, CPU only, with a private temp dir and
usage statistics off. Ray 2.60 listens on every interface for several of its ports whatever
`--node-ip-address` says (docs/remote.md), so where it can (as root, with `unshare` and `ip`) the
cluster runs in a network namespace of its own whose only interface is loopback: the test's
thread enters it (`private_network`), and every process it then starts is in it too.

Each node is one `ray start --block` process in its own process group: SIGTERM makes it stop the
processes it started, and the group is killed after that, so only this cluster's processes ever
go (never `ray stop`, which stops every cluster of the user).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
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
    private: bool = False  # in a network namespace of its own (`private_network`)

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


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def private_network() -> Iterator[bool]:
    """This thread, and every process and thread it starts from now on, in a new network namespace
    with only loopback up, until the block ends. Yields False and changes nothing where one cannot
    be made (not root, or no `unshare`/`ip`)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        yield False
        return
    # The namespace lives as long as this holder does; it brings loopback up, says so, and waits.
    holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && echo up && exec sleep infinity"],
                              stdout=subprocess.PIPE, text=True)
    libc = ctypes.CDLL(None, use_errno=True)
    old = new = -1
    entered = False
    try:
        if (holder.stdout.readline() or "").strip() != "up":
            yield False
            return
        old = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        new = os.open(f"/proc/{holder.pid}/ns/net", os.O_RDONLY)
        if libc.setns(new, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the test's network namespace")
        entered = True
        yield True
    finally:
        if entered and libc.setns(old, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the network namespace the tests started in")
        for fd in (old, new):
            if fd >= 0:
                os.close(fd)
        holder.kill()
        holder.wait()


def listening_beyond_loopback() -> list[str]:
    """TCP and UDP sockets listening in this thread's network namespace on an address other
    than loopback: a wildcard counts where the namespace has an interface besides `lo`."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout.splitlines()
    only_lo = all(ln.split(":")[1].strip().split("@")[0] == "lo" for ln in links if ln.strip())
    out = []
    for name in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/thread-self/net/{name}").read_text().splitlines()[1:]:
                f = line.split()
                local, state = f[1], f[3]
                if name.startswith("tcp") and state != "0A":  # LISTEN
                    continue
                addr = local.split(":")[0]  # hex, in the kernel's byte order: 127.x.x.x ends in 7F
                if len(addr) == 8:
                    loop = addr.endswith("7F")
                else:
                    loop = addr == "00000000000000000000000001000000" or (
                        addr.startswith("0000000000000000FFFF0000") and addr.endswith("7F"))
                wild = set(addr) == {"0"}
                if not loop and not (wild and only_lo):
                    out.append(f"{name} {local}")
    return out


@contextlib.contextmanager
def ray_cluster(base: Path, nodes: int = 2, timeout: float = 120.0) -> Iterator[Cluster]:
    with private_network() as private:
        with _cluster(base, nodes, timeout) as cluster:
            cluster.private = private
            yield cluster


@contextlib.contextmanager
def _cluster(base: Path, nodes: int, timeout: float) -> Iterator[Cluster]:
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
