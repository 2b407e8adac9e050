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

The pipe has one lock: producers on several threads (a jam, live plays, their release threads)
add and remove tracks, and two messages interleaved on one pipe corrupt both (UnpicklingError).
The audio callback never touches it.

A failed child is reopened, never left silent: a watchdog thread waits on the child's exit (a
kill -9, a crash, a stream the audio server dropped) and watches its clock (a child whose clock
stands still for STALL_SECONDS is stopped or hung, and is killed), reports it through
`on_event`, starts a new child on the same clock and track memory and gives it every track
again, so producers go on writing into the same rings and the clock resumes where it stopped
(a track waiting to play keeps its place on the clock). A child that stops answering the pipe
is killed and reopened the same way. Reopening that fails is retried, with a growing pause,
until the output is closed.

    with AudioOutputProcess(device="system", samplerate=48000) as out:
        track = out.add_track("keys", channels=1)
        ...
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing import resource_tracker, shared_memory
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

    register = resource_tracker.register
    resource_tracker.register = lambda *a, **k: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


CLOCK = [("clock", (3,), np.int64)]

EXIT_STREAM_STOPPED = 3  # the child's exit code when its stream stopped under it (the server dropped it)
REOPEN_PAUSE = (0.5, 10.0)  # seconds between attempts to reopen a failed child: first, largest
ANSWER_SECONDS = 10.0  # a child that leaves a control message unanswered this long is killed and reopened
# a live child whose clock has not moved this long is stuck (stopped, hung, its stream stalled): it is
# killed and reopened. Far longer than any period or scheduling hiccup of a loaded machine.
STALL_SECONDS = 5.0

# on_event(kind, message): "lost" (the child failed; why), "reopened" (a new child plays every
# track; how many times so far) or "reopen_failed" (this attempt failed; why; it is retried)
OutputEvent = Callable[[str, str], None]


