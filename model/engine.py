"""The engine's public face: load a checkpoint once, then generate or stream requests.

This is the only part of `model/` that `bridge/` and `plugin_host/` call. Everything it
returns is numpy (audio float32 (channels, samples), codes int64 (codebooks, frames)).

Requests in one call are decoded together, one forward pass per step for the whole batch
(guidance doubles the rows, it never doubles the passes). Requests longer than the model's
30 s window continue in windows, each prompted with the tail of the previous one
(audiocraft's extend stride), so the token stream and the audio carry on without a seam.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.codec.codes import decode, encode_audio, streaming_decoder
from model.conditioning.prepare import build_conditioning
from model.decode import autotune
from model.decode.decoder import DecoderSpec, MusicgenDecoderLM
from model.decode.live_stream import LiveStream
from model.decode.loop import StepPlan, decode_n, decode_together, new_state, prefill
from model.decode.patterns import PATTERNS, get_pattern
from model.decode.precision import apply_precision, kv_dtype
from model.decode.sampling import Sampler
from model.decode.scheduler import StepGate
from model.decode.step_graph import graphs_enabled
from model.decode.step_sharing import SharedSteps
from model.kernels import gemv
from model.load.checkpoint import Checkpoint, TextTokenizer, checkpoint_files, unsupported
from model.load.resolve import ModelError, ResolvedModel, checkpoint_pattern, load_hf_model, resolve_model
from model.memory import hugepages, weight_cache
from model.memory.pages import drop_pages, maps_held
from model.types import (MAX_REQUEST_SECONDS, AudioChunk, Cancelled, CheckpointError, EngineInfo, GenerationRequest,
                         RequestError, SamplingParams, melody_refusal)

log = logging.getLogger(__name__)

Progress = Callable[[int, float], None]
"""progress(request_index, fraction_done) - called from the engine's thread, at most every step."""

DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
WINDOW_SECONDS = 30.0  # what the checkpoints were trained on
CONTEXT_SECONDS = 10.0  # tokens carried into the next window of a long request


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if not (device == "cpu" or device.startswith("cuda")):
        raise RequestError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    return device


def pick_dtype(dtype: str, device: str) -> str:
    """Check a precision for a device; `auto` stays `auto` on the CPU (measured at load).

    `auto` is the fastest precision whose logits stay within the quality bound: float16 on a
    GPU; on the CPU, measured on the machine by `model.decode.autotune` when the model is loaded.
    """
    if dtype not in DTYPES:
        raise RequestError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype != "auto":
        if dtype == "float16" and device == "cpu":
            raise RequestError("float16 is for GPUs; on the CPU use bfloat16 or int8")
        if dtype in ("int8", "int4") and device.startswith("cuda"):
            raise RequestError(f"{dtype} runs the CPU's C kernels; on a GPU use float16 (the default), "
                               "bfloat16 or float32")
        return dtype
    return "float16" if device.startswith("cuda") else "auto"


