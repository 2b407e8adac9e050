"""Codebook interleaving patterns: which (codebook, frame) each decoder step emits.

A pattern is one small object chosen by name. Its whole content is `index(n_frames)`: an
int array (codebooks, steps) holding the frame each codebook emits at each step, or -1 where
that codebook emits the pad token. Building a step sequence from codes and reverting it are
the same gather/scatter for every pattern, so they live once in the base class.

Step s here is the decoder's step s+1: the token grid the engine fills has a BOS column in
front (transformers' layout), so `index[:, s]` describes grid column s + 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class CodebookPattern(ABC):
    name: str = ""

    def __init__(self, n_codebooks: int, channels: int = 1):
        if n_codebooks < 1 or channels not in (1, 2) or n_codebooks % channels:
            raise ValueError(
                f"a pattern needs n_codebooks >= 1 divisible by channels (1 or 2); got "
                f"{n_codebooks} codebooks, {channels} channels"
            )
        self.n_codebooks = n_codebooks
        self.channels = channels

    @abstractmethod
    def index(self, n_frames: int) -> np.ndarray:
        """(n_codebooks, n_steps) frame emitted at each step, -1 for pad."""

    def n_steps(self, n_frames: int) -> int:
        return int(self.index(n_frames).shape[1])

    def build(self, codes: np.ndarray, pad_id: int) -> np.ndarray:
        """Codes (K, T) -> step sequence (K, S), pad where no frame is emitted."""
        codes = np.asarray(codes)
        idx = self.index(codes.shape[1])
        seq = np.full(idx.shape, pad_id, dtype=codes.dtype)
        cb, st = np.nonzero(idx >= 0)
        seq[cb, st] = codes[cb, idx[cb, st]]
        return seq

    def revert(self, seq: np.ndarray, n_frames: int) -> np.ndarray:
        """Step sequence (K, S) -> codes (K, n_frames)."""
        seq = np.asarray(seq)
        idx = self.index(n_frames)
        codes = np.zeros((self.n_codebooks, n_frames), dtype=seq.dtype)
        cb, st = np.nonzero(idx >= 0)
        codes[cb, idx[cb, st]] = seq[cb, st]
        return codes

    def first_complete_step(self, n_frames: int) -> np.ndarray:
        """(T,) the step (0-based) at which each frame has all its codebooks."""
        idx = self.index(n_frames)
        out = np.zeros(n_frames, dtype=np.int64)
        cb, st = np.nonzero(idx >= 0)
        np.maximum.at(out, idx[cb, st], st)
        return out


class DelayPattern(CodebookPattern):
    """Codebook k runs `delay(k)` steps behind the first: what MusicGen checkpoints use.

    Stereo checkpoints interleave left/right codebooks, and both codebooks of a level share a
    delay (transformers' `build_delay_pattern_mask`).
    """

    name = "delay"

    def delays(self) -> np.ndarray:
        return np.arange(self.n_codebooks) // self.channels

    def index(self, n_frames: int) -> np.ndarray:
        d = self.delays()
        steps = n_frames + int(d.max())
        s = np.arange(steps)[None, :] - d[:, None]
        return np.where((s >= 0) & (s < n_frames), s, -1).astype(np.int64)


class ParallelPattern(CodebookPattern):
    """All codebooks of a frame in the same step."""

    name = "parallel"

    def index(self, n_frames: int) -> np.ndarray:
        return np.tile(np.arange(n_frames, dtype=np.int64), (self.n_codebooks, 1))


class FlattenPattern(CodebookPattern):
    """One codebook per step, frame by frame: K steps a frame, the most exact and slowest."""

    name = "flatten"

    def index(self, n_frames: int) -> np.ndarray:
        k = self.n_codebooks
        idx = np.full((k, n_frames * k), -1, dtype=np.int64)
        for cb in range(k):
            idx[cb, cb::k] = np.arange(n_frames)
        return idx


class CoarseFirstPattern(CodebookPattern):
    """VALL-E style: the first codebook level alone, frame by frame, then the rest in parallel."""

    name = "coarse_first"

    def index(self, n_frames: int) -> np.ndarray:
        k, c = self.n_codebooks, self.channels
        idx = np.full((k, 2 * n_frames), -1, dtype=np.int64)
        frames = np.arange(n_frames)
        idx[:c, :n_frames] = frames
        idx[c:, n_frames:] = frames
        return idx


PATTERNS: dict[str, type[CodebookPattern]] = {
    p.name: p for p in (DelayPattern, ParallelPattern, FlattenPattern, CoarseFirstPattern)
}


def get_pattern(name: str, n_codebooks: int, channels: int = 1) -> CodebookPattern:
    try:
        cls = PATTERNS[name]
    except KeyError:
        raise ValueError(f"unknown codebook pattern {name!r}: expected one of {', '.join(PATTERNS)}") from None
    return cls(n_codebooks, channels)
