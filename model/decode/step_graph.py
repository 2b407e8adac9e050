"""The fixed-shape decode step, run eagerly or captured once as a CUDA graph and replayed.

Why: on a GPU at batch 1-4 a decode step is some 550 small kernels (24 layers of norms,
products, attention, residual adds), each done in microseconds; launching them one by one from
Python costs more than running them. `MusicgenDecoderLM.step_static` keeps every shape and
every host value fixed from step to step, so the whole step is captured once per batch (per
`DecodeState`: its cache and conditioning are the graph's inputs) and replayed with one call.
The token column and the position go in through two small input tensors written in place;
sampling stays outside the graph (each request's own generator draws its noise, so a seed gives
the same tokens with the graph and without).

`StaticStep` is the same step without the graph: what the CPU's equivalence tests run, and what
a GPU runs with MUSICBRIDGE_CUDA_GRAPHS=0 (for A/B measurements; `musicbridge bench --device cuda`
reports both).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from model.decode.decoder import CrossKV, KVCache, MusicgenDecoderLM
from model.settings import current as settings


_forced: bool | None = None  # set by `graphs` for a block; else the environment decides


def graphs_enabled() -> bool:
    if _forced is not None:
        return _forced
    return settings().cuda_graphs


@contextlib.contextmanager
def graphs(enabled: bool) -> Iterator[None]:
    """CUDA graphs on or off for the engines made and run inside the block (the bench's A/B),
    whatever MUSICBRIDGE_CUDA_GRAPHS says; the environment is left alone."""
    global _forced
    old, _forced = _forced, enabled
    try:
        yield
    finally:
        _forced = old


class StaticStep:
    """The fixed-shape step over one batch's cache, fed through input tensors it owns."""

    def __init__(self, lm: MusicgenDecoderLM, cache: KVCache, cross: CrossKV | None, rows: int, device):
        self.lm, self.cache, self.cross = lm, cache, cross
        self.tokens = torch.zeros((rows, lm.spec.n_codebooks, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)

    def load(self, tokens: torch.Tensor, pos: int) -> None:
        """This step's token column (rows, codebooks, 1) and position, written in place."""
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)

    def run(self) -> torch.Tensor:
        return self.lm.step_static(self.tokens, self.pos, self.cache, self.cross)

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (rows, codebooks, 1, vocab) for `tokens` at `pos`."""
        self.load(tokens, pos)
        return self.run()


class GraphedStep(StaticStep):
    """`StaticStep` captured as a CUDA graph at its first call, then replayed.

    The logits it returns live in the graph's own memory and are overwritten by the next
    replay; the caller samples from them before asking for the next step (stream order makes
    that safe without a sync).
    """

    def __init__(self, lm: MusicgenDecoderLM, cache: KVCache, cross: CrossKV | None, rows: int, device):
        super().__init__(lm, cache, cross, rows, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self.load(tokens, pos)
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        # Warm-up on a side stream first (cuBLAS and attention pick their kernels and workspaces
        # outside the capture, as capture requires). The warm-up runs are this step's own: they
        # write the same keys and values into the same cache column the replay writes.
        # capture_begin/end rather than `torch.cuda.graph`, whose entry runs a full gc.collect()
        # (150 ms with musicgen-small's model loaded, measured) and empties the allocator's cache
        # at every capture: once per request and per jam window.
        dev = self.pos.device
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run()
            side.synchronize()
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: the daemon's other threads (a codec decoding another part) keep using
            # the GPU while this thread captures; only this thread's calls must be capture-safe.
            self.graph.capture_begin(capture_error_mode="thread_local")
            try:
                self.logits = self.run()
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream(dev).wait_stream(side)


def static_step(lm: MusicgenDecoderLM, cache: KVCache, cross: CrossKV | None, rows: int, device) -> StaticStep:
    """The step runner for a batch: a CUDA graph on a GPU (unless MUSICBRIDGE_CUDA_GRAPHS=0), else eager."""
    if torch.device(device).type == "cuda" and graphs_enabled():
        return GraphedStep(lm, cache, cross, rows, device)
    return StaticStep(lm, cache, cross, rows, device)
