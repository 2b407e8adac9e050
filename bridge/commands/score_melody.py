"""`musicbridge score-melody REF GENERATED`: how well a generated stem follows a melody."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score-melody", help="chroma cosine similarity of a generated stem to a melody",
                       description="MusicGen's melody metric: mean cosine similarity between the "
                       "quantised chroma of the reference (.mid, audio or .npy) and of the generated audio.")
    p.add_argument("reference", help="the melody: .mid, .wav/.flac or chroma .npy")
    p.add_argument("generated", help="the generated audio (.wav/.flac) or its chroma .npy")
    p.add_argument("--track", default=None, help="MIDI track of the reference")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from model.conditioning.chroma import FRAME_RATE  # torch loads only where this runs
    from model.conditioning.melody import chroma_cosine_similarity, load_melody  # torch loads only where this runs

    ref = load_melody(args.reference, FRAME_RATE, track=args.track)
    gen = load_melody(args.generated, FRAME_RATE)
    score = chroma_cosine_similarity(ref, gen)
    print(f"chroma cosine similarity: {score:.4f} over {min(len(ref), len(gen))} frames")
    return 0
