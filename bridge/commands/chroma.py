"""`musicbridge chroma`: the one-hot conditioning chroma of a MIDI file or a take, as .npy."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from bridge.commands.common import UsageError, positive_float


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chroma", help="write the melody chroma used for conditioning (.npy)",
                       description="Compute MusicGen-Melody's conditioning chroma (frames x 12, "
                       "float32, 7.8125 frames a second) from a MIDI file or a recorded take.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--midi", help=".mid file")
    src.add_argument("--audio", help=".wav/.flac take")
    p.add_argument("--track", default=None, help="MIDI track name or index (default: first with notes)")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--seconds", type=positive_float, default=None, help="pad or cut to this length")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.conditioning.chroma import FRAME_RATE  # torch loads only where this runs
    from model.conditioning.melody import load_melody  # torch loads only where this runs

    out = Path(args.out)
    if out.suffix != ".npy":
        raise UsageError("--out expects a file name ending in .npy")
    if not out.parent.is_dir():
        raise UsageError(f"output folder {out.parent} does not exist")
    if args.track is not None and not args.midi:
        raise UsageError("--track applies to --midi only")
    chroma = load_melody(args.midi or args.audio, FRAME_RATE, seconds=args.seconds, track=args.track)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=".npy", dir=out.parent)
    with os.fdopen(fd, "wb") as f:
        np.save(f, chroma.astype(np.float32))
    os.replace(tmp, out)
    voiced = int((chroma.max(axis=1) > 0).sum())
    print(f"wrote {out}: {chroma.shape[0]} frames ({chroma.shape[0] / FRAME_RATE:.2f} s), {voiced} with a note")
    return 0
