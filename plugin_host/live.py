"""Feeding a live output track: engine chunks -> track chain -> device rate -> the track's ring.

Why a separate stage: everything that may take time (the Pedalboard chain, resampling, waiting
for the engine) must stay off the audio thread. `TrackPlayer` runs it on a worker thread and
hands finished frames to `plugin_host.output.OutputTrack` through its lock-free ring.

The chain runs chunk by chunk with `reset=False`, so reverb and delay tails carry across chunk
boundaries, and the resampler (pedalboard.io.StreamResampler) keeps its state between chunks:
the frames that reach the ring are exactly what the chain plus `audiofile.resample`
would give for the whole stem at once.

Usage::

    track = out.add_track("keys", channels=engine.channels)
    with TrackPlayer(track, engine.sample_rate, chain=build_chain(preset.chain),
                     on_status=lambda s: print(s)) as player:
        player.play(engine.stream(request, chunk_seconds=1.0))   # returns at once
        player.wait()                                             # until the stem is queued

`on_status(status)` is called from the worker thread when the player starts falling behind real
time (status["behind"] True: the engine produced audio slower than it plays and the ring ran
low or dry) and when it recovers; `status()` gives the same dict at any time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from pedalboard.io import StreamResampler

from model.types import AudioChunk
from plugin_host.output import OutputTrack

StatusCallback = Callable[[dict[str, Any]], None]  # status dict -> None; the jam uses the same type


class LiveError(ValueError):
    """Audio a track player cannot take (wrong rate or channel count); the message says what it expects."""


class BehindStatus:
    """One behind/realtime status for everything that feeds a live track (TrackPlayer, Jam).

    Each source (the player's ring, the jam's chunks) reports whether it is behind; the status is
    behind while any source is. `on_change(fields)` is called when the aggregate flips. Shared so
    that a jam and its player report one `behind`, one `behind_events`, one realtime factor.
    """

    def __init__(self, on_change: Callable[[], None] | None = None):
        self.on_change = on_change
        self._sources: dict[str, bool] = {}
        self.behind = False
        self.behind_events = 0  # reports of falling behind (a player: each time its ring runs low or dry)
        self.realtime_factor: float | None = None  # audio seconds per second of producing it (latest)

    def report(self, source: str, behind: bool, new_event: bool = False,
               realtime_factor: float | None = None) -> bool:
        """Record `source`'s state; True when the aggregate `behind` changed."""
        if realtime_factor is not None:
            self.realtime_factor = realtime_factor
        self._sources[source] = behind
        if behind and (new_event or not self.behind):
            self.behind_events += 1
        now = any(self._sources.values())
        changed = now != self.behind
        self.behind = now
        if changed and self.on_change is not None:
            self.on_change()
        return changed

    def fields(self) -> dict[str, Any]:
        return {"behind": self.behind, "behind_events": self.behind_events,
                "realtime_factor": self.realtime_factor}


CHAIN_BLOCK = 4096  # frames per chain call; the first call is exactly this long (see ChunkProcessor)


class ReportsBehind:
    """`behind` and `behind_events` read from the owner's `behind_status` (a player and its jam)."""

    behind_status: BehindStatus

    @property
    def behind(self) -> bool:
        return self.behind_status.behind

    @property
    def behind_events(self) -> int:
        return self.behind_status.behind_events


