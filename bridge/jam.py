"""Jam mode: continuous melody-following generation for one track, played live on the bar grid.

Why it works this way: a player hears the generated part while playing, so each piece must be
ready before its time comes, and it must follow what the player is playing now. The jam
therefore generates chunks of a few bars, one after the other, each

- continuing the tail of what was generated before (`GenerationRequest.audio_prompt`, the
  engine's continuation: the last `context_seconds` of audio are re-encoded as the prefix), and
- conditioned on the melody the player played over the last chunk (`melody.chroma(...)`, e.g.
  `bridge.midi.LiveMelody` fed by a MIDI port),

and queues them back to back into one output track whose first frame sits on a bar line of the
transport grid. A chunk's conditioning is read when its generation starts, so a melody change
reaches the audio within one chunk (plus the queue ahead, at most one more chunk).

Falling behind is reported, never hidden: when a chunk takes longer to generate than it lasts
(or would start late), the status says `behind` and `on_status` is called (the daemon turns it
into an OSC reply). The jam then degrades on purpose: it halves the context (cheaper prefix),
then the chunk length (down to one bar), and when a chunk would still be late it re-anchors it on
the next bar line that it can make, with short fades, so the part drops out cleanly on the grid
instead of glitching mid-phrase.

Usage (what the daemon's /jam/start and /jam/stop do)::

    jam = Jam(engine, output, "lead", "funky clavinet", melody=live_melody,
              tempo=120, numerator=4, denominator=4, chain=build_chain(preset.chain),
              on_status=lambda s: reply("/jam/status", ...))
    jam.start()          # returns at once; generation runs on the jam's thread
    jam.status()         # state, behind, realtime_factor, chunk_latency, underruns, ...
    jam.stop()           # one-beat fade ending on the next bar line
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from model.types import GenerationRequest, SamplingParams
from plugin_host.live import StatusCallback, TrackPlayer
from plugin_host.output import AudioOutput

EDGE_FADE_SECONDS = 0.01  # fades around a chunk that is re-anchored after falling behind


class JamError(ValueError):
    """A jam that cannot run as asked; the message says what is expected."""


class MelodySource(Protocol):
    """What the jam reads the melody from (bridge.midi.LiveMelody has this shape).

    Times are seconds on the jam's `melody_clock`. A source with `live = False` (a stored melody
    looped under the jam) is asked for the stretch each chunk will play over; a live one (the
    default) for the stretch the player has just played.
    """

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray: ...


class Jam:
    """Continuous generation for one track into `output`; a context manager (exit stops it at once).

    engine: a loaded model.engine.Engine (a melody checkpoint when `melody` is given).
    output: the running AudioOutput the track plays on.
    melody: a MelodySource or None (text only). melody_clock: the clock (seconds) that the melody
        source stamps its notes with; default time.monotonic.
    tempo / numerator / denominator: the transport's grid. origin_frame: the output frame of bar 0
        (default: the output position when the jam is created).
    chunk_bars: bars generated per request. context_seconds: audio continued from.
    """

    def __init__(self, engine, output: AudioOutput, track: str, prompt: str, *,
                 melody: MelodySource | None = None, melody_clock: Callable[[], float] = time.monotonic,
                 params: SamplingParams | None = None, chain=None, tempo: float = 120.0,
                 numerator: int = 4, denominator: int = 4, origin_frame: int | None = None,
                 chunk_bars: int = 2, context_seconds: float = 4.0, min_context_seconds: float = 0.5,
                 gain: float = 1.0, pan: float = 0.0, out_channels: tuple[int, int] = (0, 1),
                 on_status: StatusCallback | None = None):
        from model.types import melody_refusal
        from plugin_host.tempo import TempoError, TimeSignature, check_bpm

        if melody is not None and melody_refusal(engine):
            raise JamError(str(melody_refusal(engine)))
        try:
            check_bpm(tempo)
            TimeSignature(numerator, denominator)
        except TempoError as e:
            raise JamError(str(e)) from None
        if not isinstance(chunk_bars, int) or not 1 <= chunk_bars <= 16:
            raise JamError(f"chunk_bars must be a whole number in [1, 16], got {chunk_bars}")
        if not (0 < min_context_seconds <= context_seconds <= 20):
            raise JamError("context_seconds must be in (0, 20] and >= min_context_seconds, "
                           f"got {context_seconds} (min {min_context_seconds})")
        self.engine = engine
        self.output = output
        self.name = track
        self.prompt = prompt
        self.melody = melody
        self.melody_clock = melody_clock
        self.params = params or SamplingParams()
        self.chain = chain
        self.beat_seconds = 60.0 / tempo * 4.0 / denominator
        self.bar_seconds = self.beat_seconds * numerator
        self.bar_frames = self.bar_seconds * output.samplerate
        self.origin_frame = output.position if origin_frame is None else int(origin_frame)
        self.chunk_bars = chunk_bars
        self.context_seconds = float(context_seconds)
        self.min_context_seconds = float(min_context_seconds)
        self._mix = (gain, pan, tuple(out_channels))
        self.on_status = on_status
        self.history: list[dict[str, Any]] = []  # one entry per chunk: what conditioned it
        self.state = "idle"
        self.behind = False
        self.behind_events = 0
        self.error: str | None = None
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._track = None
        self._player: TrackPlayer | None = None
        self._tail = np.zeros((engine.channels, 0), np.float32)
        self._t0 = 0.0
        self._produced = 0.0
        self._request: GenerationRequest | None = None
        self._last_context_s = 0.0
        self._last_read_at = 0.0
        self._fed = 0  # source-rate frames handed to the player

    # ---------------------------------------------------------------- grid

    @property
    def chunk_seconds(self) -> float:
        return self.chunk_bars * self.bar_seconds

    def next_bar_frame(self, not_before: int) -> int:
        """The first bar line on the output clock at or after frame `not_before`."""
        bars = math.ceil((not_before - self.origin_frame) / self.bar_frames - 1e-9)
        return self.origin_frame + int(round(bars * self.bar_frames))

    def _margin_frames(self) -> int:
        """Frames between now and the earliest start a new chunk can make (device latency + a block or two)."""
        return self.output.seconds_to_frames(self.output.device_latency + 0.05)

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> Jam:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        if self._thread is not None:
            raise JamError(f"jam on track {self.name!r} is already running")
        self.state = "starting"
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._run, name=f"jam-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> int | None:
        """Fade out over one beat so the part ends on the next bar line that leaves room for it.

        Returns that output frame (None if nothing was playing)."""
        self._cancel.set()
        req = self._request
        if req is not None:
            req.cancel.set()
        track = self._track
        if track is None or track.done:
            self.state = "stopped"
            return None
        beat = int(round(self.beat_seconds * self.output.samplerate))
        end = self.next_bar_frame(self.output.position + self._margin_frames() + beat)
        track.stop_at(end, beat)  # a one-beat fade that ends on the first bar line it can fit before
        self.state = "stopping"
        self._notify()
        return end

    def close(self, timeout: float = 10.0) -> None:
        """Stop generating at once and free the track (no fade: the stream is going away)."""
        self._cancel.set()
        req = self._request
        if req is not None:
            req.cancel.set()
        if self._player is not None:
            self._player.cancel.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._track is not None:
            self.output.remove_track(self.name)
        self.state = "stopped"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the jam has stopped and its track has played out; True if it has."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.state == "stopped" or (self._track is not None and self._track.done):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)

    # ---------------------------------------------------------------- the generation loop

    def _run(self) -> None:
        try:
            k = 0
            while not self._cancel.is_set():
                if self._track is not None:
                    self._wait_for_room()
                    if self._cancel.is_set():
                        break
                audio, gen_s, chroma = self._generate(k)
                if audio is None:
                    break
                self._queue(k, audio, gen_s, chroma)
                k += 1
            if self._player is not None:
                self._player.finish()
        except Exception as e:  # noqa: BLE001 - reported in status and through on_status, never silent
            self.error = f"{type(e).__name__}: {e}"
            if self._track is not None:
                self._track.finish()
            self.state = "failed"
            self._notify()

    def _wait_for_room(self) -> None:
        """Start the next chunk when what is queued covers about two generation times, no earlier.

        Generating later than needed keeps the melody fresh; earlier would only add latency."""
        track = self._track
        last = self.history[-1]["generate_seconds"] if self.history else self.chunk_seconds
        while not self._cancel.is_set() and not track.done:
            if track.buffered_seconds <= 2.0 * last + 0.2:
                return
            time.sleep(0.01)

    def _generate(self, k: int) -> tuple[np.ndarray | None, float, np.ndarray | None]:
        sr = self.engine.sample_rate
        ctx = self._tail[:, -int(self.context_seconds * sr):] if self._tail.shape[1] else None
        ctx_s = 0.0 if ctx is None else ctx.shape[1] / sr
        self._last_context_s = ctx_s
        self._last_read_at = self.melody_clock()  # when this chunk's conditioning was read
        chroma = None
        if self.melody is not None:
            span = ctx_s + self.chunk_seconds
            now = self._last_read_at
            if getattr(self.melody, "live", True):
                begin = now - span  # what the player just played: the future is not known yet
            else:  # a known melody: the stretch this chunk (and its context) will play over
                ahead = 0.0
                if self._track is not None:
                    ahead = (self._frame_after_fed() - self.output.position) / self.output.samplerate
                begin = now + ahead - ctx_s
            chroma = np.asarray(self.melody.chroma(begin, span, self.engine.chroma_frame_rate),
                                dtype=np.float32)
        params = self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + k)
        req = GenerationRequest(self.prompt, self.chunk_seconds, params,
                                melody=chroma if chroma is not None and chroma.any() else None,
                                audio_prompt=ctx)
        self._request = req
        t = time.monotonic()
        try:
            audio = self.engine.generate([req])[0]
        except Exception as e:
            from model.engine import Cancelled

            if isinstance(e, Cancelled):
                return None, 0.0, chroma
            raise
        finally:
            self._request = None
        if audio is None or self._cancel.is_set():
            return None, 0.0, chroma
        return np.asarray(audio, np.float32), time.monotonic() - t, chroma

    def _queue(self, k: int, audio: np.ndarray, gen_s: float, chroma: np.ndarray | None) -> None:
        out = self.output
        sr = self.engine.sample_rate
        late = False
        if self._track is None:
            start = self.next_bar_frame(out.position + self._margin_frames())
            gain, pan, pair = self._mix
            self._track = out.add_track(self.name, self.engine.channels, pair, gain, pan,
                                        buffer_seconds=max(4.0, 3 * self.chunk_seconds + 1.0), start_frame=start)
            self._player = TrackPlayer(self._track, sr, self.chain)
            at = start
        else:
            at = self._frame_after_fed()
            earliest = out.position + self._margin_frames()
            if at < earliest:  # it would start late: move it to the next bar it can make, cleanly
                late = True
                anchor = self.next_bar_frame(earliest)
                gap = int(round((anchor - at) * sr / out.samplerate))
                self._feed(np.zeros((self.engine.channels, gap), np.float32))
                at = self._frame_after_fed()
        rtf = (audio.shape[1] / sr) / gen_s if gen_s > 0 else math.inf
        behind = late or rtf < 1.0
        if behind:
            audio = _edge_fades(audio, int(EDGE_FADE_SECONDS * sr))
        self.history.append({
            "index": k, "start_frame": at, "chunk_seconds": audio.shape[1] / sr,
            "context_seconds": self._last_context_s, "conditioned_at": self._last_read_at,
            "generate_seconds": gen_s, "realtime_factor": rtf, "late": late,
            "chroma": chroma, "melody_bins": _dominant_bins(chroma),
        })
        self._tail = np.concatenate([self._tail, audio], axis=1)[:, -int(20 * sr):]
        self._produced += audio.shape[1] / sr
        if self.state == "starting":
            self.state = "playing"
            self._notify()
        self._set_behind(behind)
        self._feed(audio)

    def _feed(self, audio: np.ndarray) -> None:
        self._fed += audio.shape[1]
        self._player.feed(audio)

    def _frame_after_fed(self) -> int:
        """Output frame where the next source sample will play (the resampler's held-back frames counted)."""
        return self._track.start_frame + int(round(self._fed * self.output.samplerate / self.engine.sample_rate))

    def _set_behind(self, behind: bool) -> None:
        if behind:
            self.behind_events += 1
            if self.context_seconds > self.min_context_seconds:
                self.context_seconds = max(self.min_context_seconds, self.context_seconds / 2)
            elif self.chunk_bars > 1:
                self.chunk_bars = max(1, self.chunk_bars // 2)
        if behind != self.behind:
            self.behind = behind
            self._notify()

    # ---------------------------------------------------------------- reporting

    def _notify(self) -> None:
        if self.on_status is not None:
            try:
                self.on_status(self.status())
            except Exception:  # noqa: BLE001 - a failing listener must not stop the music
                pass

    def status(self) -> dict[str, Any]:
        """For /status and the jam's OSC replies: state, behind, speed and what was played."""
        last = self.history[-1] if self.history else None
        track = self._track
        return {
            "track": self.name, "state": "stopped" if track is not None and track.done else self.state,
            "behind": self.behind, "behind_events": self.behind_events, "chunks": len(self.history),
            "chunk_seconds": self.chunk_seconds, "context_seconds": self.context_seconds,
            "realtime_factor": None if last is None else last["realtime_factor"],
            "chunk_latency": None if last is None else last["generate_seconds"],
            "produced_seconds": self._produced,
            "underruns": 0 if track is None else track.underruns,
            "buffered": 0.0 if track is None else track.buffered_seconds,
            "error": self.error,
        }


def _edge_fades(audio: np.ndarray, n: int) -> np.ndarray:
    n = min(n, audio.shape[1] // 2)
    if n <= 0:
        return audio
    a = audio.copy()
    ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
    a[:, :n] *= ramp
    a[:, -n:] *= ramp[::-1]
    return a


def _dominant_bins(chroma: np.ndarray | None) -> list[int]:
    """Per chroma frame the sounding pitch class, -1 for a silent frame (for tests and logs)."""
    if chroma is None:
        return []
    return [int(np.argmax(r)) if r.any() else -1 for r in chroma]
