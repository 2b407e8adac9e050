"""Plain values that cross the engine's public edge: requests in, audio chunks out.

`bridge/` and `plugin_host/` see only these and numpy arrays, never tensors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MAX_REQUEST_SECONDS = 600.0  # the longest music one request asks for (the OSC, CLI and session-file limit)
MAX_VARIATIONS = 16  # takes of one prompt in one batched pass (generate --variations, OSC variations)


class RequestError(ValueError):
    """A request the engine cannot run as given; the message says what is expected."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as MusicGen's; the message names the file and why."""


@dataclass(frozen=True)
class Range:
    """A closed range [lo, hi], or (lo, hi] when lo_open."""

    lo: float
    hi: float
    lo_open: bool = False

    def __contains__(self, v: float) -> bool:
        return math.isfinite(v) and (self.lo < v if self.lo_open else self.lo <= v) and v <= self.hi

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


# The one definition of each sampling parameter's range; OSC, presets and session files check against it.
SAMPLING_RANGES: dict[str, Range] = {
    "guidance": Range(0.0, 20.0, lo_open=True),
    "temperature": Range(0.0, 10.0, lo_open=True),
    "top_k": Range(0, 100_000),  # 0 = off
    "top_p": Range(0.0, 1.0),  # 0 = off
    "seed": Range(0, 2**63 - 1),
}


def melody_refusal(engine) -> str | None:
    """Why `engine` (anything with .is_melody and .info.label) cannot follow a melody, or None if it can.

    The one wording of the rule "a text-only model cannot follow a melody"; callers prefix
    where the melody came from and raise their own error type.
    """
    if engine.is_melody:
        return None
    return (f"model {engine.info.label} is text-only and cannot follow a melody; "
            "use a MusicGen-Melody checkpoint (e.g. facebook/musicgen-melody)")


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
        for key, r in SAMPLING_RANGES.items():
            v = getattr(self, key)
            if v is not None and v not in r:
                off = " (0 = off)" if key in ("top_k", "top_p") else ""
                raise RequestError(f"{key} must be in {r}{off}, got {v}")

    @classmethod
    def from_dict(cls, params: Mapping[str, Any]) -> SamplingParams:
        """The one parser of a params table (preset, session file, OSC track, sidecar); RequestError if bad."""
        unknown = sorted(set(params) - set(cls.__dataclass_fields__))
        if unknown:
            raise RequestError(f"unknown sampling parameter(s) {', '.join(unknown)}; expected "
                               f"{', '.join(cls.__dataclass_fields__)}")
        try:
            return cls(**params)
        except TypeError as e:  # a value of the wrong type, e.g. a string
            raise RequestError(f"sampling parameters: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain values, as recorded in a sidecar; from_dict(to_dict()) == self."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


SAMPLING_KEYS: tuple[str, ...] = tuple(SamplingParams.__dataclass_fields__)


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
        if self.seconds not in Range(0.0, MAX_REQUEST_SECONDS, lo_open=True):
            raise RequestError(f"seconds must be in (0, {MAX_REQUEST_SECONDS:g}], got {self.seconds}")
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


class Cancelled(Exception):
    """Every request in the call was cancelled."""


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine is, for replies, stems' sidecars and the remote wire."""

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
    pattern: str = "delay"
