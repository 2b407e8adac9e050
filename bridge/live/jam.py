"""Jam mode: one endless, streamed part for one track, played live on the bar grid.

Why it works this way: a player hears the generated part while playing, so each piece must be
ready before its time comes, and it must follow what the player plays now. The jam therefore

- runs ONE token stream for the whole part (model.decode.live_stream.LiveStream): each chunk of
  `chunk_bars` bars continues the jam's own tokens in the same decode state (no re-encoding of
  its audio; a text-only jam prefills once per 30 s window), and the codec decodes the stream
  continuously, so chunk seams are not seams in the audio at all;
- streams: the pieces of a chunk are decoded and queued into the track as they complete, so a
  chunk starts playing while the rest of it is still being generated (first audio after one
  piece, not after the whole chunk), and a chunk is started only when what is queued runs low
  (later start = fresher melody), except one that slides the stream's window: it starts at once,
  so the queue covers its re-prefill;
- reads its conditioning at each chunk (the melody policy below) and re-prefills only when the
  conditioning of what is still to come changed;
- places everything on a bar grid (`grid`: a `bridge.clock.grid.Grid`, or a callable giving the
  current one: the daemon passes the clock hub's, whichever clock leads): the part's first frame
  sits on a bar line, and the tempo is read at each chunk.

Melody policy (what a chunk is conditioned on), on the output clock:
- live source (`live = True`, e.g. bridge.live.notes.LiveMelody fed by MIDI ports or OSC notes): what
  was played up to the moment the chunk's conditioning is read, and from then on **the last bar
  carried forward**: a future moment gets what the player played at the same position of the
  bar in the most recent bar before now. A note held through the last bar therefore keeps
  sounding in the condition; a change reaches the very next chunk.
- stored source (`live = False`, bridge.live.melody_source.LoopedMelody): the melody loops on the
  grid, its bar 0 on the jam's first bar line; every chunk is conditioned on exactly the bars it
  plays over (the whole window ahead is known, so it re-prefills only when the window slides).

Falling behind is reported, never hidden: a chunk generated slower than it lasts, or a piece
that would start late, makes `status()["behind"]` true and calls `on_status` (the daemon turns
it into an OSC reply). The jam then degrades on purpose: it halves the context it re-prefills
from, then the chunk length (down to one bar), and a piece that would still be late is moved
to the next bar line it can make, faded in, so the part drops out on the grid, not mid-phrase.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from fractions import Fraction
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from bridge.clock.grid import Grid
from model.types import SamplingParams, melody_refusal
from plugin_host.live import BehindStatus, ReportsBehind, StatusCallback, TrackPlayer
from plugin_host.output import AudioOutput

EDGE_FADE_SECONDS = 0.01  # fade-in of a piece moved to a later bar line after falling behind
PIECE_SECONDS = 0.5  # audio decoded and queued at a time while a chunk is generated
FIRST_PIECE_SECONDS = 0.2  # the first piece of a chunk is shorter: it is what the player waits for


class JamError(ValueError):
    """A jam that cannot run as asked; the message says what is expected."""


class MelodySource(Protocol):
    """What the jam reads the melody from.

    `live = True` (bridge.live.notes.LiveMelody): times are seconds on the output clock.
    `live = False` (bridge.live.melody_source.LoopedMelody): times are seconds from the jam's first
    bar line (bar 0 of the stored melody).
    """

    live: bool

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray: ...


class Jam(ReportsBehind):
    """Continuous generation for one track into `output`; a context manager (exit stops it at once).

    engine: a loaded model.engine.Engine (a melody checkpoint when `melody` is given).
    output: the running AudioOutput(Process) the track plays on; its clock is the jam's clock.
    melody: a MelodySource or None (text only).
    grid: a bar grid (`bridge.clock.grid.Grid`) or a callable returning the current one; default a constant
        grid at `tempo` / `numerator` / `denominator` whose bar 1 is `origin_frame` (default:
        the output position now).
    chunk_bars: bars per chunk (conditioning is read once per chunk). context_seconds: how much
        of its own past a re-prefilled window starts from.
    on_chunk(entry): called after each chunk with its history entry (what conditioned it).
    """

    def __init__(self, engine, output: AudioOutput, track: str, prompt: str, *,
                 melody: MelodySource | None = None, params: SamplingParams | None = None, chain=None,
                 grid: Grid | Callable[[], Grid] | None = None, tempo: float = 120.0,
                 numerator: int = 4, denominator: int = 4, origin_frame: int | None = None,
                 chunk_bars: int = 2, context_seconds: float = 4.0, min_context_seconds: float = 0.5,
                 gain: float = 1.0, pan: float = 0.0, out_channels: tuple[int, int] = (0, 1),
                 on_status: StatusCallback | None = None,
                 on_chunk: Callable[[dict[str, Any]], None] | None = None):

        if melody is not None and melody_refusal(engine):
            raise JamError(str(melody_refusal(engine)))
        if not isinstance(chunk_bars, int) or not 1 <= chunk_bars <= 16:
            raise JamError(f"chunk_bars must be a whole number in [1, 16], got {chunk_bars}")
        if not (0 < min_context_seconds <= context_seconds <= 20):
            raise JamError("context_seconds must be in (0, 20] and >= min_context_seconds, "
                           f"got {context_seconds} (min {min_context_seconds})")
        if grid is None:
            origin = (output.position if origin_frame is None else int(origin_frame)) / output.samplerate
            try:
                grid = Grid(float(tempo), int(numerator), int(denominator), playing=True, anchor_time=origin)
            except ValueError as e:
                raise JamError(str(e)) from None
        self._grid = grid if callable(grid) else (lambda g=grid: g)
        self.engine = engine
        self.output = output
        self.name = track
        self.prompt = prompt
        self.melody = melody
        self.params = params or SamplingParams()
        self.chain = chain
        self.chunk_bars = chunk_bars
        self.context_seconds = float(context_seconds)
        self.min_context_seconds = float(min_context_seconds)
        self._mix = (gain, pan, tuple(out_channels))
        self.on_status = on_status
        self.on_chunk = on_chunk
        self.history: list[dict[str, Any]] = []  # one entry per chunk: what conditioned it
        # (chunk index, its audio pieces) of the last few chunks: references only, for the panel to
        # score what came out against what conditioned it on its own thread
        self.recent_audio: deque[tuple[int, list[np.ndarray]]] = deque(maxlen=4)
        self.state = "idle"
        self.behind_status = BehindStatus(self._notify)  # one status with its player (plugin_host.live)
        self.error: str | None = None
        self.note_latency: float | None = None  # last melody change at the input -> first sample conditioned on it
        self.first_bar: float | None = None  # output time of the part's first frame (a bar line)
        self.first_audio_lead: float | None = None  # first audio ready this long before its bar line
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._track = None
        self._player: TrackPlayer | None = None
        self._stream = None
        self._origin = 0.0  # output time of stream frame 0 (moves on by a gap when re-anchored)
        self._fed = 0  # source-rate samples handed to the player
        self._t0 = 0.0
        self._produced = 0.0
        self._first_audio_est = 0.5  # seconds from a chunk's start to its first piece (measured)
        self._melody_seen = -math.inf  # the input change last accounted for in note_latency
        self._anchors: list[int] = []  # this chunk: output frames where late pieces resumed (bar lines)

    # ---------------------------------------------------------------- clock and grid

    @property
    def grid(self) -> Grid:
        return self._grid()

    def now(self) -> float:
        """Seconds on the output clock."""
        return self.output.position / self.output.samplerate

    @property
    def chunk_seconds(self) -> float:
        g = self.grid
        return self.chunk_bars * 60.0 / g.tempo * 4.0 / g.denominator * g.numerator

    @property
    def origin_frame(self) -> int:
        """Output frame of a bar line of the grid (bar lines are this plus whole bars)."""
        g = self.grid
        return int(round(g.next_bar_time(0.0) * self.output.samplerate))

    def _margin(self) -> float:
        """Seconds between now and the earliest a new frame can play (device latency + a block or two)."""
        return self.output.device_latency + 0.05

    def _time_of(self, frame: int) -> float:
        return self._origin + frame / self.engine.frame_rate

    def _frame_at(self, t: float) -> int:
        return int(round((t - self._origin) * self.engine.frame_rate))

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
        track = self._track
        if track is None or track.done:
            self.state = "stopped"
            return None
        g = self.grid
        beat = 60.0 / g.tempo * 4.0 / g.denominator
        end = int(round(g.next_bar_time(self.now() + self._margin() + beat) * self.output.samplerate))
        track.stop_at(end, int(round(beat * self.output.samplerate)))  # one-beat fade ending on that bar line
        self.state = "stopping"
        self._notify()
        return end

    def close(self, timeout: float = 10.0) -> None:
        """Stop generating at once and free the track (no fade: the stream is going away)."""
        self._cancel.set()
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
            eng = self.engine
            with eng.live_stream(self.prompt, self.params, context_seconds=self.context_seconds) as self._stream:
                self._loop()
        except Exception as e:  # noqa: BLE001 - reported in status and through on_status, never silent
            self.error = f"{type(e).__name__}: {e}"
            if self._track is not None:
                self._track.finish()
            self.state = "failed"
            self._notify()

    def _loop(self) -> None:
        """Chunk after chunk until cancelled (the stream is open: a remote one holds a connection)."""
        eng = self.engine
        self._decoder = eng.streaming_decoder()
        g = self.grid
        # Provisional first bar line; moved on by whole bars if the first audio is later.
        self._origin = self.first_bar = g.next_bar_time(self.now() + self._margin() + self._first_audio_est)
        k = 0
        frame0 = 0  # stream frame where chunk k starts
        slides = getattr(self._stream, "slides_before", None)
        while not self._cancel.is_set():
            # A chunk that slides the stream's window pays a re-prefill (about a second on two
            # cores) before its first piece; it starts at once, so the audio queued while the
            # last chunks were made covers that second instead of the part running dry.
            if self._track is not None and not (slides is not None and slides(self._chunk_end(frame0)
                                                                              + self._decoder.right)):
                self._wait_for_room()
                if self._cancel.is_set():
                    break
            frame1 = self._chunk_end(frame0)  # the grid is read again after the wait: the tempo may move
            if not self._chunk(k, frame0, frame1):
                break
            frame0 = frame1
            k += 1
        if self._player is not None:
            self._player.finish()

    def _chunk_end(self, frame0: int) -> int:
        """The stream frame where a chunk starting at `frame0` ends: the bar line nearest
        `chunk_bars` bars on, on the grid now."""
        g = self.grid
        end_t = g.next_bar_time(self._time_of(frame0) + (self.chunk_bars - 0.5) * _bar_seconds(g))
        return max(frame0 + 1, self._frame_at(end_t))

    def _wait_for_room(self) -> None:
        """Start the next chunk when what is queued covers about two first-piece times, no earlier.

        Generating later than needed keeps the melody fresh; earlier would only add latency."""
        track = self._track
        lead = 2.0 * self._first_audio_est + self._margin() + 0.2
        while not self._cancel.is_set() and not track.done:
            if track.buffered_seconds <= lead:
                return
            time.sleep(0.005)

    def _chunk(self, k: int, frame0: int, frame1: int) -> bool:
        """Generate chunk k (stream frames [frame0, frame1)) and queue its audio piece by piece."""
        eng, stream = self.engine, self._stream
        lost = getattr(stream, "interruptions", 0)  # a remote stream that lost its replica (model.remote.client)
        stream.set_context(self.context_seconds)
        # The input's last change as of this read: a change that arrives while the chunk is made
        # belongs to the next read, and must not hide the one this chunk follows.
        changed = getattr(self.melody, "changed_at", None) if getattr(self.melody, "live", False) else None
        read_at = self.now()
        t = time.monotonic()
        reprefill = False
        if self.melody is not None:
            # on a grid where stream frames and chroma frames coincide (32 frames = 5 chroma frames
            # at 50 and 7.8125 a second), so chromas read at different chunks compare exactly
            align = Fraction(eng.frame_rate / eng.chroma_frame_rate).limit_denominator(1000).numerator
            at = max(0, stream.frames - stream.context)
            at -= at % align
            chroma = self._chroma(at, stream.window, read_at)
            reprefill = stream.condition(chroma, at)
        first_audio = None
        pieces: list[np.ndarray] = []
        first_new = stream.frames  # frames from here on are made under this chunk's conditioning
        right = self._decoder.right
        target = frame1 + right  # the codec needs `right` frames of look-ahead for final audio
        piece = max(1, int(round(PIECE_SECONDS * eng.frame_rate)))
        first = max(1, int(round(FIRST_PIECE_SECONDS * eng.frame_rate)))
        for codes in stream.advance(target, piece, first, cancel=self._cancel):
            audio = self._decoder.push(codes)
            if audio.shape[1] and self._cancel.is_set():
                return False
            if audio.shape[1]:
                late = self._place(audio.shape[1])
                if first_audio is None:
                    first_audio = time.monotonic() - t
                if late:
                    audio = _fade_in(audio, int(EDGE_FADE_SECONDS * eng.sample_rate))
                self._feed(audio)
                pieces.append(audio)
                if self.state == "starting":
                    self.state = "playing"
                    self._notify()
        if self._cancel.is_set() or stream.frames < target:
            return False
        gen_s = time.monotonic() - t
        if first_audio is not None:
            self._first_audio_est = 0.5 * self._first_audio_est + 0.5 * first_audio if k else first_audio
        seconds = (frame1 - frame0) / eng.frame_rate
        rtf = seconds / gen_s if gen_s > 0 else math.inf
        cond = self._chunk_chroma(frame0, frame1)
        entry = {
            "index": k, "start_frame": int(round(self._time_of(frame0) * self.output.samplerate)),
            "start_time": self._time_of(frame0), "bar": self._bar_of(self._time_of(frame0)),
            "chunk_seconds": seconds, "context_seconds": stream.context / eng.frame_rate,
            "conditioned_at": read_at, "reprefilled": bool(reprefill),
            "prefills": stream.prefills, "generate_seconds": gen_s, "first_audio_seconds": first_audio,
            "offline_steps": stream.offline_steps, "shared_steps": stream.shared_steps,
            "realtime_factor": rtf, "late": bool(self._late_in_chunk), "anchors": self._anchors,
            "reconnected": getattr(stream, "interruptions", 0) > lost,
            "chroma": cond, "melody_bins": _dominant_bins(cond),
        }
        self._late_in_chunk = False
        self._anchors = []
        entry["note_latency"] = None  # measured in this chunk (status keeps the last one)
        if reprefill and changed is not None:
            if self._melody_seen < changed <= read_at:
                # from the change at the input to the first output sample generated under it
                self.note_latency = entry["note_latency"] = self._time_of(first_new) - changed
                self._melody_seen = changed
        self.history.append(entry)
        self.recent_audio.append((k, pieces))
        self._produced += seconds
        # A chunk whose replica died was made late, whatever its rate: it is reported behind.
        self._set_behind(rtf < 1.0 or entry["late"] or entry["reconnected"], rtf)
        if self.on_chunk is not None:
            try:
                self.on_chunk(entry)
            except Exception:  # noqa: BLE001 - a failing listener must not stop the music
                pass
        return True

    _late_in_chunk = False

    def _place(self, n: int) -> bool:
        """Before queuing n source samples: create the track on the first bar line, or move a late
        piece on to the next bar line it can make. True if the piece was moved (it is late)."""
        out = self.output
        sr = self.engine.sample_rate
        earliest = self.now() + self._margin()
        if self._track is None:
            g = self.grid
            if self.first_bar < earliest:  # later than estimated: whole bars later (same bar phase)
                shift = g.next_bar_time(earliest) - self.first_bar
                self.first_bar += shift
                self._origin += shift
            self.first_audio_lead = self.first_bar - self.now()
            gain, pan, pair = self._mix
            cs = self.chunk_seconds
            self._track = out.add_track(self.name, self.engine.channels, pair, gain, pan,
                                        buffer_seconds=max(4.0, 3 * cs + 1.0),
                                        start_frame=int(round(self.first_bar * out.samplerate)))
            self._player = TrackPlayer(self._track, sr, self.chain, status=self.behind_status)
            return False
        at = self._track.start_frame / out.samplerate + self._fed / sr
        if at >= earliest:
            return False
        anchor = self.grid.next_bar_time(earliest)
        gap = int(round((anchor - at) * sr))
        self._feed(np.zeros((self.engine.channels, gap), np.float32))
        self._origin += gap / sr
        self._late_in_chunk = True
        self._anchors.append(int(round(anchor * out.samplerate)))
        return True

    def _feed(self, audio: np.ndarray) -> None:
        self._fed += audio.shape[1]
        self._player.feed(audio)

    def _bar_of(self, t: float) -> float:
        g = self.grid
        beat = g.beat_at(t) if hasattr(g, "beat_at") else 0.0
        return beat / g.numerator

    # ---------------------------------------------------------------- melody

    def _chroma(self, at_frame: int, frames: int, read_at: float) -> np.ndarray:
        """Chroma from stream frame `at_frame` over `frames` stream frames, by the melody policy."""
        eng = self.engine
        rate = eng.chroma_frame_rate
        n = max(1, int(math.ceil(frames / eng.frame_rate * rate)))
        t0 = self._time_of(at_frame)
        if not getattr(self.melody, "live", True):  # stored: jam time = seconds from the first bar line
            return np.asarray(self.melody.chroma(t0 - self.first_bar, n / rate, rate), np.float32)
        bar = _bar_seconds(self.grid)
        starts = t0 + np.arange(n) / rate
        ahead = starts + 0.5 / rate > read_at
        # the future takes the most recent bar's same position: the last bar carried forward
        shift = np.where(ahead, np.ceil((starts + 0.5 / rate - read_at) / bar - 1e-9) * bar, 0.0)
        src = starts - shift
        out = np.zeros((n, 12), np.float32)
        lo = float(src.min())
        span = float(src.max()) - lo + 1.0 / rate
        m = int(round(span * rate)) + 1
        table = np.asarray(self.melody.chroma(lo, m / rate, rate), np.float32)
        idx = np.clip(np.round((src - lo) * rate).astype(np.int64), 0, len(table) - 1)
        out[:] = table[idx]
        return out

    def _chunk_chroma(self, frame0: int, frame1: int) -> np.ndarray | None:
        """The chroma that conditions stream frames [frame0, frame1) in the stream's current state."""
        if self.melody is None:
            return None
        return self._stream.conditioning_chroma(frame0, frame1)

    # ---------------------------------------------------------------- behind and reporting

    def _set_behind(self, behind: bool, rtf: float | None = None) -> None:
        if behind:
            if self.context_seconds > self.min_context_seconds:
                self.context_seconds = max(self.min_context_seconds, self.context_seconds / 2)
            elif self.chunk_bars > 1:
                self.chunk_bars = max(1, self.chunk_bars // 2)
        self.behind_status.report("chunks", behind, new_event=behind, realtime_factor=rtf)

    def _notify(self) -> None:
        if self.on_status is not None:
            try:
                self.on_status(self.status())
            except Exception:  # noqa: BLE001 - a failing listener must not stop the music
                pass

    def status(self) -> dict[str, Any]:
        """For /jam/status: the same behind/realtime fields as TrackPlayer.status(), plus the jam's own."""
        last = self.history[-1] if self.history else None
        track = self._track
        return {
            "track": self.name, "state": "stopped" if track is not None and track.done else self.state,
            "behind": self.behind, "behind_events": self.behind_events, "chunks": len(self.history),
            "chunk_seconds": self.chunk_seconds, "context_seconds": self.context_seconds,
            "realtime_factor": None if last is None else last["realtime_factor"],
            "chunk_latency": None if last is None else last["generate_seconds"],
            "first_audio_seconds": None if last is None else last["first_audio_seconds"],
            "note_latency": self.note_latency, "first_audio_lead": self.first_audio_lead,
            "produced_seconds": self._produced,
            "underruns": 0 if track is None else track.underruns,
            "buffered": 0.0 if track is None else track.buffered_seconds,
            "prefills": 0 if self._stream is None else self._stream.prefills,
            "error": self.error,
        }


def _bar_seconds(g: Grid) -> float:
    return 60.0 / g.tempo * 4.0 / g.denominator * g.numerator


def _fade_in(audio: np.ndarray, n: int) -> np.ndarray:
    n = min(n, audio.shape[1])
    if n <= 0:
        return audio
    a = audio.copy()
    a[:, :n] *= np.linspace(0.0, 1.0, n, dtype=np.float32)
    return a


def _dominant_bins(chroma: np.ndarray | None) -> list[int]:
    """Per chroma frame the sounding pitch class, -1 for a silent frame (for tests and logs)."""
    if chroma is None:
        return []
    return [int(np.argmax(r)) if r.any() else -1 for r in chroma]


def bins_text(bins: list[int]) -> str:
    """One character per chroma frame: 0-9, a, b for the pitch class, '.' for silence (OSC replies)."""
    return "".join("0123456789ab"[b] if b >= 0 else "." for b in bins)