def _weight_bytes(spec: DecoderSpec, dtype: str) -> int:
    """The bytes of the streamed linears' weights (layers and heads) converted to `dtype` on the
    CPU, each 64-byte aligned: the size of the huge-page arena they are made in (model/memory/hugepages.py).
    0 where the layout makes none (float32 shares the checkpoint's; int4 without its C kernel
    is PyTorch's packing)."""

    if dtype not in ("int8", "bfloat16", "int4") or (dtype == "int4" and not gemv.has_vnni()):
        return 0
    with torch.device("meta"):
        lm = MusicgenDecoderLM(spec)

    def size(m: nn.Linear, heads: bool) -> int:
        if dtype == "bfloat16":
            return m.in_features * m.out_features * 2
        if dtype == "int4" and not heads and gemv.takes_i4(m.in_features):  # as Int4Linear.kernel decides
            return math.prod(gemv.i4_shape(m.out_features, m.in_features))
        return m.in_features * m.out_features  # int8, and int4's heads and odd widths

    linears = [(m, False) for m in lm.layers.modules() if isinstance(m, nn.Linear)] + [(lm.heads, True)]
    return sum(-(-size(m, heads) // 64) * 64 for m, heads in linears)


def _weight_record(hf_model, spec: DecoderSpec, dtype: str, nbytes: int) -> weight_cache.Record | None:
    """The record a layout's conversions replay from (where a valid one exists) or are noted
    in: text checkpoints read from files only, whose conversions land in an arena of `nbytes`."""

    if nbytes <= 0 or not isinstance(hf_model, Checkpoint) or not weight_cache.enabled():
        return None

    try:
        key = weight_cache.key_of(checkpoint_files(hf_model.path), dtype=dtype, kernels=gemv.signature(),
                                  spec=repr(spec), arena=nbytes)
    except (OSError, CheckpointError):
        return None
    return weight_cache.Record.open(weight_cache.path_for(key), nbytes)


class Engine:
    """A loaded MusicGen and the decode loop over its weights.

    Thread-safety: calls may run from several threads; their decoder steps pass one at a time
    through `self.gate` (model.decode.scheduler.StepGate), live calls ahead of offline ones, and no
    lock is held across a yield to a consumer. `request.cancel` may be set from any thread and
    is honoured within one decoder step.
    """

    def __init__(self, hf_model, tokenizer, resolved: ResolvedModel, device: str = "cpu",
                 dtype: str = "float32", pattern: str = "delay",
                 window_seconds: float = WINDOW_SECONDS, context_seconds: float = CONTEXT_SECONDS,
                 owns_model: bool = False):
        """`owns_model`: nothing else uses `hf_model`'s decoder, so where the decoder is
        converted to another precision its float32 weights are released (`Engine.load`)."""
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.device = device
        self.gate = StepGate()  # one decoder step at a time, live work first (model/decode/scheduler.py)
        # Live streams' steps, every jam with one due in one decoder pass (model/decode/step_sharing.py).
        self.live_steps = SharedSteps(self.gate, decode_together)
        cfg = hf_model.config
        self.sample_rate = int(cfg.audio_encoder.sampling_rate)
        self.channels = int(cfg.decoder.audio_channels)
        self.num_codebooks = int(cfg.decoder.num_codebooks)
        self.frame_rate = float(cfg.audio_encoder.frame_rate)
        self.is_melody = bool(getattr(cfg, "num_chroma", 0))
        self.chroma_frame_rate = self.sample_rate / 4096.0
        self.hop = int(round(self.sample_rate / self.frame_rate))
        if not 0 < context_seconds < window_seconds:
            raise RequestError("context_seconds must be positive and shorter than window_seconds")
        self.window_seconds = window_seconds
        self.context_seconds = context_seconds
        self.pattern = get_pattern(pattern, self.num_codebooks, channels=self.channels)
        self.dtype_decision = None
        self.dtype = pick_dtype(dtype, device)
        if self.dtype == "auto":
            self.dtype_decision = autotune.choose(_decoder_spec(hf_model))
            self.dtype = self.dtype_decision.dtype
            log.info("%s", self.dtype_decision.line())
        self.step_hook: Callable[[], None] | None = None  # called after every decoder step (bench)
        # Fixed-shape decode steps (the form CUDA graphs capture) on a GPU; the CPU's eager
        # slice reads only the filled cache. Both are held to the same equivalence tests.
        self.static_step = device.startswith("cuda")
        if self.static_step:
            log.info("decoder on %s in %s: fixed-shape steps, %s", device, self.dtype,
                     "each batch's step captured once as a CUDA graph and replayed (model/decode/step_graph.py)"
                     if graphs_enabled() else "run eagerly (MUSICBRIDGE_CUDA_GRAPHS=0)")
        self.weight_writer = None  # the thread recording converted weights (model/memory/weight_cache.py)
        self.lm, self.compute_dtype = self._lay_out(hf_model, self.dtype, owns_model)

    def _lay_out(self, hf_model, dtype: str, release: bool) -> tuple[MusicgenDecoderLM, torch.dtype]:
        """Our decoder over the checkpoint's weights in `dtype`, one copy of each weight.

        float32 shares the checkpoint's tensors. Other precisions convert layer by layer; with
        `release`, each layer's float32 weights are dropped from the `transformers` model as
        soon as the converted layer exists (that model's decoder is then unusable, which is
        why only `Engine.load`, which made it, asks for it).
        """

        compute = [torch.float32]

        def convert(ours, theirs) -> None:
            compute[0] = apply_precision(ours, dtype, self.device)
            if release:
                _release_unshared(theirs, ours)

        spec = _decoder_spec(hf_model)
        nbytes = 0 if str(self.device).startswith("cuda") else _weight_bytes(spec, dtype)
        record = _weight_record(hf_model, spec, dtype, nbytes)
        arena = hugepages.Arena(nbytes, buffer=record.mapped if record is not None else None)
        if record is not None:
            record.attach(arena.buffer)
        with hugepages.weights_into(arena), weight_cache.recording(record):
            if isinstance(hf_model, Checkpoint):
                def convert_mapped(ours, sources) -> None:
                    compute[0] = apply_precision(ours, dtype, self.device)
                    drop_pages(sources)  # the file's float32 pages; the mapping stays valid

                with maps_held():
                    lm = MusicgenDecoderLM.from_tensors(spec, hf_model.decoder_tensors(),
                                                        on_layer=None if dtype == "float32" else convert_mapped)
            else:
                lm = MusicgenDecoderLM.from_hf(hf_model, on_layer=None if dtype == "float32" else convert)
            if dtype != "float32":
                compute[0] = apply_precision(lm, dtype, self.device)  # the heads
                if release and not isinstance(hf_model, Checkpoint):
                    _release_unshared(hf_model.decoder, lm)
        if record is not None and record.complete_replay:
            log.info("decoder %s weights %s from the cache (%d conversions skipped; model/memory/weight_cache.py)",
                     dtype, record.how, record.replayed)
        elif record is not None:
            self.weight_writer = record.save()
        if not str(self.device).startswith("cuda"):
            self._on_huge_pages(lm, dtype)
            fused = lm.fuse()
            log.info("decoder: %d of %d layers take their decode step in one C call (model/kernels/layer_step.c)",
                     fused, len(lm.layers))
            if fused == len(lm.layers):
                lm.kv_dtype = kv_dtype(dtype, self.device)
            if lm.stack is not None and lm.stack.fold_dtype is not None:
                lm.stack.fold_dtype = lm.kv_dtype or torch.float32  # folded vectors kept as the cache keeps its own
        return lm, compute[0]

    @staticmethod
    def _on_huge_pages(lm: MusicgenDecoderLM, dtype: str) -> None:
        """Put the weights a step streams on huge pages (model/memory/hugepages.py), before `fuse`
        takes their addresses. float32 weights are the checkpoint's own (shared), so they are
        collapsed where they lie; converted ones are the engine's, so they are packed."""
        streamed = nn.ModuleList([lm.layers, lm.heads])
        if dtype == "float32":
            hugepages.collapse(streamed)
        else:
            hugepages.pack(streamed)
        line = hugepages.report([*streamed.parameters(), *streamed.buffers()])
        if line:
            log.info("%s", line)

    @classmethod
    def load(cls, spec: str = "auto", device: str = "auto", dtype: str = "auto",
             pattern: str | None = None) -> Engine:
        """Resolve and load a checkpoint (see `model.load.resolve.resolve_model`).

        `pattern`: the codebook pattern to decode with; None is the checkpoint's own.
        """

        resolved = resolve_model(spec)
        dev = pick_device(device)
        dt = pick_dtype(dtype, dev)
        if pattern is not None and pattern not in PATTERNS:
            raise RequestError(f"unknown codebook pattern {pattern!r}: expected one of {', '.join(PATTERNS)}")
        model, tok = load_checkpoint(resolved, dev)
        return cls(model, tok, resolved, dev, dt, pattern=pattern or checkpoint_pattern(resolved),
                   owns_model=True)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            label=self.resolved.label, path=self.resolved.path, is_tiny=self.resolved.is_tiny,
            is_melody=self.is_melody, sample_rate=self.sample_rate, channels=self.channels,
            num_codebooks=self.num_codebooks, frame_rate=self.frame_rate,
            chroma_frame_rate=self.chroma_frame_rate, device=self.device, dtype=self.dtype,
            max_seconds=MAX_REQUEST_SECONDS, pattern=self.pattern.name,
        )

    def frames_for(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.frame_rate)))

    def samples_for(self, seconds: float) -> int:
        return self.frames_for(seconds) * self.hop

    # ------------------------------------------------------------------ checks and plans

    def _check(self, requests: Sequence[GenerationRequest]) -> None:
        if not requests:
            raise RequestError("no requests given")
        for r in requests:
            if r.melody is not None and melody_refusal(self):
                raise RequestError(melody_refusal(self))
            if r.audio_prompt is not None and r.audio_prompt.shape[0] not in (1, self.channels):
                raise RequestError(
                    f"audio_prompt has {r.audio_prompt.shape[0]} channels; this model takes "
                    f"{self.channels} (or mono, which is duplicated)"
                )

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Audio (channels, samples) at the model rate -> codes (codebooks, frames)."""

        a = np.asarray(audio, dtype=np.float32)
        if a.shape[0] == 1 and self.channels == 2:
            a = np.repeat(a, 2, axis=0)
        codec = self.hf.full_codec() if isinstance(self.hf, Checkpoint) else self.hf.audio_encoder
        with torch.inference_mode():
            return encode_audio(codec, a, self.channels)

    @torch.inference_mode()
    def decode(self, codes: np.ndarray, between: Callable[[], None] | None = None) -> np.ndarray:
        """Codes (codebooks, frames) to float32 audio (channels, samples), in bounded memory
        however long (model.codec.codes.decode); `between()` runs before each codec window."""

        return decode(self.hf.audio_encoder, np.asarray(codes, dtype=np.int64), self.channels, between=between)

    def _window_frames(self) -> int:
        return self.frames_for(self.window_seconds)

    # ------------------------------------------------------------------ the token stream

    def _frames(
        self, requests: Sequence[GenerationRequest], progress: Progress | None,
        chunk_frames: int = 0, first_chunk_frames: int = 0, live: bool = False,
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (request index, newly final codes (K, n)) as frames complete.

        With chunk_frames=0 each request's codes come once per window; otherwise in pieces of
        about chunk_frames frames, the first piece of each request after first_chunk_frames (a
        short first piece is what makes first audio fast). Prompt frames are yielded first when
        asked for.
        """
        self._check(requests)
        n = len(requests)
        targets = [self.frames_for(r.seconds) for r in requests]
        prompts: list[np.ndarray | None] = [
            None if r.audio_prompt is None else self.encode(r.audio_prompt) for r in requests
        ]
        for i, r in enumerate(requests):
            if prompts[i] is not None and r.return_prompt:
                yield i, prompts[i]
        made = [0] * n
        window = self._window_frames()
        context = self.frames_for(self.context_seconds)
        alive = [not r.cancel.is_set() for r in requests]
        history: list[np.ndarray] = [
            p if p is not None else np.zeros((self.num_codebooks, 0), np.int64) for p in prompts
        ]
        first_window = True
        while any(alive[i] and made[i] < targets[i] for i in range(n)):
            idx = [i for i in range(n) if alive[i] and made[i] < targets[i]]
            win_prompts, new, win_reqs = [], [], []
            for i in idx:
                # A long audio prompt keeps its tail: the window must leave room to generate.
                keep = window - max(1, window // 4) if first_window else context
                ctx = history[i][:, -keep:]
                if ctx.shape[1] == 0:
                    ctx = None
                room = window - (0 if ctx is None else ctx.shape[1])
                win_prompts.append(ctx)
                new.append(min(targets[i] - made[i], room))
                # A later window starts `ctx` frames before what is new: its melody starts there.
                start = made[i] - (0 if first_window or ctx is None else ctx.shape[1])
                win_reqs.append(self._window_request(requests[i], start))
            for j, i, codes in self._run_window(win_reqs, win_prompts, new,
                                                progress, chunk_frames, made, targets, idx,
                                                first_chunk_frames or chunk_frames, live):
                history[i] = np.concatenate([history[i], codes], axis=1)[:, -window:]
                made[i] += codes.shape[1]
                yield i, codes
            for i in idx:
                if requests[i].cancel.is_set():
                    alive[i] = False
            first_window = False
        if not any(alive):
            raise Cancelled("all requests were cancelled")

    def _window_request(self, r: GenerationRequest, start_frame: int) -> GenerationRequest:
        """The request as a later window sees it: the melody from that window's start on."""
        if r.melody is None or start_frame <= 0:
            return r
        first = int(start_frame / self.frame_rate * self.chroma_frame_rate)
        melody = r.melody[first:] if first < r.melody.shape[0] else None
        return replace(r, melody=melody, audio_prompt=None, cancel=r.cancel)

    def _run_window(self, reqs, prompts, new_frames, progress, chunk_frames, made, targets, idx,
                    first_chunk_frames=0, live=False):
        """One window for a batch: prompt codes + new_frames each; yields (j, i, new codes)."""
        plens = [0 if p is None else p.shape[1] for p in prompts]
        totals = [p + f for p, f in zip(plens, new_frames)]
        plan = StepPlan(self.pattern, totals, plens)
        done_after = plan.complete_after()  # frame -> step after which it is final
        sent = list(plens)  # frames handed out so far, per request (prompt frames are known)
        cancelled = [False] * len(reqs)

        def ready(j: int, step: int) -> int:
            return plan.frames_complete(done_after, totals[j], step)

        def emit(step: int, final: bool):
            due = []
            for j in range(len(reqs)):
                if cancelled[j]:
                    continue
                upto = totals[j] if final else ready(j, step)
                want = first_chunk_frames if made[idx[j]] == 0 else chunk_frames
                if upto - sent[j] >= max(want, 1) or (final and upto > sent[j]):
                    due.append((j, upto))
            if not due:
                return
            # Read back only when a piece is due: on a GPU each read waits for every queued step.
            cols = state.tokens.cpu().numpy()
            for j, upto in due:
                codes = plan.codes(cols[j], j)[:, sent[j]:upto]
                sent[j] = upto
                yield j, idx[j], codes

        def stop() -> bool:
            return all(r.cancel.is_set() for r in reqs)

        # The gate is held for one step (or the prefill) at a time and never across a yield:
        # live calls go ahead of offline ones between steps (model/decode/scheduler.py).
        with self.gate.step(live, stop) as ok:
            if not ok:
                return
            with torch.inference_mode():
                params = [r.params for r in reqs]
                guided = any(p.guidance != 1.0 for p in params)
                cond = build_conditioning(
                    self.hf, self.tokenizer, [r.prompt for r in reqs],
                    [r.melody for r in reqs] if self.is_melody else None, guided, self.device,
                    self.compute_dtype,
                )
                scale = (torch.tensor([p.guidance for p in params], device=self.device).view(-1, 1, 1)
                         if guided else None)
                sampler = Sampler.for_params(params, self.device)
                state = new_state(self.lm, cond, plan, sampler, scale, prompts, self.compute_dtype)
                state.static = self.static_step
                prefill(state)
        last_pct = [-1] * len(reqs)
        while not state.done:
            with self.gate.step(live, stop) as ok:
                if ok:
                    decode_n(state, 1)
            if self.step_hook is not None and ok:
                self.step_hook()
            step = state.step - 1
            for j, r in enumerate(reqs):
                if r.cancel.is_set():
                    cancelled[j] = True
            if all(cancelled):
                break
            if progress is not None:
                for j in range(len(reqs)):
                    new = max(0, ready(j, step) - plens[j])
                    frac = min(1.0, (made[idx[j]] + new) / targets[idx[j]])
                    if not cancelled[j] and int(frac * 100) != last_pct[j]:
                        last_pct[j] = int(frac * 100)
                        progress(idx[j], frac)
            if chunk_frames:
                yield from emit(step, final=False)
        if not all(cancelled):
            yield from emit(state.n_steps, final=True)

    # ------------------------------------------------------------------ public calls

    def generate_tokens(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[np.ndarray | None]:
        """Codes (codebooks, frames) per request; None for a request cancelled part way."""
        parts: list[list[np.ndarray]] = [[] for _ in requests]
        try:
            for i, codes in self._frames(requests, progress):
                parts[i].append(codes)
        except Cancelled:
            return [None] * len(requests)
        return [None if r.cancel.is_set() or not p else np.concatenate(p, axis=1)
                for r, p in zip(requests, parts)]

    def generate(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[np.ndarray | None]:
        """Audio (channels, samples) per request; None for a cancelled request."""
        codes = self.generate_tokens(requests, progress)
        if all(c is None for c in codes):
            raise Cancelled("all requests were cancelled")
        out = []
        for c in codes:
            # A long decode waits for a gap between live chunks before each codec window.
            out.append(None if c is None else self.decode(c, between=self.gate.offline_turn))
        return out

    def stream_batch(
        self, requests: Sequence[GenerationRequest], chunk_seconds: float = 1.0,
        progress: Progress | None = None, first_chunk_seconds: float = 0.25, live: bool = False,
    ) -> Iterator[AudioChunk]:
        """Audio chunks of every request as soon as the codec can produce them.

        Each request's chunks arrive in order with `start` offsets; raises Cancelled when all
        requests are cancelled. The codec streams (model.codec.codes.streaming_decoder), so a chunk's
        cost does not grow with what was already generated. `live`: a call someone is listening to (a track
        playing while it generates): its steps go ahead of offline calls (model/decode/scheduler.py).
        """
        chunk_frames = max(1, int(round(chunk_seconds * self.frame_rate)))
        first_frames = max(1, min(chunk_frames, int(round(first_chunk_seconds * self.frame_rate))))
        decoders = [self.streaming_decoder() for _ in requests]
        starts = [0] * len(requests)
        for i, codes in self._frames(requests, progress, chunk_frames, first_frames, live):
            with torch.inference_mode():
                audio = decoders[i].push(torch.from_numpy(codes).to(self.device))
            if audio.shape[1]:
                yield AudioChunk(audio, self.sample_rate, starts[i], False, i)
                starts[i] += audio.shape[1]
        for i, r in enumerate(requests):
            if r.cancel.is_set():
                continue
            with torch.inference_mode():
                tail = decoders[i].flush()
            yield AudioChunk(tail, self.sample_rate, starts[i], True, i)

    def live_stream(self, prompt: str, params: SamplingParams | None = None, *,
                    context_seconds: float = 10.0) -> LiveStream:
        """An endless token stream for one live part (a jam), its decode state kept between pieces."""
        return LiveStream(self, prompt, params, context_seconds=context_seconds)

    def streaming_decoder(self):
        """A streaming codec decoder for this checkpoint: push codes, get the audio they complete."""
        return streaming_decoder(self.hf.audio_encoder, self.channels)

    def stream(self, request: GenerationRequest, chunk_seconds: float = 1.0,
               first_chunk_seconds: float = 0.25, live: bool = False) -> Iterator[AudioChunk]:
        """One request's audio chunks in order; raises Cancelled if it is cancelled."""
        yield from self.stream_batch([request], chunk_seconds, first_chunk_seconds=first_chunk_seconds,
                                     live=live)


def _decoder_spec(hf_model) -> DecoderSpec:
    if isinstance(hf_model, Checkpoint):
        return DecoderSpec.of_config(hf_model.config.decoder)
    return DecoderSpec.of_hf(hf_model)


def load_checkpoint(resolved: ResolvedModel, device: str):
    """(model, tokenizer): a text checkpoint on the CPU through our own reader
    (model/load/checkpoint.py: no `transformers` import, seconds faster); anything else through
    `transformers`' from_pretrained. MUSICBRIDGE_LOADER=transformers forces the latter."""

    why = "a GPU" if device != "cpu" else "a melody model" if resolved.is_melody else (
        "not a local folder" if not Path(resolved.path).is_dir() else unsupported(Path(resolved.path)))
    if why is None:
        try:
            return Checkpoint.load(resolved.path), TextTokenizer(Path(resolved.path))
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"could not load model from {resolved.path}: {e}") from e
    log.info("loading through transformers (%s)", why)
    return load_hf_model(resolved, device=device)


def _release_unshared(theirs: torch.nn.Module, ours: torch.nn.Module) -> None:
    """Empty every parameter of `theirs` that `ours` does not hold: its memory goes back."""
    keep = {id(t) for t in list(ours.parameters()) + list(ours.buffers())}
    keep |= {t.untyped_storage().data_ptr() for t in list(ours.parameters()) + list(ours.buffers())
             if t.numel()}

    dead = [p for p in theirs.parameters()
            if id(p) not in keep and not (p.numel() and p.untyped_storage().data_ptr() in keep)]
    drop_pages([p.detach() for p in dead])
    for p in dead:
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
