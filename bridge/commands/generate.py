"""`musicbridge generate`: one-shot text (and melody) to music, written to a file."""

from __future__ import annotations

import argparse
from pathlib import Path

from bridge.commands.common import (ProgressBar, add_model_args, add_sampling_args, nonneg_int,
                                    request_seconds, sampling_params)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate one clip from a text prompt",
                       description="Generate music from a text prompt and write it to WAV or FLAC.")
    add_model_args(p)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from bridge.cli import UsageError
    from audiofile import check_writable_format, resample, write_audio

    out = Path(args.out)
    check_writable_format(out)
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if args.save_tokens and not args.save_tokens.endswith(".npy"):
        raise UsageError("--save-tokens expects a file name ending in .npy")
    if args.sample_rate and not (8000 <= args.sample_rate <= 384000):
        raise UsageError(f"--sample-rate must be between 8000 and 384000, got {args.sample_rate}")

    from model.engine import Engine
    from model.types import GenerationRequest

    params = sampling_params(args)
    engine = Engine.load(args.model, device=args.device, dtype=args.dtype)
    melody = None
    if args.melody:
        from model.types import melody_refusal

        if melody_refusal(engine):
            raise UsageError(f"--melody: {melody_refusal(engine)}")
        from model.melody import load_melody

        melody = load_melody(args.melody, engine.chroma_frame_rate, seconds=args.seconds,
                             track=args.melody_track)
    req = GenerationRequest(prompt=args.prompt, seconds=args.seconds, params=params, melody=melody)
    (codes,) = engine.generate_tokens([req], progress=ProgressBar("generating"))
    audio = engine.decode(codes)
    rate = engine.sample_rate
    if args.sample_rate and args.sample_rate != rate:
        audio, rate = resample(audio, rate, args.sample_rate), args.sample_rate
    if args.save_tokens:
        import numpy as np

        np.save(args.save_tokens, codes.astype(np.int64))
    write_audio(out, audio, rate, overwrite=args.overwrite)
    print(f"wrote {out} ({audio.shape[1] / rate:.2f} s, {rate} Hz, {audio.shape[0]} ch)")
    return 0
