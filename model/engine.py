"""The engine's public face: load a checkpoint once, then generate or stream requests.

This is the only part of `model/` that `bridge/` and `plugin_host/` call. Everything it
returns is numpy (audio float32 (channels, samples), codes int64 (codebooks, frames)).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from model.loading import ResolvedModel, load_hf_model, resolve_model
from model.types import AudioChunk, GenerationRequest, RequestError

log = logging.getLogger(__name__)

Progress = Callable[[int, float], None]
"""progress(request_index, fraction_done) - called from the engine's thread, at most every step."""


class Cancelled(Exception):
    """Every request in the call was cancelled."""


@dataclass(frozen=True)
class EngineInfo:
    label: str
    path: str
    is_tiny: bool
    is_melody: bool
    sample_rate: int
    channels: int
    num_codebooks: int
    frame_rate: float
    chroma_frame_rate: float
    device: str
    dtype: str
    max_seconds: float


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RequestError("device 'cuda' asked for, but torch sees no CUDA GPU")
    if not (device == "cpu" or device.startswith("cuda")):
        raise RequestError(f"unknown device {device!r}: expected auto, cpu or cuda[:N]")
    return device


class Engine:
    """A loaded MusicGen and the decode loop over its weights.

    Thread-safety: one call at a time (a lock serialises them); `request.cancel` may be set
    from any thread.
    """

    def __init__(self, hf_model, tokenizer, resolved: ResolvedModel, device: str, dtype: str):
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.resolved = resolved
        self.device = device
        self.dtype = dtype
        self._lock = threading.Lock()
        cfg = hf_model.config
        self.sample_rate = int(cfg.audio_encoder.sampling_rate)
        self.channels = int(cfg.decoder.audio_channels)
        self.num_codebooks = int(cfg.decoder.num_codebooks)
        self.frame_rate = float(cfg.audio_encoder.frame_rate)
        self.is_melody = bool(getattr(cfg, "num_chroma", 0))
        self.chroma_frame_rate = self.sample_rate / 4096.0
        self.hop = int(round(self.sample_rate / self.frame_rate))

    @classmethod
    def load(cls, spec: str = "auto", device: str = "auto", dtype: str = "auto") -> Engine:
        """Resolve and load a checkpoint (see `model.loading.resolve_model`)."""
        resolved = resolve_model(spec)
        dev = pick_device(device)
        if dtype not in ("auto", "float32"):
            # Lower precisions arrive with the engine's own decode loop.
            log.info("dtype %s not available yet; using float32", dtype)
        model, tok = load_hf_model(resolved, device=dev)
        return cls(model, tok, resolved, dev, "float32")

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            label=self.resolved.label, path=self.resolved.path, is_tiny=self.resolved.is_tiny,
            is_melody=self.is_melody, sample_rate=self.sample_rate, channels=self.channels,
            num_codebooks=self.num_codebooks, frame_rate=self.frame_rate,
            chroma_frame_rate=self.chroma_frame_rate, device=self.device, dtype=self.dtype,
            max_seconds=600.0,
        )

    def frames_for(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.frame_rate)))

    def samples_for(self, seconds: float) -> int:
        return self.frames_for(seconds) * self.hop

    def _check(self, requests: Sequence[GenerationRequest]) -> None:
        if not requests:
            raise RequestError("no requests given")
        for r in requests:
            if r.melody is not None and not self.is_melody:
                raise RequestError(
                    f"model {self.resolved.label} is text-only and cannot follow a melody; "
                    "use a MusicGen-Melody checkpoint (e.g. facebook/musicgen-melody)"
                )

    def generate_tokens(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[np.ndarray | None]:
        """Codes (codebooks, frames) per request; None for a request cancelled part way."""
        from model.reference import reference_generate_tokens

        self._check(requests)
        with self._lock:
            out: list[np.ndarray | None] = []
            for i, r in enumerate(requests):
                if r.cancel.is_set():
                    out.append(None)
                    continue
                codes, _ = reference_generate_tokens(self.hf, self.tokenizer, [r])
                out.append(codes[0])
                if progress:
                    progress(i, 1.0)
        return out

    @torch.inference_mode()
    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Codes (codebooks, frames) to float32 audio (channels, samples)."""
        c = torch.from_numpy(np.asarray(codes, dtype=np.int64)).to(self.device)
        outs = []
        for ch in range(self.channels):
            sub = c[ch :: self.channels][None, None]
            outs.append(self.hf.audio_encoder.decode(sub, [None]).audio_values[0, 0])
        return torch.stack(outs).float().cpu().numpy()

    def generate(
        self, requests: Sequence[GenerationRequest], progress: Progress | None = None
    ) -> list[np.ndarray | None]:
        """Audio (channels, samples) per request; None for a cancelled request."""
        codes = self.generate_tokens(requests, progress)
        if all(c is None for c in codes):
            raise Cancelled("all requests were cancelled")
        return [None if c is None else self.decode(c) for c in codes]

    def stream(self, request: GenerationRequest, chunk_seconds: float = 1.0) -> Iterator[AudioChunk]:
        """Audio chunks in order; raises Cancelled if the request is cancelled."""
        (audio,) = self.generate([request])
        step = max(1, int(chunk_seconds * self.sample_rate))
        n = audio.shape[1]
        for start in range(0, n, step):
            yield AudioChunk(audio[:, start : start + step], self.sample_rate, start, start + step >= n)
