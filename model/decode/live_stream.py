"""An endless token stream for one live part (a jam): decode state kept between chunks.

Why: a jam used to make each chunk with a whole `engine.generate` call that re-encoded the last
seconds of its own audio and prefilled them again. Here the jam's own tokens are the
continuation, and nothing is re-encoded:

- One decode state (KV cache, token grid, sampler) covers a window of `window_seconds` (the
  checkpoints' 30 s). Between chunks it simply pauses; the next chunk continues the same state,
  so a text-only jam prefills once per window.
- Re-prefill happens only when the window is full (it slides: the last `context_seconds` of
  the stream's own codes become the prompt of a fresh window) or when the conditioning changes
  (`condition(...)` with a different melody: for melody models the melody is part of the
  prefix). Frames the delay pattern had only partly generated are dropped and made again under
  the new state; every complete frame is kept.
- Codes come out frame-complete and in order, in pieces (`advance`), so the codec can decode and
  the part can play while the rest of a chunk is still being generated. The codec's streaming
  decoder runs across chunks and re-prefills, so the audio has no seam there at all: the token
  stream and the waveform are continuous.

Every decoder step passes the engine's gate as live work (model/decode/scheduler.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace

import numpy as np
import torch

from model.conditioning.prepare import Conditioning, build_conditioning
from model.decode.loop import StepPlan, new_state, prefill
from model.decode.sampling import Sampler
from model.types import RequestError, SamplingParams


class LiveStream:
    """Codes for one endless part. Not thread-safe: one consumer (the jam's thread) drives it.

    engine: a loaded model.engine.Engine. melody (melody models): a chroma (frames, 12) aligned
    to stream frame `melody_at`; set or change it with `condition`.
    """

    def __init__(self, engine, prompt: str, params: SamplingParams | None = None, *,
                 context_seconds: float = 10.0, window_seconds: float | None = None):
        self.engine = engine
        self.prompt = prompt
        self.params = params or SamplingParams()
        self.window = engine.frames_for(window_seconds or engine.window_seconds)
        self.set_context(context_seconds)
        self.k = engine.num_codebooks
        self._codes = np.zeros((self.k, 0), np.int64)  # complete codes of frames [_codes_start, frames)
        self._codes_start = 0
        self.frames = 0  # complete frames so far (stream frame index of the next one)
        self._state = None
        self._w0 = 0  # stream frame of the current window's frame 0
        self._plan: StepPlan | None = None
        self._done_after: np.ndarray | None = None
        self._melody: np.ndarray | None = None  # chroma aligned to stream frame _melody_at
        self._melody_at = 0
        self._text_cond: Conditioning | None = None
        self._seed_step = 0
        self.prefills = 0  # how many times a window was (re)prefilled
        self.offline_steps = 0  # offline decoder steps that ran during the last advance (0 or 1)
        self.shared_steps = 0  # steps of the last advance made in one decoder pass with another jam's
        self.last_prefill_reason = ""

    def set_context(self, seconds: float) -> None:
        """How much of its own past a re-prefilled window starts from (frames are kept)."""
        ctx = self.engine.frames_for(seconds)
        if not 0 < ctx < self.window:
            raise RequestError(f"context must be shorter than the {self.window}-frame window, got {seconds} s")
        self.context = ctx

    def close(self) -> None:
        """Nothing to release here (a remote stream closes its connection: model.remote.client)."""

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def resume(self, codes: np.ndarray, frames: int, prefills: int = 0) -> None:
        """Continue a stream another process made (a jam whose remote replica died): `codes` (K, n)
        are its last complete codes, ending at stream frame `frames`. The next `advance` prefills a
        window from them, so the part goes on from its own tokens."""
        codes = np.asarray(codes, np.int64)
        if codes.ndim != 2 or codes.shape[0] != self.k or not 0 <= codes.shape[1] <= frames:
            raise RequestError(f"resume: expected ({self.k}, n <= {frames}) codes, got {codes.shape}")
        self._codes = codes[:, -self.window:].copy()
        self._codes_start = int(frames) - self._codes.shape[1]
        self.frames = int(frames)
        self.prefills = int(prefills)
        self._state = None
        self.last_prefill_reason = "resumed"

    # ------------------------------------------------------------ conditioning

    def condition(self, melody: np.ndarray | None, at_frame: int) -> bool:
        """Condition from now on on `melody` (chroma aligned to stream frame `at_frame`).

        Re-prefills (at the next `advance`) only if it differs from the current conditioning over
        the frames still to be generated; returns True when it will."""
        if melody is not None and not self.engine.is_melody:
            raise RequestError("this model is text-only and cannot follow a melody")
        self._collect()  # every complete frame is kept, whatever the new conditioning
        same = self._state is not None and _same_future(self._melody, self._melody_at, melody, at_frame,
                                                        self.frames, self.engine)
        # Keep the latest chroma either way: it reaches further, and a window that slides later
        # is conditioned from it.
        self._melody, self._melody_at = (None if melody is None else np.asarray(melody, np.float32)), int(at_frame)
        if same:
            return False
        if self._state is not None:
            self._state = None
            self.last_prefill_reason = "conditioning"
        return True

    def conditioning_chroma(self, frame0: int, frame1: int) -> np.ndarray | None:
        """The chroma that conditions stream frames [frame0, frame1) now (None: no melody)."""
        if self._melody is None:
            return None
        a = chroma_index(frame0 - self._melody_at, self.engine)
        b = chroma_index(frame1 - self._melody_at, self.engine)
        return self._melody[max(0, a):max(0, b)].copy()

    def slides_before(self, until_frame: int) -> bool:
        """Will generating up to `until_frame` slide the window (a re-prefill of `context` frames)?
        A jam starts such a chunk without waiting, so the re-prefill is paid from what is queued."""
        return self._state is not None and until_frame > self._w0 + self.window

    # ------------------------------------------------------------ generation

    def advance(self, until_frame: int, piece_frames: int = 25, first_piece_frames: int | None = None,
                cancel=None) -> Iterator[np.ndarray]:
        """Generate until `until_frame` frames are complete; yield their codes (K, n) in pieces.

        The engine's gate is taken one step at a time and never held across a yield."""
        eng = self.engine
        self.offline_steps = 0
        self.shared_steps = 0
        share = None
        try:
            with eng.gate.live_session() as share:  # offline steps wait until this chunk is made
                yield from self._advance(until_frame, piece_frames, first_piece_frames, cancel)
        finally:
            if share is not None:
                self.offline_steps = share.offline_steps

    def _advance(self, until_frame, piece_frames, first_piece_frames, cancel) -> Iterator[np.ndarray]:
        eng = self.engine
        shared = eng.live_steps  # other jams with a step due step with this one
        want = first_piece_frames or piece_frames
        pending_from = self.frames
        with shared.stepping(self):
            while self.frames < until_frame:
                if cancel is not None and cancel.is_set():
                    self._collect()
                    return
                if self._state is None or self._state.done or self.frames - self._w0 >= self.window:
                    if self._state is not None and not self.last_prefill_reason:
                        self.last_prefill_reason = "window"
                    with shared.away(self):
                        self._prefill()
                if shared.step(self, self._state) > 1:
                    self.shared_steps += 1
                if eng.step_hook is not None:
                    eng.step_hook()
                # Tokens are read back only when a piece is due or the window ends: on a GPU each read
                # waits for every queued step, so reading every step would serialise host and device.
                complete = self._complete()
                if complete - pending_from >= want or complete >= until_frame or complete - self._w0 >= self.window:
                    self._collect()
                if self.frames - pending_from >= want or self.frames >= until_frame:
                    with shared.away(self):  # the consumer's time with a piece holds no other jam up
                        yield self._codes[:, pending_from - self._codes_start:self.frames - self._codes_start]
                    pending_from = self.frames
                    want = piece_frames

    def _complete(self) -> int:
        """The stream frame every frame before which is complete: the pattern's arithmetic on the
        step count, nothing read from the device."""
        st = self._state
        if st is None:
            return self.frames
        ready = self._plan.frames_complete(self._done_after, self._plan.n_frames[0], st.step - 1)
        return max(self.frames, self._w0 + ready)

    def _collect(self) -> None:
        """Move newly complete frames of the window into `_codes`."""
        st = self._state
        ready = self._complete() - self._w0
        have = self.frames - self._w0
        if ready <= have:
            return
        new = self._plan.codes(st.tokens[0].cpu().numpy(), 0)[:, have:ready]  # the pattern reverts
        self._codes = np.concatenate([self._codes, new], axis=1)
        self.frames += new.shape[1]
        drop = self._codes.shape[1] - self.window
        if drop > 0:
            self._codes = self._codes[:, drop:]
            self._codes_start += drop

    def _prefill(self) -> None:
        eng = self.engine
        ctx = min(self.context, self.frames - self._codes_start)
        self._w0 = self.frames - ctx
        prompt = self._codes[:, self._w0 - self._codes_start:] if ctx else None
        total = self.window
        self._plan = StepPlan(eng.pattern, [total], [ctx])
        self._done_after = self._plan.complete_after()
        params = self.params
        if params.seed is not None:  # a fresh window draws fresh, but reproducible, samples

            params = replace(params, seed=params.seed + self.prefills)
        guided = params.guidance != 1.0
        with eng.gate.step(live=True), torch.inference_mode():
            cond = self._conditioning(guided)
            scale = torch.tensor([params.guidance], device=eng.device).view(-1, 1, 1) if guided else None
            sampler = Sampler.for_params([params], eng.device)
            self._state = new_state(eng.lm, cond, self._plan, sampler, scale, [prompt], eng.compute_dtype)
            self._state.static = eng.static_step
            prefill(self._state)
        self.prefills += 1
        self.last_prefill_reason = ""

    def _conditioning(self, guided: bool) -> Conditioning:
        eng = self.engine
        if not eng.is_melody:
            if self._text_cond is None:
                self._text_cond = build_conditioning(eng.hf, eng.tokenizer, [self.prompt], None, guided,
                                                     eng.device, eng.compute_dtype)
            return self._text_cond
        melody = None
        if self._melody is not None:  # the window's chroma starts at the window's first frame
            first = chroma_index(self._w0 - self._melody_at, eng)
            if first < 0:
                melody = np.concatenate([np.zeros((-first, 12), np.float32), self._melody])
            else:
                melody = self._melody[first:] if first < self._melody.shape[0] else None
            if melody is not None and not melody.any():
                melody = None
        return build_conditioning(eng.hf, eng.tokenizer, [self.prompt], [melody], guided, eng.device,
                                  eng.compute_dtype)


def chroma_index(frames: float, engine) -> int:
    """The chroma frame nearest `frames` stream frames on, halves rounded up (never to even: two
    chromas read on the same grid must map a frame the same way)."""
    return math.floor(frames / engine.frame_rate * engine.chroma_frame_rate + 0.5)


def _same_future(old: np.ndarray | None, old_at: int, new: np.ndarray | None, new_at: int, frame: int,
                 engine) -> bool:
    """Do two chromas agree from stream frame `frame` on (as far as both reach)?"""
    if old is None or new is None:
        return old is None and new is None

    def tail(m: np.ndarray, at: int) -> np.ndarray:
        first = max(0, chroma_index(frame - at, engine))
        return m[first:]

    a, b = tail(old, old_at), tail(new, new_at)
    n = min(len(a), len(b))
    return n > 0 and bool(np.array_equal(a[:n], b[:n]))
