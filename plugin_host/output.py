"""Live output: one sounddevice OutputStream whose callback mixes per-track ring buffers.

Why it is built this way: the callback runs on the audio thread and must finish inside one
device period whatever the rest of the process is doing. It therefore only copies frames out
of preallocated single-producer single-consumer rings (`plugin_host.ringbuffer`) and mixes them
into `outdata` in place with numpy `out=` forms: no sample memory is allocated, nothing locks,
waits or logs. Everything else (chains, resampling, generation) happens on producer threads
(`plugin_host.live.TrackPlayer`, `bridge.live.jam.Jam`).

Usage::

    with AudioOutput(device="system", samplerate=48000) as out:   # defaults from the device
        track = out.add_track("bass", channels=1, out_channels=(0, 1), gain=0.8, pan=-0.2)
        track.push(frames)              # (n, 1) float32 at out.samplerate, from a worker thread
        track.finish()                  # end of stream: once drained it stops, no underrun
        out.stats()                     # xruns, underruns, latency, buffered seconds per track

Timeline: `out.position` counts frames the callback has rendered since the stream started (the
output clock). A track plays from `start_frame` on that clock (or, when None, from the first
block after its first frames arrive). If its ring runs dry while it is playing, that block gets
silence there, the shortfall is counted as an underrun and remembered: when data arrives again
the missed frames are skipped, so the track resumes where the clock is (aligned), and the
other tracks never notice.

Gain and pan changes ramp linearly at most `1 / ramp_seconds` per second (no clicks). Pan is a
balance: 0 leaves both sides at unity (a mono track goes to both channels of its pair
unchanged), -1 silences the right side, +1 the left.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from plugin_host.ringbuffer import RingBuffer

MAX_BLOCK = 4096  # the callback renders longer device blocks in pieces of this size


class OutputError(ValueError):
    """A device or track setting that cannot work; the message says what is expected."""


def refresh_devices() -> None:
    """Make PortAudio scan host APIs again (e.g. after a JACK server started). No stream may be open."""
    import sounddevice as sd  # PortAudio scans the host APIs when imported: only once a server may be up

    while sd._initialized:
        sd._terminate()
    sd._initialize()


# Slots of a track's shared state. Ints: start_frame (-1 = when data arrives; the control side
# sets it before playing, the callback when it starts the track), finished / stop_frame / fade
# (control side), done / underruns / underrun_frames / played_frames (callback).
_INTS = {k: i for i, k in enumerate(("start_frame", "finished", "stop_frame", "fade", "done", "underruns",
                                     "underrun_frames", "played_frames"))}
_FLOATS = {k: i for i, k in enumerate(("gain", "pan", "target_l", "target_r"))}


def shared_layout(capacity: int, channels: int) -> list[tuple[str, tuple[int, ...], type]]:
    """(name, shape, dtype) of the arrays a track shares, in order; 8-byte aligned when packed."""
    return [("counters", (2,), np.int64), ("ints", (len(_INTS),), np.int64),
            ("floats", (len(_FLOATS),), np.float64), ("buffer", (capacity, channels), np.float32)]


def check_track(name: str, channels: int, out_channels: Sequence[int], buffer_seconds: float,
                device_channels: int) -> tuple[int, int]:
    """Validate a new track's layout; return its (left, right) device channels."""
    if channels not in (1, 2):
        raise OutputError(f"track {name!r}: channels must be 1 or 2, got {channels}")
    pair = tuple(int(c) for c in out_channels)
    if len(pair) != 2 or not all(0 <= c < device_channels for c in pair):
        raise OutputError(f"track {name!r}: out_channels must be two device channels in "
                          f"[0, {device_channels - 1}], got {tuple(out_channels)}")
    if not (math.isfinite(buffer_seconds) and 0.05 <= buffer_seconds <= 600):
        raise OutputError(f"track {name!r}: buffer_seconds must be in [0.05, 600], got {buffer_seconds}")
    return pair  # type: ignore[return-value]


def check_level(name: str, gain: float, pan: float) -> None:
    if not (math.isfinite(gain) and 0.0 <= gain <= 4.0):
        raise OutputError(f"track {name}: gain must be in [0, 4], got {gain}")
    if not (math.isfinite(pan) and -1.0 <= pan <= 1.0):
        raise OutputError(f"track {name}: pan must be in [-1, 1], got {pan}")