class ChunkProcessor:
    """The track's chain and the resampler to the device rate, both stateful across chunks.

    Pedalboard re-prepares a plugin (losing its delay lines, reverb tails and LFO phase) when a
    call brings a longer block than any before it, so chunks of growing size (the engine's
    first chunk is short) would reset the chain mid-stream. The chain is therefore always called
    with at most CHAIN_BLOCK frames, and its first call with exactly that many (a stream shorter
    than that goes through at `flush`).
    """

    def __init__(self, source_rate: int, target_rate: int, channels: int, chain=None):
        self.source_rate = int(source_rate)
        self.target_rate = int(target_rate)
        self.channels = int(channels)
        self.chain = chain
        self._resampler = None
        self._pending = np.zeros((self.channels, 0), np.float32)  # waiting for the first full chain block
        self._chain_started = False
        if self.source_rate != self.target_rate:

            self._resampler = StreamResampler(self.source_rate, self.target_rate, self.channels)

    def process(self, audio: np.ndarray) -> np.ndarray:
        """float32 (channels, n) at the source rate -> (channels, m) at the target rate, in order."""
        a = np.ascontiguousarray(audio, dtype=np.float32)
        if a.ndim != 2 or a.shape[0] not in (1, self.channels):
            raise LiveError(f"expected audio shaped (channels, samples) with {self.channels} channel(s), "
                            f"got {a.shape}")
        if a.shape[0] != self.channels:
            a = np.repeat(a, self.channels, axis=0)
        if a.shape[1] == 0:
            return a
        if self.chain is not None:
            if not self._chain_started:
                self._pending = np.concatenate([self._pending, a], axis=1)
                if self._pending.shape[1] < CHAIN_BLOCK:
                    return np.zeros((self.channels, 0), np.float32)
                a, self._pending = self._pending, self._pending[:, :0]
                self._chain_started = True
            a = self._run_chain(a)
        return self._resample(a)

    def _run_chain(self, a: np.ndarray) -> np.ndarray:
        parts = [self.chain.process(a[:, i:i + CHAIN_BLOCK], self.source_rate, reset=False)
                 for i in range(0, a.shape[1], CHAIN_BLOCK)]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def _resample(self, a: np.ndarray) -> np.ndarray:
        if self._resampler is not None and a.shape[1]:
            a = self._resampler.process(a)
        return np.asarray(a, dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The end of the stream: a short stream's chain input, then what the resampler holds."""
        out = []
        if self._pending.shape[1]:
            out.append(self._resample(self._run_chain(self._pending)))
            self._pending = self._pending[:, :0]
        if self._resampler is not None:
            out.append(np.asarray(self._resampler.process(None), dtype=np.float32))
        return np.concatenate(out, axis=1) if out else np.zeros((self.channels, 0), np.float32)


class TrackPlayer(ReportsBehind):
    """Pushes processed audio into one output track from its own worker thread; a context manager.

    track: the output track (its samplerate and channel count are the target).
    source_rate: the engine's sample rate (engine.sample_rate).
    chain: a pedalboard.Pedalboard (e.g. plugin_host.chain.build_chain(specs)) or None.
    behind_margin: seconds of buffered audio below which a slow producer counts as behind.
    """

    def __init__(self, track: OutputTrack, source_rate: int, chain=None,
                 on_status: StatusCallback | None = None, behind_margin: float = 0.25,
                 status: BehindStatus | None = None):
        self.track = track
        self.proc = ChunkProcessor(source_rate, track.samplerate, track.channels, chain)
        self.on_status = on_status
        self.behind_margin = behind_margin
        self.cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.produced_seconds = 0.0  # audio seconds received from the source
        self.chunks = 0
        self.behind_status = status or BehindStatus()  # shared with a jam that owns this player
        self._was_behind = False
        self.chunk_rate = float("inf")  # last chunk: audio seconds per wall second of waiting for it
        self._t_start = time.monotonic()
        self._t_ready = self._t_start
        self._underruns_seen = 0

    def __enter__(self) -> TrackPlayer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------- feeding

    def play(self, chunks: Iterable[AudioChunk]) -> None:
        """Start consuming `chunks` (e.g. engine.stream(...)) on the worker thread; returns at once."""
        if self._thread is not None:
            raise LiveError(f"track {self.track.name}: this player is already playing")
        self._thread = threading.Thread(target=self._run, args=(chunks,), name=f"player-{self.track.name}",
                                        daemon=True)
        self._t_start = self._t_ready = time.monotonic()
        self._thread.start()

    def _run(self, chunks: Iterable[AudioChunk]) -> None:
        try:
            for chunk in chunks:
                if self.cancel.is_set():
                    break
                self.feed(chunk)
            if not self.cancel.is_set():
                self.finish()
        except BaseException as e:  # noqa: BLE001 - reported through status(), the worker must not die silently
            self.error = e
            self.track.finish()
            self._report(force=True)

    def feed(self, chunk: AudioChunk | np.ndarray) -> None:
        """Process one chunk (AudioChunk, or float32 (channels, n) at the source rate) and queue it."""
        audio = chunk.audio if isinstance(chunk, AudioChunk) else chunk
        if isinstance(chunk, AudioChunk) and chunk.sample_rate != self.proc.source_rate:
            raise LiveError(f"track {self.track.name}: chunk at {chunk.sample_rate} Hz, player expects "
                            f"{self.proc.source_rate} Hz")
        seconds = np.shape(audio)[-1] / self.proc.source_rate
        wait = time.monotonic() - self._t_ready  # time spent waiting for the source, not for the ring
        self.produced_seconds += seconds
        self.chunks += 1
        self.chunk_rate = seconds / wait if wait > 0 else float("inf")
        self._report()
        self._push(self.proc.process(audio))
        self._t_ready = time.monotonic()

    def finish(self) -> None:
        """End of the stream: flush the resampler and let the track end once drained."""
        self._push(self.proc.flush())
        self.track.finish()

    def _push(self, audio: np.ndarray) -> None:
        if audio.shape[-1]:
            self.track.push(np.ascontiguousarray(audio.T), cancel=self.cancel)

    # ---------------------------------------------------------------- control and reporting

    def stop(self, timeout: float = 10.0) -> None:
        """Stop feeding (the frames already queued still play) and join the worker."""
        self.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the whole source has been queued; True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _report(self, force: bool = False) -> None:
        underran = self.track.underruns > self._underruns_seen
        self._underruns_seen = self.track.underruns
        slow = self.chunk_rate < 1.0 and self.track.buffered_seconds < self.behind_margin
        behind = underran or slow
        changed = self.behind_status.report("player", behind, new_event=behind and not self._was_behind)
        self._was_behind = behind
        if (changed or force) and self.on_status is not None:
            self.on_status(self.status())

    def status(self) -> dict[str, Any]:
        wall = max(1e-9, time.monotonic() - self._t_start)
        return {
            "track": self.track.name, "behind": self.behind, "behind_events": self.behind_events,
            "behind_sources": {k: v for k, v in self.behind_status._sources.items() if v},
            "chunks": self.chunks, "produced_seconds": self.produced_seconds,
            "realtime_factor": self.produced_seconds / wall, "chunk_rate": self.chunk_rate,
            "buffered": self.track.buffered_seconds, "underruns": self.track.underruns,
            "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}",
        }
