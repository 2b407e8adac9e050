"""Record what a JACK client plays: a second JACK client whose inputs are connected to its outputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np


class Capture:
    """Preallocated recording of `channels` inputs; `audio` is (channels, frames recorded so far)."""

    def __init__(self, client, ports, seconds: float):
        self.client = client
        self.ports = ports
        self._buf = np.zeros((len(ports), int(seconds * client.samplerate)), np.float32)
        self.frames = 0
        self.missed_cycles = 0

    def _process(self, n: int) -> None:
        k = self.frames
        if k + n > self._buf.shape[1]:
            self.missed_cycles += 1
            return
        for i, p in enumerate(self.ports):
            self._buf[i, k:k + n] = p.get_array()
        self.frames = k + n

    @property
    def audio(self) -> np.ndarray:
        return self._buf[:, :self.frames]

    def connect(self, source_client: str = "PortAudio") -> None:
        """Connect the first outputs of `source_client` to our inputs, in order."""
        outs = [p for p in self.client.get_ports(is_audio=True, is_output=True)
                if p.name.startswith(source_client + ":")]
        if len(outs) < len(self.ports):
            raise RuntimeError(f"{source_client} has {len(outs)} output ports, need {len(self.ports)}")
        for src, dst in zip(outs, self.ports):
            self.client.connect(src, dst)


@contextlib.contextmanager
def capture(seconds: float, channels: int = 2, name: str = "capture") -> Iterator[Capture]:
    import jack

    client = jack.Client(name, no_start_server=True)
    ports = [client.inports.register(f"in_{i}") for i in range(channels)]
    cap = Capture(client, ports, seconds)
    client.set_process_callback(cap._process)
    client.activate()
    try:
        yield cap
    finally:
        client.deactivate()
        client.close()


def align(captured: np.ndarray, reference: np.ndarray) -> int:
    """Offset of `reference` inside `captured` (one channel each), by FFT cross-correlation."""
    n = captured.shape[0] + reference.shape[0]
    size = 1 << (n - 1).bit_length()
    corr = np.fft.irfft(np.fft.rfft(captured, size) * np.conj(np.fft.rfft(reference, size)), size)
    return int(np.argmax(corr[:captured.shape[0]]))
