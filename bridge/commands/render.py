"""`musicbridge render`: every track of a session file to stems, or one stem again from its sidecar."""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from bridge.commands.common import UsageError, add_engine_args, add_model_args, load_engine
from bridge.commands.progress import Progress
from bridge.state.session_file import load_session
from bridge.stems.output import checkpoint_fingerprint, read_sidecar


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "render", help="render a session file's tracks to stems",
        description="Render every track of a session TOML to tempo-locked WAV/FLAC stems with "
                    "sidecar JSON, batching tracks on the engine; or, with --from-sidecar, "
                    "regenerate one stem exactly from its sidecar.")
    p.add_argument("session", nargs="?", help="session .toml file (see docs/stems.md)")
    p.add_argument("--out", help="output folder (default: <session>-stems beside the session file; "
                                 "with --from-sidecar, the sidecar's folder)")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--loop", action="store_true",
                   help="make every track given in bars a seamless loop")
    p.add_argument("--format", choices=["wav", "flac"], help="override the session's stem format")
    p.add_argument("--sample-rate", type=int, help="override the session's stem rate (Hz)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="tracks per engine call (default 8: a 3-track session is one call)")
    p.add_argument("--from-sidecar", metavar="JSON",
                   help="regenerate the stem a sidecar describes (same model, same audio)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.from_sidecar:
        if args.session:
            raise UsageError("give either a session file or --from-sidecar, not both")
        return _regenerate(args)
    if not args.session:
        raise UsageError("expected a session .toml file (or --from-sidecar FILE.json)")
    return _render(args)


def _load_engine(args: argparse.Namespace, spec: str | None, recorded: dict | None = None):
    """The engine to use; for a regeneration, the recorded checkpoint, dtype and device by default
    (bit-exact audio needs the same weights, precision and machine)."""
    model = args.model if args.model != "auto" or not spec else spec
    device, dtype = args.device, args.dtype
    if recorded:
        if dtype == "auto" and recorded.get("dtype"):
            dtype = recorded["dtype"]
        if device == "auto" and recorded.get("device") == "cpu":
            device = "cpu"
    pattern = args.pattern or (recorded or {}).get("pattern")
    return load_engine(args, model=model, device=device, dtype=dtype, pattern=pattern)


def _render(args: argparse.Namespace) -> int:
    # torch loads only where this runs
    from bridge.stems.render import (TrackBars, check_melodies, check_out_target, prepare_out_dir, render_session,
                                     write_json_atomic)

    session = load_session(args.session)
    if args.format or args.sample_rate is not None:
        if args.sample_rate is not None and not 8000 <= args.sample_rate <= 192000:
            raise UsageError(f"--sample-rate must be between 8000 and 192000, got {args.sample_rate}")
        session = replace(session, format=args.format or session.format,
                          sample_rate=session.sample_rate if args.sample_rate is None else args.sample_rate)
    target = check_out_target(args.out or session.path.with_name(session.path.stem + "-stems"))
    engine = _load_engine(args, session.model)
    check_melodies(session, engine)
    out = prepare_out_dir(target)
    t0 = time.monotonic()
    bars = TrackBars([t.name for t in session.tracks])
    results = render_session(session, engine, out, loop=True if args.loop else None,
                             batch_size=args.batch_size, progress=bars)
    summary = {
        "session": str(session.path), "session_sha256": session.sha256, "model": engine.info.label,
        "tempo": session.tempo, "time_signature": str(session.signature),
        "sample_rate": session.sample_rate, "format": session.format,
        "wall_seconds": round(time.monotonic() - t0, 3),
        "tracks": [{"name": r.name, "stem": r.path.name, "sidecar": r.path.with_suffix(".json").name,
                    "seconds": r.seconds, **({"grid": r.report["grid"]} if "grid" in r.report else {})}
                   for r in results],
    }
    served = getattr(engine, "served_by", None)  # a remote engine: which replica, on which node, made each take
    if served is not None:
        summary["engine"] = {"url": engine.url, "retried": engine.retried, "served_by": [s.to_json() for s in served]}
    path = write_json_atomic(out, session.path.stem + ".render", summary)
    for r in results:
        print(f"wrote {r.path} ({r.seconds:.3f} s)")
    print(f"wrote {path}")
    return 0


def _regenerate(args: argparse.Namespace) -> int:
    from bridge.stems.render import check_out_target, prepare_out_dir, regenerate  # torch loads only where this runs

    sc = read_sidecar(args.from_sidecar)
    target = check_out_target(args.out or Path(args.from_sidecar).resolve().parent)
    engine = _load_engine(args, sc["model"].get("path"), sc["model"])
    recorded = sc["model"].get("checkpoint_sha256")
    if recorded and checkpoint_fingerprint(engine.info.path).get("checkpoint_sha256") != recorded:
        print(f"warning: {engine.info.label} is not the checkpoint the stem was made with "
              f"({sc['model'].get('label')}); the audio will differ", file=sys.stderr)

    with Progress("regenerating", parts=len(sc["batch"]["requests"])) as bar:
        path, same = regenerate(args.from_sidecar, engine, prepare_out_dir(target), progress=bar)
    print(f"wrote {path} ({'identical to' if same else 'DIFFERENT from'} the recorded audio)")
    return 0 if same else 1
