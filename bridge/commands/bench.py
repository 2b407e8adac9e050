"""`musicbridge bench`: speed of our engine against transformers' generate, in one run."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bridge.bench import jam as jam_bench
from bridge.bench import remote as remote_bench
from bridge.commands.common import UsageError, add_engine_access_args, positive_float
from bridge.commands.progress import Stages
from model.remote.client import RemoteError
from model.types import RequestError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the engine against transformers.generate",
                       description="Build the real architecture with random weights (nothing to "
                       "download) and time our engine and transformers' generate on it, in one run.")
    p.add_argument("--arch", default="musicgen-small", choices=["musicgen-small", "tiny"])
    p.add_argument("--seconds", type=positive_float, default=10.0, help="audio per generation")
    p.add_argument("--stream-seconds", type=positive_float, default=None,
                   help="length of the streaming run (default: --seconds)")
    p.add_argument("--dtype", default=None,
                   help="comma-separated precisions for our engine (default float32,bfloat16,int8,int4 on the "
                        "CPU, float16 on a GPU); 'auto' measures and prints the precision --dtype auto picks on "
                        "this machine, and runs it")
    p.add_argument("--compare", choices=["transformers", "none"], default="transformers")
    p.add_argument("--quality", action="store_true",
                   help="also report teacher-forced logit error of each precision vs float32")
    p.add_argument("--proxy-steps", type=int, default=0, metavar="N",
                   help="with --quality, also train the small MusicGen-shaped proxy for N steps "
                        "(seeded: the same N gives the same weights; 300 is a few minutes) and "
                        "report quantisation quality on it beside random weights")
    p.add_argument("--variations", default="", metavar="N,N,...",
                   help="also time N takes of one prompt in one batched pass for each N (e.g. 1,2,4), "
                        "in the first --dtype")
    p.add_argument("--together", default="", metavar="N,N,...",
                   help="also time one decoder pass stepping N live jams together (each its own decode state, "
                        "as jams on one engine step) for each N (e.g. 1,2,4), in the first --dtype")
    p.add_argument("--e2e", type=positive_float, default=None, metavar="SECONDS",
                   help="instead: end to end, `musicbridge generate --seconds SECONDS` with default "
                        "flags against transformers alone, each a fresh process loading from disk")
    p.add_argument("--e2e-pairs", type=int, default=1, metavar="N",
                   help="with --e2e: run default flags and transformers alternately N times and report "
                        "the medians (a VM's speed drifts; default 1)")
    p.add_argument("--e2e-dtype", default="", metavar="D,D",
                   help="with --e2e: also run generate with --dtype D for each (peak memory per precision)")
    p.add_argument("--model", default=None,
                   help="with --e2e or --jam: the (text) checkpoint directory to use (default: write --arch's "
                        "shapes with random weights to a temporary directory first)")
    p.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda[:N]: on a GPU, transformers runs in float16 and float32 and "
                        "ours in each --dtype with CUDA graphs and the first without (default --dtype there: float16)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--jam", action="store_true",
                   help="benchmark a live jam instead (bridge/bench/jam.py): jam realtime factor, chunk latency, "
                        "first audio vs its bar line, note-to-audio latency; 2-bar chunks at 120 bpm by default")
    p.add_argument("--jam-seconds", type=positive_float, default=30.0, help="--jam: music per run (default 30)")
    p.add_argument("--tempo", type=positive_float, default=120.0, help="--jam: bpm (default 120)")
    p.add_argument("--chunk-bars", type=int, default=2, help="--jam: bars per chunk (default 2)")
    p.add_argument("--audio", default="jack-dummy",
                   help="--jam: output device, or jack-dummy (the default: a private JACK dummy server)")
    p.add_argument("--no-notes", action="store_true",
                   help="--jam: skip the melody-input runs that measure note-to-audio latency")
    p.add_argument("--remote", metavar="URL", default=None,
                   help="instead: N jams and M offline jobs at once against the remote engine at URL "
                        "(`musicbridge worker`): per-jam realtime factor, chunk latency, first audio, throughput")
    add_engine_access_args(p)  # --engine-key, --engine-ca: for --remote
    p.add_argument("--jams", type=int, default=2, help="--remote: concurrent jams (default 2)")
    p.add_argument("--jobs", type=int, default=2, help="--remote: concurrent offline jobs (default 2)")
    p.add_argument("--no-codec", action="store_true",
                   help="--remote: do not decode the jams' codes here (measure the engine alone; this machine's "
                        "cores would otherwise run one codec per jam)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.remote:
        return _remote(args)
    import torch  # torch loads only where this runs

    from model.bench import compare as bench  # torch and transformers load only where this runs
    from model.engine import DTYPES, pick_device  # torch loads only where this runs

    try:
        device = pick_device(args.device)
    except RequestError as e:
        raise UsageError(f"--device: {e}") from None
    gpu = device.startswith("cuda")
    if args.dtype is None:
        args.dtype = "float16" if gpu else "float32,bfloat16,int8,int4"
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    allowed = ("auto", "float32", "bfloat16", "float16") if gpu else ("auto", "float32", "bfloat16", "int8", "int4")
    bad = [d for d in dtypes if d not in DTYPES or d not in allowed]
    if bad or not dtypes:
        raise UsageError(f"--dtype: unknown or unsupported on {'a GPU' if gpu else 'the CPU'}: "
                         f"{', '.join(bad) or '(none)'}; expected a comma-separated list of {', '.join(allowed)}")
    if gpu and args.e2e is not None:
        raise UsageError("--e2e runs on the CPU; for a GPU use the plain bench or --jam")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.e2e is not None:
        return _e2e(args)
    if args.jam:
        return _run_jam(args, dtypes, device)
    variations, together = _counts("--variations", args.variations), _counts("--together", args.together)

    steps = (1 + (args.compare == "transformers") + len(dict.fromkeys(dtypes)) + gpu + bool(variations) + bool(together)
             + bool(args.quality) + 2 * bool(args.quality and args.proxy_steps))
    with Stages("bench", steps) as stages:
        report = bench.run(args.arch, args.seconds, dtypes, args.compare == "transformers",
                           args.stream_seconds or args.seconds, args.quality, log=stages.log,
                           proxy_steps=args.proxy_steps if args.quality else 0, variations=variations,
                           device=device, together=together)
    gpu_name = f", {report['machine']['gpu']}" if gpu else ""
    print(f"\n{args.arch}, {args.seconds:g} s of audio, {report['machine']['cpu']}{gpu_name}, "
          f"{report['machine']['threads']} threads, torch {report['machine']['torch']}\n")
    print(bench.table(report))
    if args.json:
        bench.save(report, args.json)
    return 0


def _counts(flag: str, text: str) -> list[int]:
    """A comma-separated list of counts 1-16 (`--variations`, `--together`); empty: none asked."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = [0]
    if any(not 1 <= v <= 16 for v in counts):
        raise UsageError(f"{flag}: expected counts between 1 and 16 like 1,2,4, got {text!r}")
    return counts


