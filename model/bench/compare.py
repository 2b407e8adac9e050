"""`musicbridge bench`: our engine against `transformers`' generate, same weights, one run.

Benchmarks build the real architecture with random weights: nothing to download, and a
decode step costs the same arithmetic and the same bytes whatever the weights' values.
"""

from __future__ import annotations

import copy
import gc
import json
import platform
import resource
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.bench.proxy import STYLES, delayed_batch, structured_codes, train_proxy
from model.bench.reference import frames_for_seconds
from model.codec.codes import StreamingDecoder, musicgen_32k_config
from model.codec.stream import StatefulDecoder
from model.conditioning.prepare import build_conditioning
from model.decode import autotune
from model.decode.cross_fold import folded
from model.decode.decoder import DecoderSpec
from model.decode.loop import decode_together
from model.kernels import gemv
from model.decode.step_graph import graphs as graphs_on
from model.engine import Engine
from model.load.resolve import ResolvedModel
from model.load.tiny import _build_tokenizer, build_tiny_model, randomize_codebooks
from model.memory.user_cache import new_folder
from model.types import GenerationRequest, SamplingParams

PROMPT = "lofi hip hop beat with warm piano chords and vinyl crackle"
ARCHS = ("musicgen-small", "tiny")


def build_random_model(arch: str):
    """(hf model, tokenizer) with the architecture's real shapes and random weights."""
    # transformers loads only where this runs
    from transformers import (AutoTokenizer, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    tok_dir = Path(tempfile.mkdtemp(prefix="musicbridge-bench-tok-"))
    _build_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    if arch == "tiny":
        model = build_tiny_model()
        model.generation_config.top_k = 250
        return model, tokenizer
    if arch != "musicgen-small":
        raise ValueError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12,
                    feed_forward_proj="relu", dropout_rate=0.0)
    codec = musicgen_32k_config()
    dec = MusicgenDecoderConfig(vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24,
                                ffn_dim=4096, num_attention_heads=16, hidden_size=1024, num_codebooks=4,
                                dropout=0.0, pad_token_id=2048, bos_token_id=2048,
                                decoder_start_token_id=2048)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MusicgenForConditionalGeneration(config).eval()
        randomize_codebooks(model.audio_encoder)
    g = model.generation_config
    g.pad_token_id = g.bos_token_id = g.decoder_start_token_id = 2048
    g.max_length = 1500
    return model, tokenizer


def write_random_model(arch: str, out_dir) -> Path:
    """Write `build_random_model(arch)` as a checkpoint directory, atomically."""
    return write_checkpoint(*build_random_model(arch), out_dir)


