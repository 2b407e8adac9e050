"""Single-producer single-consumer float32 ring buffer between a worker thread and the audio callback.

Why no lock: the audio callback must never wait. Each side owns one counter and only ever
advances it (`_write` by the producer, `_read` by the consumer); both are int64 slots (private,
or in shared memory when the producer is another process), each stored with one aligned 8-byte
write, and a side publishes its counter only after its copy is complete, so the other side
never sees half-written or half-read frames (x86 keeps stores in order; other architectures
would need a fence here). The counters count frames since creation and never wrap; positions in
the buffer are `counter % capacity`.

The read side allocates no sample memory: `read_into` copies into a caller's preallocated
array (only numpy view objects, a few dozen bytes each, are created by the slicing).
"""

from __future__ import annotations

import numpy as np


class RingBuffer:
    """`capacity` frames of `channels` float32 samples, frame-major (frames, channels) like a device block."""

    def __init__(self, capacity: int, channels: int, buffer: np.ndarray | None = None,
                 counters: np.ndarray | None = None):
        """buffer (capacity, channels) float32 and counters (2,) int64 may live in shared memory
        (plugin_host.output_process); by default they are private arrays."""
        if not isinstance(capacity, (int, np.integer)) or capacity <= 0:
            raise ValueError(f"ring capacity must be a positive number of frames, got {capacity!r}")
        if not isinstance(channels, (int, np.integer)) or channels <= 0:
            raise ValueError(f"ring channels must be a positive count, got {channels!r}")
        self.capacity = int(capacity)
        self.channels = int(channels)
        self._buf = np.zeros((self.capacity, self.channels), np.float32) if buffer is None else buffer
        if self._buf.shape != (self.capacity, self.channels) or self._buf.dtype != np.float32:
            raise ValueError(f"ring buffer must be float32 {(self.capacity, self.channels)}, got "
                             f"{self._buf.dtype} {self._buf.shape}")
        # [frames ever written (producer assigns), frames ever consumed (consumer assigns)];
        # aligned int64 stores are single instructions, so the other side never sees a torn value.
        self._ctr = np.zeros(2, np.int64) if counters is None else counters

    @property
    def _write(self) -> int:
        return int(self._ctr[0])

    @property
    def _read(self) -> int:
        return int(self._ctr[1])

    # ---------------------------------------------------------------- either side

    @property
    def readable(self) -> int:
        """Frames written and not yet consumed."""
        return self._write - self._read

    @property
    def writable(self) -> int:
        """Free frames the producer may write now."""
        return self.capacity - (self._write - self._read)

    @property
    def frames_written(self) -> int:
        return self._write

    @property
    def frames_read(self) -> int:
        return self._read

    # ---------------------------------------------------------------- producer side

    def write(self, frames: np.ndarray) -> int:
        """Copy as many leading frames of `frames` (n, channels) as fit; return how many were taken."""
        data = np.asarray(frames, dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != self.channels:
            raise ValueError(f"ring takes (frames, {self.channels}) float32, got shape {data.shape}")
        n = min(int(data.shape[0]), self.capacity - (self._write - self._read))
        if n <= 0:
            return 0
        start = self._write % self.capacity
        first = min(n, self.capacity - start)
        self._buf[start:start + first] = data[:first]
        if n > first:
            self._buf[:n - first] = data[first:n]
        self._ctr[0] = self._write + n  # publish only after the copy
        return n

    # ---------------------------------------------------------------- consumer side

    def read_into(self, out: np.ndarray, frames: int) -> int:
        """Copy up to `frames` frames into out[:frames]; return how many were copied (the rest is untouched)."""
        n = min(frames, self._write - self._read)
        if n <= 0:
            return 0
        start = self._read % self.capacity
        first = min(n, self.capacity - start)
        np.copyto(out[:first], self._buf[start:start + first])
        if n > first:
            np.copyto(out[first:n], self._buf[:n - first])
        self._ctr[1] = self._read + n  # release the space only after the copy
        return n

    def skip(self, frames: int) -> int:
        """Drop up to `frames` unread frames (a late track catching up); return how many were dropped."""
        n = min(frames, self._write - self._read)
        if n <= 0:
            return 0
        self._ctr[1] = self._read + n
        return n
