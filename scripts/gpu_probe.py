"""Where a GPU decode step's time goes, for musicgen-small's shapes (random weights).

Run on a machine with a CUDA GPU (scripts/gpu_check.sh runs it): one decode step of the engine's
decoder at batch 1 with guidance (2 rows) and at 4 and 8 rows, timed

- eagerly (the fixed-shape step launched op by op, a sync per step),
- as a CUDA graph replay (model/decode/step_graph.py: what the engine runs),
- as a CUDA graph of the step compiled by torch.compile (inductor), with its compile time,

plus the kernel count of one eager step (with --breakdown, its kernels by GPU time) and the
eager sampler's time. Prints a table; with --json, writes the numbers. Not part of the product:
it answers "where does a step's time go, and would compiling pay?" (docs/gpu.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _events_ms(fn, n: int) -> float:
    """Median ms of `fn` over n runs, each between two CUDA events."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _kernels(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _breakdown(fn) -> str:
    """One eager step's kernels grouped by name, by GPU time (the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return avg.table(sort_by=key, row_limit=25, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return avg.table(row_limit=25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--rows", default="2,4,8")
    ap.add_argument("--max-len", type=int, default=504, help="cache length (10 s of audio: 503 steps + BOS)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="print one step's kernels by GPU time")
    ap.add_argument("--json")
    args = ap.parse_args()

    from model.bench.compare import PROMPT, build_random_model
    from model.conditioning.prepare import build_conditioning
    from model.engine import Engine
    from model.load.resolve import ResolvedModel
    from model.decode.sampling import Sampler, cfg_mix
    from model.decode.step_graph import GraphedStep, StaticStep
    from model.types import SamplingParams

    dev = "cuda"
    model, tok = build_random_model("musicgen-small")
    eng = Engine(model.to(dev), tok, ResolvedModel("random", "random", False, False, True), dev, args.dtype)
    lm, dt = eng.lm, eng.compute_dtype
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": args.dtype, "rows": []}
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.inference_mode():
        for rows in [int(r) for r in args.rows.split(",")]:
            cond = build_conditioning(eng.hf, tok, [PROMPT] * (rows // 2), None, True, dev, dt)
            cross = lm.cross_kv(cond.states, cond.mask)
            tokens = torch.randint(0, 2048, (rows, 4, 1), device=dev)
            row: dict = {"rows": rows}

            eager = StaticStep(lm, lm.new_cache(rows, args.max_len, dev, dt), cross, rows, dev)
            row["eager_ms"] = _events_ms(lambda: eager(tokens, 300), 30)
            row["kernels"] = _kernels(lambda: eager(tokens, 300))

            graphed = GraphedStep(lm, lm.new_cache(rows, args.max_len, dev, dt), cross, rows, dev)
            graphed(tokens, 300)
            row["graph_ms"] = _events_ms(lambda: graphed(tokens, 300), 200)
            # Back to back, as the decode loop issues them: launch gaps hide behind the GPU.
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(200):
                graphed(tokens, 300)
            torch.cuda.synchronize()
            row["graph_back_to_back_ms"] = (time.perf_counter() - t) * 1000 / 200

            if args.breakdown and rows == 2:
                table = _breakdown(lambda: eager(tokens, 300))
                print(table, flush=True)
                report["breakdown"] = table
            logits = graphed(tokens, 300)
            sampler = Sampler.for_params([SamplingParams(seed=i, top_k=250) for i in range(rows // 2)], dev)
            scale = torch.full((rows // 2, 1, 1), 3.0, device=dev)
            row["sampler_ms"] = _events_ms(lambda: sampler(cfg_mix(logits[:, :, -1], scale)), 50)
            if args.compile and rows == 2:  # one compile (batch 1 with guidance): each shape costs its own
                compiled = torch.compile(lm.step_static, fullgraph=True, dynamic=False)

                class Compiled(GraphedStep):
                    def run(self):
                        return compiled(self.tokens, self.pos, self.cache, self.cross)

                c = Compiled(lm, lm.new_cache(rows, args.max_len, dev, dt), cross, rows, dev)
                t = time.perf_counter()
                out = c(tokens, 300).float()
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - t
                ref = graphed(tokens, 300).float()
                row["compiled_rel_err"] = float((out - ref).abs().max() / ref.abs().max())
                row["compiled_graph_ms"] = _events_ms(lambda: c(tokens, 300), 200)
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{report['gpu']}, torch {report['torch']}, {args.dtype}, cache {args.max_len}\n")
    print("| rows | eager ms | kernels/step | graph ms | graph back-to-back ms | sampler ms | compiled graph ms | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        cg = f"{r['compiled_graph_ms']:.3f}" if "compiled_graph_ms" in r else "-"
        cs = f"{r['compile_s']:.0f}" if "compile_s" in r else "-"
        print(f"| {r['rows']} | {r['eager_ms']:.2f} | {r['kernels']} | {r['graph_ms']:.3f} | "
              f"{r['graph_back_to_back_ms']:.3f} | {r['sampler_ms']:.3f} | {cg} | {cs} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