def write_checkpoint(model, tokenizer, out_dir) -> Path:
    """A `transformers` model and its tokenizer as a checkpoint directory, atomically."""

    out = Path(out_dir)
    with new_folder(out, ".random-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def measure_bandwidth(mb: int = 512, device: str = "cpu") -> float:
    """Bytes a second this machine streams from memory: the floor's denominator.

    The best of a large reduction and a large float32 matrix-vector product (the decode
    step's own access pattern), each the fastest of five runs. On a GPU: a device-to-device
    copy of 1 GiB, counting bytes read and written.
    """
    if device.startswith("cuda"):
        return _gpu_bandwidth(device)
    n = mb * 2**20 // 4
    x = torch.ones(n)
    w = torch.ones(n // 8192, 8192)
    v = torch.ones(2, 8192)
    best = 0.0
    for fn in (lambda: x.sum(), lambda: torch.nn.functional.linear(v, w)):
        fn()
        for _ in range(5):
            t = time.perf_counter()
            fn()
            best = max(best, n * 4 / (time.perf_counter() - t))
    return best


def _gpu_bandwidth(device: str) -> float:
    src = torch.rand(2**28, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(6):
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def _on(model, device: str, dtype: torch.dtype | None = None):
    """`model` on `device` (in `dtype`): itself on the CPU, else a copy (engines in other
    precisions convert shared modules in place, so each GPU runner gets its own)."""
    if not device.startswith("cuda"):
        return model
    moved = copy.deepcopy(model).to(device)
    return moved.to(dtype) if dtype is not None else moved


def _gpu_peak_mb(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def _reset_gpu_peak(device: str) -> None:
    if device.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def weight_bytes(module: torch.nn.Module, folded_bytes: int | None = None) -> int:
    """Bytes of parameters and buffers a decode step reads (positions excluded: one row a step;
    cross-attention's key and value projections too: they run once, on the text). With
    `folded_bytes`, cross-attention reads that many bytes of folded keys and values instead of
    its query and output projections (model/decode/cross_fold.py)."""
    skip = ("cross_k.", "cross_v.") + (("cross_q.", "cross_out.") if folded_bytes is not None else ())
    total = folded_bytes or 0
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if name in ("positions", "offsets") or name.startswith("embed") or any(k in name for k in skip):
            continue
        total += t.numel() * t.element_size()
    return total


def _folded_bytes(eng: Engine, prompt: str) -> int | None:
    """What a step reads of `prompt`'s folded cross-attention (guided), or None if not folded."""

    stack = eng.lm.stack
    if stack is None or stack.fold_dtype is None or eng.is_melody:
        return None
    cond = build_conditioning(eng.hf, eng.tokenizer, [prompt], None, True, eng.device, eng.compute_dtype)
    f = folded(eng.lm.layers, eng.lm.cross_kv(cond.states, cond.mask), stack.fold_dtype)
    return None if f is None else f.nbytes


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class Result:
    name: str
    dtype: str
    seconds: float
    steps: int
    ms_per_step_median: float
    wall_s: float
    rtf: float
    ttfa_s: float | None = None
    first_chunk_decode_ms: float | None = None
    last_chunk_decode_ms: float | None = None
    peak_rss_mb: float = 0.0
    floor_ms_per_step: float | None = None
    extra: dict = field(default_factory=dict)


def bench_transformers(model, tokenizer, seconds: float, device: str = "cpu", dtype: str = "float32") -> Result:
    """transformers' own generate, top-k 250 with guidance 3 as ours; on a GPU in `dtype`."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # transformers loads only where this runs

    _reset_gpu_peak(device)
    model = _on(model, device, getattr(torch, dtype))

    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    frames = frames_for_seconds(seconds, model.config.audio_encoder.frame_rate)
    steps = frames + model.decoder.num_codebooks - 1
    enc = tokenizer([PROMPT], return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():  # warm-up: first-call allocations are not the steady state
        model.generate(**enc, do_sample=True, max_new_tokens=8, guidance_scale=3.0)
    stamps.clear()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.inference_mode():
        audio = model.generate(**enc, do_sample=True, top_k=250, guidance_scale=3.0,
                               max_new_tokens=steps, stopping_criteria=StoppingCriteriaList([Clock()]))
    wall = time.perf_counter() - t0
    assert audio.shape[-1] > 0
    gaps = np.diff(stamps) * 1000
    extra = {"note": "no streaming: first audio arrives with the last"}
    if device.startswith("cuda"):
        extra["gpu_peak_mb"] = _gpu_peak_mb(device)
    del model
    return Result("transformers.generate", dtype, seconds, steps, float(np.median(gaps)), wall,
                  seconds / wall, ttfa_s=wall, peak_rss_mb=peak_rss_mb(), extra=extra)


def bench_engine(model, tokenizer, dtype: str, seconds: float, stream_seconds: float,
                 bandwidth: float, device: str = "cpu", graphs: bool = True) -> Result:
    """Our engine in `dtype`. On a GPU, `graphs=False` runs the same fixed-shape step without
    CUDA graphs (MUSICBRIDGE_CUDA_GRAPHS=0), for the A/B."""

    with graphs_on(graphs):
        return _bench_engine(model, tokenizer, dtype, seconds, stream_seconds, bandwidth, device, graphs)


def _bench_engine(model, tokenizer, dtype, seconds, stream_seconds, bandwidth, device, graphs) -> Result:
    resolved = ResolvedModel("random", "random weights", False, False, True)
    _reset_gpu_peak(device)
    gpu = device.startswith("cuda")
    eng = Engine(_on(model, device), tokenizer, resolved, device, dtype)
    stamps: list[float] = []
    eng.generate([GenerationRequest(PROMPT, 0.3, SamplingParams(seed=1))])  # warm-up
    list(eng.stream(GenerationRequest(PROMPT, 0.3, SamplingParams(seed=1)), chunk_seconds=0.1))
    req = GenerationRequest(PROMPT, seconds, SamplingParams(seed=0, top_k=250, guidance=3.0))
    if gpu:
        # Steps queue without waiting on the GPU, so a host clock per step measures launches.
        # The wall time (and RTF) comes from a run with nothing in the loop; the median step
        # from a second run whose hook waits for each step to finish.
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        eng.generate([req])
        wall = time.perf_counter() - t0

        def hook() -> None:
            torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

        eng.step_hook = hook
        eng.generate([req])
    else:
        eng.step_hook = lambda: stamps.append(time.perf_counter())
        t0 = time.perf_counter()
        eng.generate([req])
        wall = time.perf_counter() - t0
    eng.step_hook = None
    gaps = np.diff(stamps) * 1000
    steps = eng.pattern.n_steps(eng.frames_for(seconds))
    # Streaming: time to first audio, and each chunk's codec cost along the stream.

    pushes: list[float] = []
    decoders = (StreamingDecoder, StatefulDecoder)  # whichever model.codec.codes.streaming_decoder picks
    real_pushes = [cls.push for cls in decoders]

    def timed(real_push):
        def timed_push(self, codes):
            t = time.perf_counter()
            out = real_push(self, codes)
            pushes.append((time.perf_counter() - t) * 1000)
            return out
        return timed_push

    for cls, real_push in zip(decoders, real_pushes):
        cls.push = timed(real_push)
    try:
        t0 = time.perf_counter()
        ttfa = None
        sreq = GenerationRequest(PROMPT, stream_seconds, SamplingParams(seed=0, top_k=250, guidance=3.0))
        for chunk in eng.stream(sreq, chunk_seconds=1.0):
            if ttfa is None and chunk.frames:
                ttfa = time.perf_counter() - t0
        stream_wall = time.perf_counter() - t0
    finally:
        for cls, real_push in zip(decoders, real_pushes):
            cls.push = real_push
    # The first push is short (fast first audio) and the last is the flush: compare the first
    # and last full-size chunks.
    pushes = pushes[1:-1] if len(pushes) > 3 else pushes
    step_bytes = weight_bytes(eng.lm, _folded_bytes(eng, PROMPT))
    floor = step_bytes / bandwidth * 1000
    extra = {"stream_seconds": stream_seconds, "stream_rtf": stream_seconds / stream_wall,
             "weight_mb": step_bytes / 2**20}
    if gpu:
        extra.update(gpu_peak_mb=_gpu_peak_mb(device), graphs=graphs, wall_ms_per_step=wall * 1000 / steps)
    name = "musicbridge" if not gpu or graphs else "musicbridge (no CUDA graph)"
    res = Result(name, dtype, seconds, steps, float(np.median(gaps)), wall, seconds / wall,
                 ttfa_s=ttfa, first_chunk_decode_ms=pushes[0] if pushes else None,
                 last_chunk_decode_ms=pushes[-1] if pushes else None, peak_rss_mb=peak_rss_mb(),
                 floor_ms_per_step=floor, extra=extra)
    del eng
    gc.collect()
    return res


@torch.inference_mode()
def quality(model, tokenizer, dtypes: list[str], n_tokens: int = 64, proxy: str = "random",
            greedy_seconds: float = 1.0, device: str = "cpu") -> list[dict]:
    """Each precision against float32 on one model: logit error, greedy and sampling agreement.

    - teacher-forced logits, one decode step at a time, on 2 sequences x `n_tokens` steps
      (random tokens for random weights; held-out structured clips for the trained proxy):
      max and RMS error relative to
      float32's max / RMS, and argmax agreement;
    - top-k 250 sampling KL: KL(P || Q) where P is float32's top-250 sampling distribution
      and Q the precision's distribution renormalised over the same 250 tokens (nats, mean over
      positions);
    - greedy agreement: free-running greedy decoding of `greedy_seconds` from two prompts,
      the fraction of tokens equal to float32's (one early difference changes what follows,
      so this is the strictest of the three).
    """

    resolved = ResolvedModel("random", f"{proxy} proxy", False, False, True)
    ref_eng = Engine(_on(model, device), tokenizer, resolved, device, "float32")
    k = ref_eng.num_codebooks
    prompts = [PROMPT, "techno"]
    if proxy == "trained":
        codes, _ = structured_codes(np.random.default_rng(10_000), 2, n_tokens - k)
        tokens, _ = delayed_batch(codes)
        prompts = [STYLES[0], STYLES[1]]
    else:
        tokens = torch.randint(0, ref_eng.lm.spec.vocab, (2, k, n_tokens),
                               generator=torch.Generator().manual_seed(0))
    tokens = tokens.to(device)

    def logits(eng: Engine) -> torch.Tensor:
        cond = build_conditioning(eng.hf, tokenizer, prompts, None, False, device, eng.compute_dtype)
        cache = eng.lm.new_cache(2, tokens.shape[2], device, eng.compute_dtype)
        cross = eng.lm.cross_kv(cond.states, cond.mask)
        # Step by step, as decoding runs: the decode kernels' arithmetic, not a prefill's.
        steps = [eng.lm(tokens[:, :, t : t + 1], t, cache, cross) for t in range(tokens.shape[2])]
        return torch.cat(steps, dim=2).float()

    def greedy(eng: Engine) -> list[np.ndarray]:
        reqs = [GenerationRequest(p, greedy_seconds, SamplingParams(greedy=True, guidance=3.0)) for p in prompts]
        return eng.generate_tokens(reqs)

    ref = logits(ref_eng)
    ref_greedy = greedy(ref_eng)
    p_ref, top = _topk_probs(ref, 250)
    rows = []
    for dt in dtypes:
        if dt == "float32":
            continue
        eng = Engine(copy.deepcopy(model).to(device), tokenizer, resolved, device, dt)
        out = logits(eng)
        q = torch.softmax(out.gather(-1, top), dim=-1)
        kl = (p_ref * (p_ref.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)
        ours = greedy(eng)
        same = sum(int((a == b).sum()) for a, b in zip(ours, ref_greedy))
        total = sum(a.size for a in ref_greedy)
        rows.append({
            "proxy": proxy,
            "dtype": dt,
            "max_rel_error": float((out - ref).abs().max() / ref.abs().max()),
            "rms_rel_error": float((out - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
            "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
            "topk250_kl": float(kl.mean()),
            "greedy_agreement": same / total,
        })
        del eng
        gc.collect()
    return rows


def _topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32's top-k sampling distribution and the indices of its k tokens."""
    k = min(k, logits.shape[-1])
    vals, idx = torch.topk(logits, k, dim=-1)
    return torch.softmax(vals, dim=-1), idx


def trained_proxy(steps: int, log=print):
    """The trained quantisation proxy (model.bench.proxy), trained now with a fixed seed."""

    t = time.perf_counter()
    model, tokenizer, loss = train_proxy(steps=steps, log_fn=log)
    log(f"trained the proxy for {steps} steps in {time.perf_counter() - t:.0f} s (final loss {loss:.3f})")
    return model, tokenizer, loss


def bench_variations(model, tokenizer, dtype: str, seconds: float, counts: list[int], log=print,
                     device: str = "cpu") -> list[dict]:
    """N takes of one prompt in one batched pass (as `generate --variations N`), per N: wall
    seconds, ms a step, and cost against one take. The step reads the weights once for all rows,
    so N takes cost far less than N times one."""
    resolved = ResolvedModel("random", "random weights", False, False, True)
    eng = Engine(_on(model, device), tokenizer, resolved, device, dtype)
    eng.generate([GenerationRequest(PROMPT, 0.3, SamplingParams(seed=1))])  # warm-up
    rows = []
    for n in counts:
        stamps: list[float] = []
        eng.step_hook = lambda: stamps.append(time.perf_counter())
        reqs = [GenerationRequest(PROMPT, seconds, SamplingParams(seed=i, top_k=250, guidance=3.0))
                for i in range(n)]
        if device.startswith("cuda"):
            eng.step_hook = None  # a waiting hook would serialise the GPU; wall time only
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        eng.generate_tokens(reqs)
        wall = time.perf_counter() - t0
        steps = eng.pattern.n_steps(eng.frames_for(seconds))
        per_step = float(np.median(np.diff(stamps)) * 1000) if stamps else wall * 1000 / steps
        rows.append({"n": n, "dtype": dtype, "wall_s": wall, "ms_per_step_median": per_step})
        log(f"  variations {n}: {wall:.1f} s")
    one = rows[0]["wall_s"] if rows and rows[0]["n"] == 1 else None
    for r in rows:
        r["vs_one"] = r["wall_s"] / one if one else None
    del eng
    gc.collect()
    return rows


def bench_together(model, tokenizer, dtype: str, counts: list[int], log=print, device: str = "cpu",
                   frames: int = 300, passes: int = 30) -> list[dict]:
    """One decoder pass stepping N live jams together (model/decode/step_sharing.py), per N: each
    jam its own decode state (a prompt of its own, guided: two rows), `frames` into its window;
    the median of `passes` passes, and its cost against one jam's."""
    resolved = ResolvedModel("random", "random weights", False, False, True)
    eng = Engine(_on(model, device), tokenizer, resolved, device, dtype)
    streams = [eng.live_stream(f"{PROMPT} {i}", SamplingParams(seed=i, guidance=3.0), context_seconds=4.0)
               for i in range(max(counts))]
    for s in streams:
        for _ in s.advance(frames, piece_frames=frames):
            pass
    states = [s._state for s in streams]
    rows = []
    for n in counts:
        decode_together(states[:n])  # warm-up
        times = []
        for _ in range(passes):
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            decode_together(states[:n])
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        rows.append({"n": n, "dtype": dtype, "ms_per_pass_median": float(np.median(times) * 1000)})
        log(f"  {n} jam(s) together: {rows[-1]['ms_per_pass_median']:.1f} ms a pass")
    one = next((r["ms_per_pass_median"] for r in rows if r["n"] == 1), None)
    for r in rows:
        r["vs_one"] = r["ms_per_pass_median"] / one if one else None
    del eng, streams, states
    gc.collect()
    return rows


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version()}
    if gemv.available():  # which code ran the figures: the integer kernels, and whose threads ran their regions
        out["int_kernels"] = gemv.int_arch()
        out["kernel_threads"] = "own pool" if gemv.own_pool() else "OpenMP runtime"
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def run(arch: str, seconds: float, dtypes: list[str], compare: bool, stream_seconds: float,
        with_quality: bool, log=print, proxy_steps: int = 0, variations: list[int] | None = None,
        device: str = "cpu", together: list[int] | None = None) -> dict:
    """The whole bench on `device`. On a GPU: transformers in float16 and float32, ours in each
    of `dtypes` with CUDA graphs and the first of them without (the A/B)."""
    t = time.perf_counter()
    model, tokenizer = build_random_model(arch)
    log(f"built {arch} with random weights in {time.perf_counter() - t:.1f} s")
    gpu = device.startswith("cuda")
    bandwidth = measure_bandwidth(64 if arch == "tiny" else 512, device)
    log(f"memory bandwidth ({'device copy' if gpu else 'large reduction'}): {bandwidth / 1e9:.1f} GB/s")
    auto = None
    if gpu:
        dtypes = list(dict.fromkeys("float16" if d == "auto" else d for d in dtypes))
    if "auto" in dtypes:
        decision = autotune.choose(DecoderSpec.of_hf(model))
        auto = autotune.decision_dict(decision)
        log(decision.line())
        dtypes = list(dict.fromkeys(decision.dtype if d == "auto" else d for d in dtypes))
    results: list[Result] = []
    if compare:
        for ref_dtype in (("float16", "float32") if gpu else ("float32",)):
            log(f"running transformers.generate {ref_dtype} ...")
            results.append(bench_transformers(model, tokenizer, seconds, device, ref_dtype))
    for dt in dtypes:
        log(f"running musicbridge {dt} ...")
        results.append(bench_engine(model, tokenizer, dt, seconds, stream_seconds, bandwidth, device))
    if gpu:
        log(f"running musicbridge {dtypes[0]} without CUDA graphs ...")
        results.append(bench_engine(model, tokenizer, dtypes[0], seconds, stream_seconds, bandwidth, device,
                                    graphs=False))
    out = {"arch": arch, "seconds": seconds, "machine": machine(), "bandwidth_gbs": bandwidth / 1e9,
           "results": [asdict(r) for r in results], "auto": auto, "device": device}
    if variations:
        vd = dtypes[0]
        log(f"variations {','.join(map(str, variations))} in {vd} ...")
        out["variations"] = bench_variations(model, tokenizer, vd, seconds, variations, log, device)
    if together:
        log(f"jams stepping together {','.join(map(str, together))} in {dtypes[0]} ...")
        out["together"] = bench_together(model, tokenizer, dtypes[0], together, log, device)
    if with_quality:
        log("measuring quantisation quality on random weights ...")
        kinds = ("float16", "bfloat16") if gpu else ("bfloat16", "int8", "int4")
        qd = [d for d in kinds if d in dtypes] or [kinds[0] if gpu else "int8"]
        out["quality"] = quality(model, tokenizer, qd, proxy="random", device=device)
        if proxy_steps:
            pm, pt, loss = trained_proxy(proxy_steps, log)
            log("measuring quantisation quality on the trained proxy ...")
            out["quality"] += quality(pm, pt, qd, proxy="trained", device=device)
            out["proxy"] = {"steps": proxy_steps, "final_loss": loss}
    return out


def table(report: dict) -> str:
    """Markdown tables of a report, with ratios against transformers where it ran."""
    rows = report["results"]
    # Against the fastest transformers runner (on a GPU it runs in float16 and float32).
    refs = [r for r in rows if r["name"] == "transformers.generate"]
    ref = min(refs, key=lambda r: r["ms_per_step_median"]) if refs else None
    lines = ["| runner | dtype | ms/step (median) | vs transformers | floor ms/step | RTF (generate) "
             "| RTF (stream) | first audio s | chunk decode first/last ms | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{ref['ms_per_step_median'] / r['ms_per_step_median']:.2f}x" if ref else "-"
        floor = f"{r['floor_ms_per_step']:.1f}" if r.get("floor_ms_per_step") else "-"
        srtf = f"{r['extra']['stream_rtf']:.2f}" if "stream_rtf" in r["extra"] else "-"
        ttfa = f"{r['ttfa_s']:.2f}" if r.get("ttfa_s") is not None else "-"
        chunks = (f"{r['first_chunk_decode_ms']:.0f} / {r['last_chunk_decode_ms']:.0f}"
                  if r.get("first_chunk_decode_ms") else "-")
        lines.append(f"| {r['name']} | {r['dtype']} | {r['ms_per_step_median']:.1f} | {ratio} | {floor} "
                     f"| {r['rtf']:.3f} | {srtf} | {ttfa} | {chunks} | {r['peak_rss_mb']:.0f} |")
    gpu_rows = [r for r in rows if r["extra"].get("gpu_peak_mb") is not None]
    if gpu_rows:
        lines += ["", f"GPU: {report['machine'].get('gpu', '?')}; device copy {report['bandwidth_gbs']:.0f} GB/s",
                  "", "| runner | dtype | ms/step from wall time | x real time (generate) | GPU peak MB |",
                  "|---|---|---|---|---|"]
        for r in gpu_rows:
            per = r["extra"].get("wall_ms_per_step", r["wall_s"] * 1000 / r["steps"])
            lines.append(f"| {r['name']} | {r['dtype']} | {per:.2f} | {r['rtf']:.1f} | {r['extra']['gpu_peak_mb']:.0f} |")
    if report.get("auto"):
        a = report["auto"]
        lines += ["", f"dtype auto on this machine: **{a['dtype']}** - {a['reason']}"]
    if report.get("variations"):
        lines += _against_one(["variations (one batched pass)", "dtype", "wall s", "ms/step (median)",
                               "cost vs one take"], report["variations"],
                              lambda v: [f"{v['wall_s']:.1f}", f"{v['ms_per_step_median']:.1f}"])
    if report.get("together"):
        lines += _against_one(["jams stepping together (one decoder pass)", "dtype", "ms a pass (median)",
                               "cost vs one jam"], report["together"],
                              lambda v: [f"{v['ms_per_pass_median']:.1f}"])
    if report.get("quality"):
        lines += ["", "| proxy | dtype | max rel. logit error | RMS rel. logit error | argmax agreement "
                  "| top-k 250 KL (nats) | greedy agreement |", "|---|---|---|---|---|---|---|"]
        for q in report["quality"]:
            lines.append(f"| {q['proxy']} | {q['dtype']} | {q['max_rel_error']:.2e} | {q['rms_rel_error']:.2e} "
                         f"| {q['argmax_agreement']:.3f} | {q['topk250_kl']:.2e} | {q['greedy_agreement']:.3f} |")
    return "\n".join(lines)


def _against_one(header: list[str], rows: list[dict], cells) -> list[str]:
    """A table of runs by count N: N, dtype, `cells(row)`, and the cost against N = 1."""
    out = ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for v in rows:
        vs = f"{v['vs_one']:.2f}x" if v.get("vs_one") else "-"
        out.append("| " + " | ".join([str(v["n"]), v["dtype"], *cells(v), vs]) + " |")
    return out


def save(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")


