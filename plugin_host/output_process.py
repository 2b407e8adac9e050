"""Live output in its own process, so the audio callback never waits for the engine's GIL.

Why: the output callback is Python and needs the GIL; a decode loop in the same process holds it
between torch ops, and on a loaded machine the callback then misses device periods (measured in
docs/live.md). Here the sounddevice stream and its callback run in a child process that does
nothing else; each track's ring buffer, its state and the output clock live in shared memory, so
producers in the main process (TrackPlayer, Jam) write into the rings directly, with no message
per block and no lock on either side (the same single-writer counters as in-process).

`AudioOutputProcess` has the interface of `plugin_host.output.AudioOutput` (same constructor,
`add_track` / `remove_track` / `track` / `tracks` / `stats()` / `position` / `device_latency`);
the tracks it returns are `OutputTrack`s over the shared arrays, so `push`, `finish`, `set_gain`,
`set_pan` and `stop_at` act on the child's callback directly. Only adding and removing a track
and shutting down go through a pipe to the child.

    with AudioOutputProcess(device="system", samplerate=48000) as out:
        track = out.add_track("keys", channels=1)
        ...
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Sequence
from multiprocessing import shared_memory
from typing import Any

import numpy as np

from plugin_host.output import (
    AudioOutput,
    ClockReadout,
    OutputError,
    OutputTrack,
    check_level,
    check_track,
    output_stats,
    shared_layout,
)


def _views(buf, layout) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape, dtype in layout:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        out[name] = np.ndarray(shape, dtype, buffer=buf, offset=offset)
        offset += (n + 7) // 8 * 8
    return out


def _size(layout) -> int:
    return sum((int(np.prod(shape)) * np.dtype(dtype).itemsize + 7) // 8 * 8 for _, shape, dtype in layout)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open a block the parent created, without the child's resource tracker claiming it."""
    from multiprocessing import resource_tracker

    register = resource_tracker.register
    resource_tracker.register = lambda *a, **k: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


CLOCK = [("clock", (3,), np.int64)]