class AudioOutputProcess(ClockReadout):
    """AudioOutput's interface, with the stream and callback in a child process (a context manager)."""

    def __init__(self, device: int | str | None = None, samplerate: int | None = None,
                 blocksize: int = 0, channels: int | None = None, latency: float | str = "low",
                 ramp_seconds: float = 0.02, start_timeout: float = 30.0, on_event: OutputEvent | None = None):
        self._settings = dict(device=device, samplerate=samplerate, blocksize=blocksize, channels=channels,
                              latency=latency, ramp_seconds=ramp_seconds)
        self._start_timeout = start_timeout
        self.on_event = on_event  # told when the child fails and when it is reopened (see the module doc)
        self._proc = None
        self._conn = None
        self._clock_shm: shared_memory.SharedMemory | None = None
        self._clock = np.zeros(3, np.int64)
        # name -> (track, its shared memory, the "add" message that gives it to a child)
        self._tracks: dict[str, tuple[OutputTrack, shared_memory.SharedMemory, tuple]] = {}
        self._lock = threading.RLock()  # the pipe, the child and the track table: one owner at a time
        self._closing = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.restarts = 0  # children reopened after a failure
        self.last_failure = ""  # why the last child failed ("" while none has)
        self._ramp_frames = 1
        self.device_name, self.device_index, self.samplerate, self.channels = "", -1, 0, 0
        self.blocksize = blocksize
        self._device_latency = 0.0

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> AudioOutputProcess:
        self._clock_shm = shared_memory.SharedMemory(create=True, size=_size(CLOCK))
        self._clock = _views(self._clock_shm.buf, CLOCK)["clock"]
        self._clock[:] = 0
        try:
            self._start_child()
        except BaseException:
            self._shutdown()
            raise
        # a reopened child must run at this rate and width: the rings are laid out for them
        self._settings.update(samplerate=self.samplerate, channels=self.channels)
        self._watchdog = threading.Thread(target=self._watch, name="audio-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._shutdown()

    def _start_child(self, tracks: Sequence[tuple] = ()) -> None:
        """Start a child on the clock's shared memory and wait for its stream; OutputError if it fails.

        The child's callback continues the clock from the value it finds, so a reopened child
        plays on from where the failed one stopped. `tracks` ("add" messages) are given to it
        before its stream starts: added later, they would find the clock moved on without them
        and skip what they hold for that time."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads, no inherited locks
        self._conn, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, self._settings, self._clock_shm.name, tuple(tracks)),
                           name="musicbridge-audio", daemon=True)
        try:
            proc.start()
        except BaseException:  # e.g. a script without a __main__ guard: no child to stop, no pipe to keep
            self._conn.close()
            raise
        finally:
            child.close()
        self._proc = proc
        try:
            if not self._conn.poll(self._start_timeout):
                raise OutputError(f"the audio process did not start within {self._start_timeout:.0f} s")
            msg = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(5)
            msg = ("error", f"the audio process exited with code {self._proc.exitcode}")
        except OutputError:
            self._stop_child()
            raise
        if msg[0] != "ready":
            self._stop_child()
            raise OutputError(msg[1])
        (_, self.device_name, self.device_index, self.samplerate, self.channels, self.blocksize,
         self._device_latency, self._ramp_frames) = msg

    def _stop_child(self, kill: bool = False) -> None:
        """Ask the child to quit (or kill it), reap it and close the pipe."""
        proc, conn = self._proc, self._conn
        self._proc = None
        if proc is None:
            return
        if not kill and proc.is_alive():
            try:
                conn.send(("quit",))
                conn.poll(10)
            except (OSError, EOFError, BrokenPipeError):
                pass
        if kill and proc.is_alive():
            proc.kill()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()

    def _shutdown(self) -> None:
        self._closing.set()
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join(30)
        with self._lock:
            self._stop_child()
            for name in list(self._tracks):
                self._free(name)
            if self._clock_shm is not None:
                self._clock = self._clock.copy()
                _release(self._clock_shm)
                self._clock_shm = None

    # ---------------------------------------------------------------- failure and reopening

    def _watch(self) -> None:
        """The watchdog: wait for the child to end, or for its clock to stand still while it lives
        (a stopped or hung child); unless we are closing, report it and reopen."""
        pause = REOPEN_PAUSE[0]
        last, moved_at = -1, time.monotonic()
        while not self._closing.is_set():
            proc, why = self._proc, None
            if proc is not None:
                mp.connection.wait([proc.sentinel], timeout=0.5)
                if self._closing.is_set():
                    return
                if proc.is_alive():
                    position = int(self._clock[0])
                    if position != last:
                        last, moved_at = position, time.monotonic()
                        continue
                    if time.monotonic() - moved_at < STALL_SECONDS:
                        continue
                    why = f"its clock stood still for {STALL_SECONDS:.0f} s while it ran (stopped or hung)"
            with self._lock:
                if self._closing.is_set():
                    return
                if self._proc is proc:  # not reopened meanwhile by a control call
                    try:
                        self._recover(proc, why)
                        pause = REOPEN_PAUSE[0]
                        last, moved_at = -1, time.monotonic()
                        continue
                    except OutputError:
                        pass  # reported by _recover
                else:
                    last, moved_at = -1, time.monotonic()
                    continue
            self._closing.wait(pause)
            pause = min(pause * 2, REOPEN_PAUSE[1])

    def _recover(self, proc, why: str | None) -> None:
        """Replace a failed child (call holding _lock): kill it, report why, start a new one and
        give it every track. OutputError (reported as "reopen_failed") if the new child cannot start."""
        if proc is not None:
            self._stop_child(kill=True)
            code = proc.exitcode
            why = why or ("its stream stopped (the audio server dropped it)" if code == EXIT_STREAM_STOPPED
                          else f"it exited with code {code}" + (" (killed by a signal)" if code and code < 0 else ""))
            self.last_failure = f"the audio process failed: {why}"
            self._emit("lost", self.last_failure)
        try:
            self._start_child([add for _, _, add in self._tracks.values()])
        except OutputError as e:
            if self._proc is not None:
                self._stop_child(kill=True)
            self._emit("reopen_failed", f"reopening the audio output failed ({e}); trying again")
            raise OutputError(f"the audio output failed and could not be reopened: {e}") from None
        self.restarts += 1
        self._emit("reopened", f"the audio output was reopened ({self.restarts} time(s) so far) after: "
                               f"{self.last_failure}")

    def _emit(self, kind: str, message: str) -> None:
        if self.on_event is not None:
            try:
                self.on_event(kind, message)
            except Exception:  # noqa: BLE001 - a failing listener must not stop the output's recovery
                pass

    @property
    def active(self) -> bool:
        proc = self._proc
        return proc is not None and proc.is_alive()

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
        with self._lock:
            return self._add_track(name, channels, out_channels, gain, pan, buffer_seconds, start_frame)

    def _add_track(self, name, channels, out_channels, gain, pan, buffer_seconds, start_frame) -> OutputTrack:
        if self._clock_shm is None or self._closing.is_set():
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
        add = ("add", name, shm.name, channels, pair, gain, pan, buffer_seconds)
        try:
            reply = self._ask(add)
        except OutputError:
            reply = ("error", None)
        if reply[0] != "ok":
            del track, arrays
            _release(shm)
            raise OutputError(reply[1] or "the audio process failed and could not be reopened")
        self._tracks[name] = (track, shm, add)
        return track

    def remove_track(self, name: str) -> None:
        with self._lock:
            if name in self._tracks:
                try:
                    self._ask(("remove", name))
                except OutputError:
                    pass  # no child plays it now, and a reopened one will not be given it
                self._free(name)

    def _free(self, name: str) -> None:
        track, shm, _ = self._tracks.pop(name)
        track.done = True  # a producer still holding it stops pushing
        _release(shm)

    def track(self, name: str) -> OutputTrack:
        if name not in self._tracks:
            raise OutputError(f"no output track named {name!r}")
        return self._tracks[name][0]

    @property
    def tracks(self) -> tuple[OutputTrack, ...]:
        return tuple(t for t, *_ in list(self._tracks.values()))

    def _ask(self, msg: tuple) -> tuple:
        """Send one control message and return the child's answer (call holding _lock). A child
        that is gone or does not answer is replaced first (the new one has every track), and the
        message goes to the new one; OutputError if no child can be started."""
        proc = self._proc
        if proc is not None:
            try:
                return self._exchange(msg)
            except OutputError as e:
                why = str(e)
            except (EOFError, OSError):
                why = None  # _recover says how it ended
        else:
            why = "it could not be reopened"
        self._recover(proc, why)
        return self._exchange(msg)

    def _exchange(self, msg: tuple) -> tuple:
        self._conn.send(msg)
        if not self._conn.poll(ANSWER_SECONDS):
            raise OutputError(f"it left a control message unanswered for {ANSWER_SECONDS:.0f} s")
        return self._conn.recv()


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


def _add(out: AudioOutput, shms: dict[str, shared_memory.SharedMemory], msg: tuple) -> None:
    _, name, shm_name, channels, pair, gain, pan, buffer_seconds = msg
    shm = _attach(shm_name)
    arrays = _views(shm.buf, shared_layout(out.track_capacity(buffer_seconds), channels))
    out.add_track(name, channels, pair, gain, pan, buffer_seconds, shared=arrays)
    shms[name] = shm


def _child(conn, settings: dict[str, Any], clock_name: str, tracks: tuple = ()) -> None:
    """The audio process: take `tracks`, open the stream, then serve add/remove/quit until told to stop."""
    clock_shm = _attach(clock_name)
    shms: dict[str, shared_memory.SharedMemory] = {}
    try:
        out = AudioOutput(**settings)
        out._clock = _views(clock_shm.buf, CLOCK)["clock"]
        for msg in tracks:
            _add(out, shms, msg)
        out.__enter__()
    except Exception as e:  # noqa: BLE001 - reported to the parent as OutputError
        conn.send(("error", str(e)))
        return
    conn.send(("ready", out.device_name, out.device_index, out.samplerate, out.channels, out.blocksize,
               out.device_latency, out._ramp_frames))
    code = 0
    try:
        while True:
            try:
                if not conn.poll(0.5):
                    if not out.active:  # the server dropped the stream: exit, and the parent reopens
                        code = EXIT_STREAM_STOPPED
                        break
                    continue
                msg = conn.recv()
            except (EOFError, OSError):  # the parent died: stop playing
                break
            if msg[0] == "quit":
                break
            if msg[0] == "add":
                try:
                    _add(out, shms, msg)
                    conn.send(("ok",))
                except Exception as e:  # noqa: BLE001
                    conn.send(("error", str(e)))
            elif msg[0] == "remove":
                out.remove_track(msg[1])
                shms.pop(msg[1], None)  # unmapped when the callback's last view goes
                conn.send(("ok",))
    finally:
        out.__exit__(None, None, None)
        if not code:
            try:
                conn.send(("bye",))
            except (OSError, BrokenPipeError):
                pass
    if code:
        raise SystemExit(code)
