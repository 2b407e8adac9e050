"""`musicbridge tiny-model DIR`: write the offline tiny checkpoint."""

from __future__ import annotations

import argparse

from bridge.commands.common import UsageError
from bridge.commands.progress import timed


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tiny-model",
        help="write a tiny random-weight MusicGen checkpoint (for tests and offline use)",
        description="Write a tiny random-weight MusicGen checkpoint in Hugging Face format. "
        "The same command always writes the same weights.",
    )
    p.add_argument("dir", help="output directory (must not exist or be empty)")
    p.add_argument("--melody", action="store_true", help="a MusicGen-Melody checkpoint")
    p.add_argument("--stereo", action="store_true", help="a stereo checkpoint (8 codebooks)")
    p.add_argument("--arch", default="tiny", choices=["tiny", "musicgen-small"],
                   help="tiny shapes (default), or musicgen-small's real shapes with random weights "
                        "(about 2.4 GB; for benchmarks: costs what the real model costs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.load.tiny import write_tiny_model  # torch loads only where this runs

    if args.arch != "tiny":
        from model.bench.compare import write_random_model  # torch and transformers load only where this runs

        if args.melody or args.stereo:
            raise UsageError("--melody/--stereo apply to --arch tiny only")
        with timed(f"writing a {args.arch}-shaped checkpoint", f"tiny-model {args.arch}"):
            out = write_random_model(args.arch, args.dir)
        print(f"wrote {args.arch}-shaped checkpoint with random weights to {out}")
        return 0

    with timed("writing the tiny checkpoint", f"tiny-model tiny {args.melody} {args.stereo}"):
        out = write_tiny_model(args.dir, melody=args.melody, stereo=args.stereo)
    kind = "melody" if args.melody else "text"
    print(f"wrote tiny {kind}{' stereo' if args.stereo else ''} checkpoint to {out}")
    return 0