class AudioOutputProcess(ClockReadout):
    """AudioOutput's interface, with the stream and callback in a child process (a context manager)."""

    def __init__(self, device: int | str | None = None, samplerate: int | None = None,
                 blocksize: int = 0, channels: int | None = None, latency: float | str = "low",
                 ramp_seconds: float = 0.02, start_timeout: float = 30.0):
        self._settings = dict(device=device, samplerate=samplerate, blocksize=blocksize, channels=channels,
                              latency=latency, ramp_seconds=ramp_seconds)
        self._start_timeout = start_timeout
        self._proc = None
        self._conn = None
        self._clock_shm: shared_memory.SharedMemory | None = None
        self._clock = np.zeros(3, np.int64)
        self._tracks: dict[str, tuple[OutputTrack, shared_memory.SharedMemory]] = {}
        self._ramp_frames = 1
        self.device_name, self.device_index, self.samplerate, self.channels = "", -1, 0, 0
        self.blocksize = blocksize
        self._device_latency = 0.0

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> AudioOutputProcess:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads, no inherited locks
        self._clock_shm = shared_memory.SharedMemory(create=True, size=_size(CLOCK))
        self._clock = _views(self._clock_shm.buf, CLOCK)["clock"]
        self._clock[:] = 0
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, self._settings, self._clock_shm.name),
                                 name="musicbridge-audio", daemon=True)
        self._proc.start()
        child.close()
        try:
            if not self._conn.poll(self._start_timeout):
                raise OutputError(f"the audio process did not start within {self._start_timeout:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError):
            msg = ("error", f"the audio process exited with code {self._proc.exitcode}")
        except OutputError:
            self._shutdown()
            raise
        if msg[0] != "ready":
            self._shutdown()
            raise OutputError(msg[1])
        (_, self.device_name, self.device_index, self.samplerate, self.channels, self.blocksize,
         self._device_latency, self._ramp_frames) = msg
        return self

    def __exit__(self, *exc) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(("quit",))
                self._conn.poll(10)
            except (OSError, EOFError, BrokenPipeError):
                pass
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
            self._proc = None
        for name in list(self._tracks):
            self._free(name)
        if self._clock_shm is not None:
            self._clock = self._clock.copy()
            _release(self._clock_shm)
            self._clock_shm = None

    @property
    def active(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    # ---------------------------------------------------------------- clock and reporting

    @property
    def device_latency(self) -> float:
        return self._device_latency if self.active else 0.0

    def seconds_to_frames(self, seconds: float) -> int:
        return int(round(seconds * self.samplerate))

    def track_capacity(self, buffer_seconds: float) -> int:
        return int(buffer_seconds * self.samplerate)

    def stats(self) -> dict[str, Any]:
        """The same dict as AudioOutput.stats(), read from shared memory (no round trip)."""
        return output_stats(self)

    # ---------------------------------------------------------------- tracks

    def add_track(self, name: str, channels: int = 1, out_channels: Sequence[int] = (0, 1),
                  gain: float = 1.0, pan: float = 0.0, buffer_seconds: float = 4.0,
                  start_frame: int | None = None) -> OutputTrack:
        """As AudioOutput.add_track; the ring is in shared memory, played by the child's callback."""
        if self._proc is None:
            raise OutputError("the audio output is not running (use it inside `with`)")
        old = self._tracks.get(name)
        if old is not None and not old[0].done:
            raise OutputError(f"track {name!r} is already playing; remove it first")
        pair = check_track(name, channels, out_channels, buffer_seconds, self.channels)
        check_level(name, gain, pan)
        capacity = self.track_capacity(buffer_seconds)
        layout = shared_layout(capacity, channels)
        shm = shared_memory.SharedMemory(create=True, size=_size(layout))
        arrays = _views(shm.buf, layout)
        for a in arrays.values():
            a[...] = 0
        track = OutputTrack(name, channels, capacity, pair, gain, pan, start_frame, self._ramp_frames,
                            self.samplerate, arrays, owner=True)
        if old is not None:
            self.remove_track(name)
        reply = self._ask(("add", name, shm.name, channels, pair, gain, pan, buffer_seconds))
        if reply[0] != "ok":
            del track, arrays
            _release(shm)
            raise OutputError(reply[1])
        self._tracks[name] = (track, shm)
        return track

    def remove_track(self, name: str) -> None:
        if name in self._tracks:
            if self._proc is not None:
                self._ask(("remove", name))
            self._free(name)

    def _free(self, name: str) -> None:
        track, shm = self._tracks.pop(name)
        track.done = True  # a producer still holding it stops pushing
        _release(shm)

    def track(self, name: str) -> OutputTrack:
        if name not in self._tracks:
            raise OutputError(f"no output track named {name!r}")
        return self._tracks[name][0]

    @property
    def tracks(self) -> tuple[OutputTrack, ...]:
        return tuple(t for t, _ in self._tracks.values())

    def _ask(self, msg: tuple) -> tuple:
        try:
            self._conn.send(msg)
            if not self._conn.poll(10):
                raise OutputError("the audio process stopped answering")
            return self._conn.recv()
        except (EOFError, OSError, BrokenPipeError):
            raise OutputError(f"the audio process is gone (exit code {self._proc.exitcode})") from None


def _release(shm: shared_memory.SharedMemory) -> None:
    """Unlink now; unmap when no numpy view is left (a producer may still hold its track)."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass
    try:
        shm.close()
    except BufferError:
        pass


def _child(conn, settings: dict[str, Any], clock_name: str) -> None:
    """The audio process: open the stream, then serve add/remove/quit until told to stop."""
    clock_shm = _attach(clock_name)
    shms: dict[str, shared_memory.SharedMemory] = {}
    try:
        out = AudioOutput(**settings)
        out._clock = _views(clock_shm.buf, CLOCK)["clock"]
        out.__enter__()
    except Exception as e:  # noqa: BLE001 - reported to the parent as OutputError
        conn.send(("error", str(e)))
        return
    conn.send(("ready", out.device_name, out.device_index, out.samplerate, out.channels, out.blocksize,
               out.device_latency, out._ramp_frames))
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent died: stop playing
                break
            if msg[0] == "quit":
                break
            if msg[0] == "add":
                _, name, shm_name, channels, pair, gain, pan, buffer_seconds = msg
                try:
                    shm = _attach(shm_name)
                    arrays = _views(shm.buf, shared_layout(out.track_capacity(buffer_seconds), channels))
                    out.add_track(name, channels, pair, gain, pan, buffer_seconds, shared=arrays)
                    shms[name] = shm
                    conn.send(("ok",))
                except Exception as e:  # noqa: BLE001
                    conn.send(("error", str(e)))
            elif msg[0] == "remove":
                out.remove_track(msg[1])
                shms.pop(msg[1], None)  # unmapped when the callback's last view goes
                conn.send(("ok",))
    finally:
        out.__exit__(None, None, None)
        try:
            conn.send(("bye",))
        except (OSError, BrokenPipeError):
            pass