def _balance(gain: float, pan: float) -> tuple[float, float]:
    return gain * min(1.0, 1.0 - pan), gain * min(1.0, 1.0 + pan)


class OutputTrack:
    """One track's ring and mix settings. Producer methods are called from one worker thread."""

    def __init__(self, name: str, channels: int, capacity: int, out_channels: tuple[int, int],
                 gain: float, pan: float, start_frame: int | None, ramp_frames: int, samplerate: int,
                 shared: dict[str, np.ndarray] | None = None, owner: bool = True):
        """shared: the ring and state arrays in shared memory (see `shared_layout`), when the
        producer and the callback live in different processes; None = private arrays.
        owner: this side initialises the state (the other process's view must not)."""
        self.name = name
        self.channels = channels
        self.samplerate = samplerate
        arrays = shared if shared is not None else {
            "buffer": np.zeros((capacity, channels), np.float32), "counters": np.zeros(2, np.int64),
            "ints": np.zeros(len(_INTS), np.int64), "floats": np.zeros(len(_FLOATS), np.float64)}
        self.ring = RingBuffer(capacity, channels, arrays["buffer"], arrays["counters"])
        self._i = arrays["ints"]  # each slot has one writer (see _INTS)
        self._f = arrays["floats"]
        self.out_channels = out_channels
        self._step = 1.0 / ramp_frames  # largest gain change per frame
        if owner:
            self._i[_INTS["start_frame"]] = -1 if start_frame is None else int(start_frame)
            self._i[_INTS["stop_frame"]] = -1
            self._f[_FLOATS["gain"]], self._f[_FLOATS["pan"]] = gain, pan
            self._f[_FLOATS["target_l"]], self._f[_FLOATS["target_r"]] = _balance(gain, pan)
        self._cur_l, self._cur_r = self._target  # callback-private: the gains reached so far
        # scratch, allocated once here so the callback never allocates
        self._data = np.zeros((MAX_BLOCK, channels), np.float32)
        self._tmp = np.zeros(MAX_BLOCK, np.float32)
        self._env_l = np.zeros(MAX_BLOCK, np.float32)
        self._env_r = np.zeros(MAX_BLOCK, np.float32)
        self._fade = np.zeros(MAX_BLOCK, np.float32)
        self._ramp = np.arange(1, MAX_BLOCK + 1, dtype=np.float32)
        self._index = np.arange(0, MAX_BLOCK, dtype=np.float32)

    # ---------------------------------------------------------------- shared state

    def _int(slot: str):  # noqa: N805 - a property factory used in the class body
        i = _INTS[slot]
        return property(lambda self: int(self._i[i]), lambda self, v: self._i.__setitem__(i, int(v)))

    underruns = _int("underruns")  # written by the callback only
    underrun_frames = _int("underrun_frames")
    played_frames = _int("played_frames")
    del _int

    @property
    def done(self) -> bool:
        """The track has ended and renders nothing more (set by the callback)."""
        return bool(self._i[_INTS["done"]])

    @done.setter
    def done(self, value: bool) -> None:
        self._i[_INTS["done"]] = int(value)

    @property
    def _finished(self) -> bool:
        return bool(self._i[_INTS["finished"]])

    @property
    def start_frame(self) -> int | None:
        v = int(self._i[_INTS["start_frame"]])
        return None if v < 0 else v

    @start_frame.setter
    def start_frame(self, frame: int) -> None:
        self._i[_INTS["start_frame"]] = int(frame)

    @property
    def _stop(self) -> tuple[int, int] | None:
        frame = int(self._i[_INTS["stop_frame"]])
        return None if frame < 0 else (frame, int(self._i[_INTS["fade"]]))

    @property
    def _target(self) -> tuple[float, float]:
        return float(self._f[_FLOATS["target_l"]]), float(self._f[_FLOATS["target_r"]])

    # ---------------------------------------------------------------- control (any thread)

    @property
    def gain(self) -> float:
        return float(self._f[_FLOATS["gain"]])

    @property
    def pan(self) -> float:
        return float(self._f[_FLOATS["pan"]])

    def set_gain(self, gain: float) -> None:
        check_level(self.name, gain, 0.0)
        self._f[_FLOATS["gain"]] = float(gain)
        self._retarget()

    def set_pan(self, pan: float) -> None:
        check_level(self.name, 0.0, pan)
        self._f[_FLOATS["pan"]] = float(pan)
        self._retarget()

    def _retarget(self) -> None:
        # Two stores: a callback between them ramps toward a mixed target for one block, harmlessly.
        self._f[_FLOATS["target_l"]], self._f[_FLOATS["target_r"]] = _balance(self.gain, self.pan)

    def stop_at(self, frame: int, fade_frames: int) -> None:
        """Fade out linearly over the `fade_frames` frames before output frame `frame`, then end."""
        self._i[_INTS["fade"]] = max(1, int(fade_frames))  # the fade first: the frame arms it
        self._i[_INTS["stop_frame"]] = int(frame)

    # ---------------------------------------------------------------- producer (one worker thread)

    def write(self, frames: np.ndarray) -> int:
        """Non-blocking: copy what fits; return the number of frames taken."""
        return self.ring.write(frames)

    def push(self, frames: np.ndarray, timeout: float | None = None, cancel=None) -> int:
        """Write all of `frames`, sleeping while the ring is full; return frames written.

        Stops early (returning fewer) on timeout, when `cancel` (a threading.Event) is set, or when
        the track has ended. Sleeping is polling, on purpose: the callback must not signal locks.
        """

        data = np.asarray(frames, dtype=np.float32)
        if data.ndim == 1:
            data = data[:, None]
        done = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        nap = min(0.02, max(0.001, self.ring.capacity / self.samplerate / 8))
        while done < data.shape[0]:
            if self.done or (cancel is not None and cancel.is_set()):
                break
            done += self.ring.write(data[done:])
            if done < data.shape[0]:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                time.sleep(nap)
        return done

    def finish(self) -> None:
        """No more frames: once the ring drains the track ends instead of underrunning."""
        self._i[_INTS["finished"]] = 1

    @property
    def buffered_seconds(self) -> float:
        return self.ring.readable / self.samplerate

    @property
    def state(self) -> str:
        if self.done:
            return "ended"
        if self.start_frame is None:
            return "waiting"
        return "playing"

    # ---------------------------------------------------------------- audio thread

    def _render(self, out: np.ndarray, n: int, pos: int) -> None:
        """Mix this track into out[:n] (n <= MAX_BLOCK) for the output frames [pos, pos + n)."""
        if self.done:
            return
        start = self.start_frame
        if start is None:
            if self.ring.readable == 0:
                if self._finished:
                    self.done = True
                return
            start = self.start_frame = pos
        if pos + n <= start:
            return
        offset = start - pos if start > pos else 0
        m = n - offset
        ring = self.ring
        # Ring frame i plays at output frame start + i: frames whose time has passed are skipped.
        late = pos + offset - start - ring.frames_read
        if late > 0:
            ring.skip(late)
            late = pos + offset - start - ring.frames_read
        got = ring.read_into(self._data, m) if late <= 0 else 0
        if got < m:
            if self._finished and ring.readable == 0:
                self.done = True
                if got == 0:
                    return
            else:
                self.underruns += 1
                self.underrun_frames += m - got
            self._data[got:m] = 0.0
        stop = self._stop
        if stop is not None and pos + offset + got > stop[0]:
            got = max(0, stop[0] - (pos + offset))  # frames past the stop are silenced, not played
        self.played_frames += got
        self._mix(out, offset, m, pos + offset)

    def _mix(self, out: np.ndarray, offset: int, m: int, t0: int) -> None:
        tl, tr = self._target
        cl, cr = self._cur_l, self._cur_r
        stop = self._stop
        fading = stop is not None and t0 + m > stop[0] - stop[1]
        steady = cl == tl and cr == tr and not fading
        if not steady:
            limit = m * self._step
            nl = cl + max(-limit, min(limit, tl - cl))
            nr = cr + max(-limit, min(limit, tr - cr))
            env_l, env_r = self._env_l[:m], self._env_r[:m]
            np.multiply(self._ramp[:m], (nl - cl) / m, out=env_l)
            np.add(env_l, cl, out=env_l)
            np.multiply(self._ramp[:m], (nr - cr) / m, out=env_r)
            np.add(env_r, cr, out=env_r)
            self._cur_l, self._cur_r = nl, nr
            if fading:
                stop_frame, fade = stop
                f = self._fade[:m]
                np.subtract(float(stop_frame - t0), self._index[:m], out=f)
                np.multiply(f, 1.0 / fade, out=f)
                np.clip(f, 0.0, 1.0, out=f)
                np.multiply(env_l, f, out=env_l)
                np.multiply(env_r, f, out=env_r)
                if t0 + m >= stop_frame:
                    self.done = True
        left, right = self.out_channels
        src_l = self._data[:m, 0]
        src_r = self._data[:m, 1] if self.channels > 1 else src_l
        tmp = self._tmp[:m]
        dst = out[offset:offset + m]
        for src, col, g, env in ((src_l, left, cl, self._env_l), (src_r, right, cr, self._env_r)):
            if steady:
                if g == 0.0:
                    continue
                np.multiply(src, g, out=tmp)
            else:
                np.multiply(src, env[:m], out=tmp)
            np.add(dst[:, col], tmp, out=dst[:, col])


