"""Record what a JACK client plays, from a second JACK client in its own process.

Its own process on purpose: a capture callback inside the test process would compete for the
GIL with the code under test (an engine generating, the output callback), and its own late
cycles would show up as corrupted recordings that are not the output's fault.

    with capture(seconds=4.0) as cap:     # starts the recorder process, waits until it runs
        ...open the output...
        cap.connect("PortAudio")         # its first outputs -> our inputs, in order
        ...play...
    cap.audio                            # (channels, frames) float32, after the block
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


class Capture:
    def __init__(self, proc: subprocess.Popen, path: Path, log: Path):
        self._proc = proc
        self._path = path
        self._log = log
        self.audio = np.zeros((0, 0), np.float32)
        self.missed_cycles = 0
        self.block_starts = np.zeros(0, np.int64)  # recording index where each JACK cycle's block starts
        self.block_frames = np.zeros(0, np.int64)  # ... and that cycle's JACK frame time

    def _ask(self, line: str, timeout: float = 30.0) -> str:
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            self._proc.kill()
            raise RuntimeError(f"capture process: no reply to {line!r} within {timeout:.0f} s; "
                               f"stderr: {self._stderr()}")
        reply = self._proc.stdout.readline().strip()
        if not reply.startswith("ok"):
            raise RuntimeError(f"capture process: {line!r} -> {reply!r}; stderr: {self._stderr()}")
        return reply

    def _stderr(self) -> str:
        return self._log.read_text(errors="replace")[-500:] if self._log.exists() else ""

    def connect(self, source_client: str = "PortAudio") -> None:
        self._ask(f"connect {source_client}")

    @property
    def frames(self) -> int:
        return int(self.audio.shape[1]) if self.audio.size else 0

    def _finish(self) -> None:
        reply = self._ask("stop")
        self.missed_cycles = int(reply.split()[1])
        self.audio = np.load(self._path)
        self.block_starts, self.block_frames = np.load(self._path.with_suffix(".times.npy"))

    def jack_frame(self, index: int) -> int:
        """The JACK frame time at which recording frame `index` was captured (exact across xruns:
        each block carries its own cycle's time)."""
        b = int(np.searchsorted(self.block_starts, index, side="right")) - 1
        return int(self.block_frames[b] + index - self.block_starts[b])


@contextlib.contextmanager
def capture(seconds: float, channels: int = 2, name: str = "capture") -> Iterator[Capture]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "capture.npy"
        # stderr to a file, not a pipe: JACK's chatter under load would fill an undrained pipe
        # and block the recorder mid-test.
        log = Path(tmp) / "capture.log"
        root = Path(__file__).resolve().parents[2]
        env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tests.plugin_host.jack_capture", str(path),
                                     str(seconds), str(channels), name],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=env, cwd=str(root))
        cap = Capture(proc, path, log)
        try:
            if not select.select([proc.stdout], [], [], 30.0)[0]:
                proc.kill()
                raise RuntimeError(f"capture process did not start within 30 s: {cap._stderr()}")
            ready = proc.stdout.readline().strip()
            if ready != "ready":
                raise RuntimeError(f"capture process did not start: {ready!r} {cap._stderr()}")
            yield cap
            cap._finish()
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def align(captured: np.ndarray, reference: np.ndarray) -> int:
    """Offset of `reference` inside `captured` (one channel each), by FFT cross-correlation."""
    n = captured.shape[0] + reference.shape[0]
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(captured, size) * np.conj(np.fft.rfft(reference, size)), size)
    return int(np.argmax(corr[:captured.shape[0]]))


def _main(path: str, seconds: str, channels: str, name: str) -> None:
    import jack

    client = jack.Client(name, no_start_server=True)
    ports = [client.inports.register(f"in_{i}") for i in range(int(channels))]
    buf = np.zeros((len(ports), int(float(seconds) * client.samplerate)), np.float32)
    state = {"frames": 0, "missed": 0, "blocks": 0}
    times = np.zeros((2, buf.shape[1] // 16 + 1), np.int64)  # per block: start index, JACK frame time

    @client.set_process_callback
    def process(n: int) -> None:
        k = state["frames"]
        if k + n > buf.shape[1]:
            state["missed"] += 1
            return
        for i, p in enumerate(ports):
            buf[i, k:k + n] = p.get_array()
        b = state["blocks"]
        times[0, b], times[1, b] = k, client.last_frame_time
        state["frames"], state["blocks"] = k + n, b + 1

    client.activate()
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "connect":
            # PortAudio names its client "PortAudio", or "PortAudio-01"... when that name is taken
            # (e.g. by PortAudio in the test process): take the newest such client with outputs.
            by_client: dict[str, list] = {}
            for p in client.get_ports(is_audio=True, is_output=True):
                owner = p.name.split(":", 1)[0]
                if owner == arg or owner.startswith(arg + "-"):
                    by_client.setdefault(owner, []).append(p)
            usable = [c for c in sorted(by_client) if len(by_client[c]) >= len(ports)]
            outs = by_client[usable[-1]] if usable else []
            if len(outs) < len(ports):
                print(f"error {arg} has {len(outs)} output ports, need {len(ports)}", flush=True)
                continue
            for src, dst in zip(outs, ports):
                client.connect(src, dst)
            print("ok", flush=True)
        elif cmd == "stop":
            client.deactivate()
            np.save(path, buf[:, :state["frames"]])
            np.save(Path(path).with_suffix(".times.npy"), times[:, :state["blocks"]])
            print(f"ok {state['missed']}", flush=True)
            break
    client.close()


if __name__ == "__main__":
    _main(*sys.argv[1:5])


MAX_LOST_FRACTION = 0.05  # the most of a recording that xruns may excuse


def assert_exact_unless_xrun(recording: np.ndarray, expected: np.ndarray, offset: int, xruns: int,
                             period: int = 256) -> None:
    """`expected` (channels, n) is in `recording` (channels, N) at `offset`, bit-exact, block by block.

    On a loaded machine a non-realtime JACK server misses periods (docs/live.md): a period is then
    lost or garbled between the output and the recorder, and what follows arrives a period
    earlier or later. Each block of `period` frames must still be found bit-exact at the offset
    (allowing whole-period shifts after a miss); only blocks touched by a missed period may be
    absent, at most 3 per xrun the output reported while this audio played, and never more than
    one xrun's worth or MAX_LOST_FRACTION of all blocks, whichever is more: however many xruns a
    loaded machine reports, most of the audio must still arrive bit-exact.
    """
    shift, missing = 0, []
    n = expected.shape[1]
    for start in range(0, n, period):
        blk = expected[:, start:start + period]
        for cand in [shift] + [shift + d * period for d in (-1, 1, -2, 2, -3, 3, -4, 4)]:
            a = offset + start + cand
            if 0 <= a and a + blk.shape[1] <= recording.shape[1] and np.array_equal(
                    recording[:, a:a + blk.shape[1]], blk):
                shift = cand
                break
        else:
            missing.append(start)
    if not missing:
        return
    blocks = -(-n // period)
    allowed = min(3 * xruns, max(3, int(blocks * MAX_LOST_FRACTION)))
    assert len(missing) <= allowed, (
        f"{len(missing)} of {blocks} blocks did not arrive bit-exact (first at frame {missing[0]}); "
        f"the output reported {xruns} xrun(s) meanwhile, which excuse at most {allowed}")
    import warnings

    warnings.warn(f"{len(missing)} blocks lost to {xruns} reported xrun(s) on this loaded machine", stacklevel=2)
