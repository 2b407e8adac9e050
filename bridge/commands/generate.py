"""`musicbridge generate`: one-shot text (and melody) to music, written to a file."""

from __future__ import annotations

import argparse
import secrets
from dataclasses import replace
from pathlib import Path

import numpy as np

from audiofile import check_writable_format, resample, write_audio
from bridge.commands.common import (UsageError, add_engine_args, add_model_args, add_sampling_args, load_engine,
                                    nonneg_int, request_seconds, sampling_params)
from bridge.commands.progress import Progress
from model.types import MAX_VARIATIONS, GenerationRequest, melody_refusal


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one clip from a text prompt",
                       description="Generate music from a text prompt and write it to WAV or FLAC.")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--prompt", required=True, help="text description of the music")
    p.add_argument("--seconds", type=request_seconds, default=8.0, help="length of audio to make")
    p.add_argument("--out", required=True, help="output .wav or .flac (not overwritten unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_sampling_args(p)
    p.add_argument("--sample-rate", type=nonneg_int, default=0,
                   help="resample the output to this rate (default: the model's rate)")
    p.add_argument("--melody", help="melody to follow: .mid, .wav, .flac or chroma .npy (melody models)")
    p.add_argument("--melody-track", default=None, help="MIDI track name or index for --melody")
    p.add_argument("--save-tokens", help="also write the codes as int array (codebooks, frames) .npy")
    p.add_argument("--variations", type=int, default=1, metavar="N",
                   help="N takes of the prompt in one batched pass (1-16), each with its own seed "
                        "(--seed, --seed+1, ...), written as OUT-1.wav ... OUT-N.wav")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    check_writable_format(out)
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if args.save_tokens and not args.save_tokens.endswith(".npy"):
        raise UsageError("--save-tokens expects a file name ending in .npy")
    if args.sample_rate and not (8000 <= args.sample_rate <= 384000):
        raise UsageError(f"--sample-rate must be between 8000 and 384000, got {args.sample_rate}")
    if not 1 <= args.variations <= MAX_VARIATIONS:
        raise UsageError(f"--variations must be between 1 and {MAX_VARIATIONS}, got {args.variations}")
    outs = numbered(out, args.variations)
    tokens_out = numbered(Path(args.save_tokens), args.variations) if args.save_tokens else []
    for o in outs:
        if o.exists() and not args.overwrite:
            raise UsageError(f"{o} already exists; pass --overwrite to replace it")

    params = sampling_params(args)
    engine = load_engine(args)

    melody = None
    if args.melody:
        if melody_refusal(engine):
            raise UsageError(f"--melody: {melody_refusal(engine)}")
        from model.conditioning.melody import load_melody  # torch loads only where this runs

        melody = load_melody(args.melody, engine.chroma_frame_rate, seconds=args.seconds,
                             track=args.melody_track)
    seeds = variation_seeds(params.seed, args.variations)
    reqs = [GenerationRequest(prompt=args.prompt, seconds=args.seconds, params=replace(params, seed=sd),
                              melody=melody) for sd in seeds]
    with Progress("generating", parts=len(reqs)) as bar:
        codes_list = engine.generate_tokens(reqs, progress=bar)
    for i, codes in enumerate(codes_list):
        audio = engine.decode(codes)
        rate = engine.sample_rate
        if args.sample_rate and args.sample_rate != rate:
            audio, rate = resample(audio, rate, args.sample_rate), args.sample_rate
        if tokens_out:

            np.save(tokens_out[i], codes.astype(np.int64))
        write_audio(outs[i], audio, rate, overwrite=args.overwrite)
        seed = f", seed {seeds[i]}" if args.variations > 1 else ""
        print(f"wrote {outs[i]} ({audio.shape[1] / rate:.2f} s, {rate} Hz, {audio.shape[0]} ch{seed})")
    return 0



def numbered(path: Path, n: int) -> list[Path]:
    """`path` itself for one take; `stem-1.ext` ... `stem-n.ext` for n takes."""
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n + 1)]


def variation_seeds(seed: int | None, n: int) -> list[int | None]:
    """Each take its own seed: seed, seed+1, ...; with no seed, one drawn now for all of them
    (so the takes still differ from one another) - or None for a single take, as before."""
    if n == 1:
        return [seed]
    if seed is None:

        seed = secrets.randbelow(2**62)
    return [(seed + i) % 2**63 for i in range(n)]