class ClockReadout:
    """Reads the output clock `_clock` = [frames rendered, xruns, callback errors] (int64).

    Shared by the in-process output and the one whose callback runs in a child process.
    """

    _clock: np.ndarray

    @property
    def position(self) -> int:
        return int(self._clock[0])

    @property
    def xruns(self) -> int:
        return int(self._clock[1])

    @property
    def callback_errors(self) -> int:
        return int(self._clock[2])


class AudioOutput(ClockReadout):
    """One sounddevice OutputStream mixing tracks; a context manager (the stream lives inside `with`).

    device: a sounddevice device index or (part of a) name; None = the default output.
    samplerate / channels: None = the device's defaults. blocksize: 0 lets the host choose
    (with JACK the server's period is used). latency: sounddevice's 'low'/'high' or seconds.
    """

    def __init__(self, device: int | str | None = None, samplerate: int | None = None,
                 blocksize: int = 0, channels: int | None = None, latency: float | str = "low",
                 ramp_seconds: float = 0.02):
        import sounddevice as sd  # PortAudio scans the host APIs when imported: only once a server may be up

        try:
            info = sd.query_devices(device, "output")
        except (ValueError, sd.PortAudioError) as e:
            names = [d["name"] for d in sd.query_devices() if d["max_output_channels"] > 0]
            raise OutputError(f"audio output device {device!r} not found ({e}); output devices: "
                              f"{', '.join(names) or 'none (is the JACK/PipeWire server running?)'}") from None
        self.device_name = str(info["name"])
        self.device_index = int(info["index"])
        max_ch = int(info["max_output_channels"])
        self.channels = max_ch if channels is None else int(channels)
        if not 1 <= self.channels <= max_ch:
            raise OutputError(f"device {self.device_name!r} has {max_ch} output channels; asked for {channels}")
        self.samplerate = int(round(info["default_samplerate"])) if samplerate is None else int(samplerate)
        if not 8000 <= self.samplerate <= 384000:
            raise OutputError(f"sample rate must be in [8000, 384000] Hz, got {samplerate}")
        if blocksize < 0:
            raise OutputError(f"block size must be >= 0 (0 = host's choice), got {blocksize}")
        if not ramp_seconds > 0:
            raise OutputError(f"ramp_seconds must be positive, got {ramp_seconds}")
        self.blocksize = int(blocksize)
        self.latency_setting = latency
        self._ramp_frames = max(1, int(round(ramp_seconds * self.samplerate)))
        self._tracks: tuple[OutputTrack, ...] = ()  # replaced whole, never edited: the callback reads it lock-free
        self._stream = None
        # [output clock: frames rendered since the stream started, xruns, callback errors];
        # written by the callback only. plugin_host.output_process puts it in shared memory.
        self._clock = np.zeros(3, np.int64)

    @property
    def device_latency(self) -> float:
        """The output latency PortAudio reports for the open stream, in seconds (0 when closed)."""
        stream = self._stream
        return float(stream.latency) if stream is not None else 0.0

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> AudioOutput:
        import sounddevice as sd  # PortAudio scans the host APIs when imported: only once a server may be up

        try:
            self._stream = sd.OutputStream(
                device=self.device_index, samplerate=self.samplerate, blocksize=self.blocksize,
                channels=self.channels, dtype="float32", latency=self.latency_setting,
                callback=self._callback)
            self._stream.start()
        except sd.PortAudioError as e:
            self._stream = None
            raise OutputError(f"cannot open {self.device_name!r} at {self.samplerate} Hz, "
                              f"{self.channels} channels: {e}") from None
        return self

    def __exit__(self, *exc) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()

    @property
    def active(self) -> bool:
        return self._stream is not None and self._stream.active

    # ---------------------------------------------------------------- tracks (control thread)

    def add_track(self, name: str, channels: int = 1, out_channels: Sequence[int] = (0, 1),
                  gain: float = 1.0, pan: float = 0.0, buffer_seconds: float = 4.0,
                  start_frame: int | None = None, shared: dict[str, np.ndarray] | None = None) -> OutputTrack:
        """A new track with its own ring of `buffer_seconds` at the output rate.

        out_channels: the (left, right) device channels it plays on; on a mono device use (0, 0).
        start_frame: output-clock frame where its first frame plays; None = as soon as it has data.
        """
        if any(t.name == name and not t.done for t in self._tracks):
            raise OutputError(f"track {name!r} is already playing; remove it first")
        pair = check_track(name, channels, out_channels, buffer_seconds, self.channels)
        check_level(name, gain, pan)
        track = OutputTrack(name, channels, self.track_capacity(buffer_seconds), pair, gain, pan,
                            start_frame, self._ramp_frames, self.samplerate, shared, owner=shared is None)
        self._tracks = tuple(t for t in self._tracks if t.name != name) + (track,)
        return track

    def track_capacity(self, buffer_seconds: float) -> int:
        return int(buffer_seconds * self.samplerate)

    def remove_track(self, name: str) -> None:
        self._tracks = tuple(t for t in self._tracks if t.name != name)

    def track(self, name: str) -> OutputTrack:
        for t in self._tracks:
            if t.name == name:
                return t
        raise OutputError(f"no output track named {name!r}")

    @property
    def tracks(self) -> tuple[OutputTrack, ...]:
        return self._tracks

    def seconds_to_frames(self, seconds: float) -> int:
        return int(round(seconds * self.samplerate))

    # ---------------------------------------------------------------- the callback (audio thread)

    def _callback(self, outdata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        clock = self._clock
        if status.output_underflow or status.output_overflow:
            clock[1] += 1
        outdata.fill(0.0)
        try:
            tracks = self._tracks
            pos = int(clock[0])
            done = 0
            while done < frames:
                n = min(MAX_BLOCK, frames - done)
                block = outdata[done:done + n]
                for t in tracks:
                    t._render(block, n, pos + done)
                done += n
        except Exception:  # never let a bug stop the stream; it is counted and shown in stats()
            clock[2] += 1
        clock[0] = pos + frames

    # ---------------------------------------------------------------- reporting

    def stats(self) -> dict[str, Any]:
        """xruns, underruns, latency (device + buffered) and per-track buffering, for /status."""
        return output_stats(self)


def output_stats(out) -> dict[str, Any]:
    """The stats dict of an AudioOutput or an AudioOutputProcess (same attributes)."""
    device_latency = out.device_latency
    tracks = {}
    for t in out.tracks:
        tracks[t.name] = {
            "state": t.state, "underruns": t.underruns,
            "underrun_seconds": t.underrun_frames / out.samplerate,
            "buffered": t.buffered_seconds, "latency": device_latency + t.buffered_seconds,
            "gain": t.gain, "pan": t.pan,
        }
    live = [v["buffered"] for v in tracks.values() if v["state"] != "ended"]
    return {
        "device": out.device_name, "samplerate": out.samplerate, "channels": out.channels,
        "blocksize": out.blocksize, "active": out.active, "position": out.position / out.samplerate,
        "xruns": out.xruns, "callback_errors": out.callback_errors,
        "underruns": sum(t.underruns for t in out.tracks),
        "device_latency": device_latency,
        "latency": device_latency + (max(live) if live else 0.0),
        "tracks": tracks,
    }
