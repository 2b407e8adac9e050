"""`--dtype auto` on the CPU: measure each precision's step on this machine, pick the fastest.

Which precision is fastest depends on the CPU (bfloat16 is fast only with native bf16
instructions; the packed int8/int4 kernels' speed depends on the memory system), so it is
measured, not assumed: one decoder layer of the model's own shapes, random weights, batch 2
(guidance), one token against a part-filled KV cache, each precision timed in interleaved
rounds so that a busy neighbour slows all of them alike. The median per precision is kept.

Results are cached in the user's cache folder, keyed by CPU model, torch version, thread count,
decoder shape and which C kernels run (model/kernels/gemv.py), so the measurement (about a second for
musicgen-small) runs once per machine and model shape. The pick is the fastest precision that holds the quality bound
(`model.decode.precision`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from model.kernels import gemv
from model.memory.user_cache import cache_dir
from model.decode.decoder import CrossKV, DecoderLayer, DecoderSpec, KVCache
from model.decode.layer_step import FusedLayer
from model.decode.precision import CPU_CANDIDATES, QUALITY_BOUND, TRAINED_PROXY_ERROR, apply_precision, kv_dtype, within_bound

log = logging.getLogger(__name__)

CACHE_NAME = "autotune.json"
CACHE_VERSION = 1
ROWS = 2  # one request with classifier-free guidance
CONTEXT = 256  # KV positions already filled when the step is timed (about 5 s of audio)
TEXT_LEN = 16


@dataclass(frozen=True)
class Decision:
    dtype: str
    timings_ms: dict[str, float]  # one layer's step, median, per candidate measured
    allowed: tuple[str, ...]  # candidates within the quality bound
    cached: bool  # read from the cache instead of measured now
    key: str

    def reason(self) -> str:
        order = sorted(self.timings_ms, key=self.timings_ms.get)
        times = ", ".join(f"{d} {self.timings_ms[d]:.2f}" for d in order)
        left_out = [d for d in order if d not in self.allowed]
        why = f"fastest within the quality bound (max rel. logit error <= {QUALITY_BOUND:g})"
        if left_out:
            why += "; over the bound: " + ", ".join(
                f"{d} ({TRAINED_PROXY_ERROR.get(d, float('nan')):.1e})" for d in left_out)
        src = "cached measurement" if self.cached else "measured now"
        return f"one layer's step in ms ({src}): {times}; {why}"

    def line(self) -> str:
        return f"dtype auto: {self.dtype} - {self.reason()}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cache_key(spec: DecoderSpec) -> str:
    shape = (f"d{spec.d_model}-h{spec.n_heads}-f{spec.ffn}-l{spec.n_layers}-k{spec.n_codebooks}"
             f"-v{spec.vocab}-{'x' if spec.cross_attention else 'p'}")
    return (f"{cpu_name()}|torch {torch.__version__}|threads {torch.get_num_threads()}|{shape}"
            f"|kernels {gemv.signature()}")


def _cache_path() -> Path:
    return cache_dir() / CACHE_NAME


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    return data


def _write_cache(key: str, timings: dict[str, float]) -> None:
    """Atomic: a reader never sees half a file; a failure to write only costs a re-measure."""
    path = _cache_path()
    data = _read_cache() or {"version": CACHE_VERSION, "entries": {}}
    data.setdefault("entries", {})[key] = {"timings_ms": timings, "measured": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not write the precision cache %s: %s", path, e)


def _cached_timings(key: str) -> dict[str, float] | None:
    entry = _read_cache().get("entries", {}).get(key)
    if not isinstance(entry, dict):
        return None
    t = entry.get("timings_ms")
    if not isinstance(t, dict) or not all(isinstance(v, (int, float)) and v > 0 for v in t.values()):
        return None
    if not set(CPU_CANDIDATES) <= set(t):
        return None
    return {k: float(v) for k, v in t.items()}


def _layer_runner(spec: DecoderSpec, dtype: str):
    """One layer of `spec`'s shape in `dtype`, and a closure running one decode step on it."""
    one = replace(spec, n_layers=1)
    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        layer = DecoderLayer(one)
    layer = layer.to_empty(device="cpu").requires_grad_(False)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    act = apply_precision(layer, dtype)
    layer.fused = FusedLayer.of(layer)  # as the engine runs it (MusicgenDecoderLM.fuse)
    cache = KVCache(one, ROWS, CONTEXT + 8, "cpu", (kv_dtype(dtype) if layer.fused else None) or act)
    for data, scale in ((cache.k, cache.k_scale), (cache.v, cache.v_scale)):
        if scale is None:
            data.normal_(generator=g)
        else:  # int8 keys/values and their scales, as a filled cache holds them
            data.copy_(torch.randint(-127, 128, data.shape, generator=g, dtype=torch.int8))
            scale.uniform_(0.01, 0.05, generator=g)
    cross = None
    if spec.cross_attention:
        kv = torch.randn(1, ROWS, spec.n_heads, TEXT_LEN, spec.head_dim, generator=g).to(act)
        cross = CrossKV(kv, kv.clone(), torch.ones(ROWS, 1, 1, TEXT_LEN, dtype=torch.bool))
    x = torch.randn(ROWS, 1, spec.d_model, generator=g).to(act)

    def step() -> None:
        layer(x, 0, CONTEXT, cache, cross)

    return step


@torch.inference_mode()
def measure(spec: DecoderSpec, candidates=CPU_CANDIDATES, rounds: int = 7, reps: int = 3) -> dict[str, float]:
    """Median ms of one layer's decode step per precision, interleaved rounds."""
    runners = {d: _layer_runner(spec, d) for d in candidates}
    for run in runners.values():  # warm-up: first calls allocate and pick kernels
        run()
        run()
    samples: dict[str, list[float]] = {d: [] for d in candidates}
    for _ in range(rounds):
        for d, run in runners.items():
            t = time.perf_counter()
            for _ in range(reps):
                run()
            samples[d].append((time.perf_counter() - t) * 1000 / reps)
    return {d: float(np.median(s)) for d, s in samples.items()}


def decide(timings: dict[str, float], cached: bool, key: str) -> Decision:
    """The fastest measured precision within the quality bound (float32 always is)."""
    allowed = tuple(d for d in CPU_CANDIDATES if d in timings and within_bound(d))
    best = min(allowed, key=timings.get) if allowed else "float32"
    return Decision(best, dict(timings), allowed, cached, key)


def choose(spec: DecoderSpec, remeasure: bool = False) -> Decision:
    """The CPU precision for a decoder of `spec`'s shape on this machine (cached)."""
    key = cache_key(spec)
    timings = None if remeasure else _cached_timings(key)
    cached = timings is not None
    if timings is None:
        timings = measure(spec)
        _write_cache(key, timings)
    return decide(timings, cached, key)


def decision_dict(d: Decision) -> dict:
    out = asdict(d)
    out["reason"] = d.reason()
    out["cache"] = str(_cache_path())
    return out
