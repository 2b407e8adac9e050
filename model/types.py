"""Plain values that cross the engine's public edge: requests in, audio chunks out.

`bridge/` and `plugin_host/` see only these and numpy arrays, never tensors.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np


class RequestError(ValueError):
    """A request the engine cannot run as given; the message says what is expected."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn. `greedy` overrides temperature/top-k/top-p."""

    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.guidance) and 0.0 < self.guidance <= 20.0):
            raise RequestError(f"guidance must be in (0, 20], got {self.guidance}")
        if not (math.isfinite(self.temperature) and 0.0 < self.temperature <= 10.0):
            raise RequestError(f"temperature must be in (0, 10], got {self.temperature}")
        if not (0 <= self.top_k <= 100_000):
            raise RequestError(f"top_k must be in [0, 100000] (0 = off), got {self.top_k}")
        if not (math.isfinite(self.top_p) and 0.0 <= self.top_p <= 1.0):
            raise RequestError(f"top_p must be in [0, 1] (0 = off), got {self.top_p}")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise RequestError(f"seed must be in [0, 2**63), got {self.seed}")


@dataclass
class GenerationRequest:
    """One track's worth of generation.

    melody: one-hot chroma, float32 (frames, 12) at the model's chroma frame rate
        (32000 / 4096 = 7.8125 frames a second), aligned to time zero of the request.
    audio_prompt: float32 (channels, samples) at the model's sample rate; the output
        continues it (the prompt itself is not returned unless `return_prompt`).
    cancel: set it from any thread; the engine stops within one decoder step.
    """

    prompt: str
    seconds: float
    params: SamplingParams = field(default_factory=SamplingParams)
    melody: np.ndarray | None = None
    audio_prompt: np.ndarray | None = None
    return_prompt: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise RequestError("prompt must be text")
        if not (math.isfinite(self.seconds) and 0.0 < self.seconds <= 600.0):
            raise RequestError(f"seconds must be in (0, 600], got {self.seconds}")
        if self.melody is not None:
            m = np.asarray(self.melody, dtype=np.float32)
            if m.ndim != 2 or m.shape[1] != 12 or m.shape[0] == 0:
                raise RequestError(f"melody must be a (frames, 12) chroma, got shape {m.shape}")
            if not np.isfinite(m).all():
                raise RequestError("melody chroma contains NaN or inf")
            self.melody = m
        if self.audio_prompt is not None:
            a = np.asarray(self.audio_prompt, dtype=np.float32)
            if a.ndim == 1:
                a = a[None, :]
            if a.ndim != 2 or a.shape[1] == 0:
                raise RequestError(f"audio_prompt must be (channels, samples), got shape {a.shape}")
            if not np.isfinite(a).all():
                raise RequestError("audio_prompt contains NaN or inf")
            self.audio_prompt = a


@dataclass(frozen=True)
class AudioChunk:
    """A piece of generated audio: float32 (channels, samples) at `sample_rate`.

    `start` is the sample offset of the first sample from time zero of the request, so a
    consumer can place chunks without counting; `final` marks the last chunk of a request.
    """

    audio: np.ndarray
    sample_rate: int
    start: int
    final: bool = False
    request_index: int = 0

    @property
    def frames(self) -> int:
        return int(self.audio.shape[-1])