def _e2e(args: argparse.Namespace) -> int:
    from model.bench import e2e  # torch loads only where this runs
    from model.bench.compare import save, write_random_model  # torch and transformers load only where this runs
    from model.engine import DTYPES  # torch loads only where this runs

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    if not 1 <= args.e2e_pairs <= 20:
        raise UsageError(f"--e2e-pairs must be between 1 and 20, got {args.e2e_pairs}")
    extra = tuple(d.strip() for d in args.e2e_dtype.split(",") if d.strip())
    bad = [d for d in extra if d not in DTYPES or d == "float16"]
    if bad:
        raise UsageError(f"--e2e-dtype: unknown or unsupported on CPU: {', '.join(bad)}; expected "
                         "a comma-separated list of float32, bfloat16, int8, int4")
    if args.model:

        if not (Path(args.model) / "config.json").exists():
            raise UsageError(f"--model {args.model}: not a checkpoint directory (no config.json)")
        report = e2e.compare(args.model, args.e2e, log, extra, args.e2e_pairs)
    else:
        with tempfile.TemporaryDirectory(prefix="musicbridge-bench-ckpt-") as tmp:
            log(f"writing a {args.arch}-shaped checkpoint with random weights ...")
            path = write_random_model(args.arch, f"{tmp}/model")
            report = e2e.compare(str(path), args.e2e, log, extra, args.e2e_pairs)
    print()
    print(e2e.table(report))
    if args.json:
        save({"e2e": report}, args.json)
    return 0


def _run_jam(args: argparse.Namespace, dtypes: list[str], compute: str = "cpu") -> int:
    if not 1 <= args.chunk_bars <= 16:
        raise UsageError(f"--chunk-bars must be 1-16, got {args.chunk_bars}")
    if not 20 <= args.tempo <= 400:
        raise UsageError(f"--tempo must be in [20, 400] bpm, got {args.tempo}")
    device = args.audio if args.audio == "jack-dummy" or not args.audio.isdigit() else int(args.audio)
    try:
        report = jam_bench.run(args.arch, dtypes, args.jam_seconds, args.tempo, args.chunk_bars, device,
                               not args.no_notes, log=lambda m: print(m, file=sys.stderr, flush=True),
                               model_dir=args.model, compute=compute)
    except RuntimeError as e:
        raise UsageError(str(e)) from None
    m = report["machine"]
    print(f"\njam: {args.arch}, {args.chunk_bars}-bar chunks at {args.tempo:g} bpm, {args.jam_seconds:g} s per run, "
          f"{m['cpu']}{', ' + m['gpu'] if compute != 'cpu' else ''}, {m['threads']} threads, "
          f"output {report['device']}\n")
    print(jam_bench.table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0


def _remote(args: argparse.Namespace) -> int:
    if not (0 <= args.jams <= 64 and 0 <= args.jobs <= 64) or not (args.jams or args.jobs):
        raise UsageError("--jams and --jobs must be 0-64, and not both 0")
    try:
        report = remote_bench.run(args.remote, args.engine_key, args.model or "auto", args.jams, args.jobs,
                                  args.jam_seconds, args.seconds, log=lambda m: print(m, file=sys.stderr, flush=True),
                                  ca_file=args.engine_ca, codec=not args.no_codec)
    except RemoteError as e:
        raise UsageError(str(e)) from None
    print(remote_bench.table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=float)
    return 0 if not report["errors"] else 1
