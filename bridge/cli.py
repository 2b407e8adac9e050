"""`musicbridge` command line: one module per subcommand under `bridge/commands/`.

Each command module defines `add_parser(subparsers)`, which registers its parser and sets
`func`. User mistakes raise `UsageError` (or a domain error listed in `USER_ERRORS`) and
end as one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import os
import sys
import threading
from typing import NoReturn

from bridge.commands.common import UsageError
from model.kernels import openmp_env
from model.load.resolve import ModelError
from model.settings import Settings, applied
from model.types import RequestError

# Order is the order `musicbridge --help` lists them.
COMMAND_MODULES = (
    "generate",
    "tiny_model",
    "chroma",
    "score_melody",
    "serve",
    "send",
    "devices",
    "presets",
    "render",
    "bench",
    "worker",
)


def _user_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = [UsageError, ModelError, RequestError, FileNotFoundError,
                                       FileExistsError, PermissionError, IsADirectoryError]
    for mod, name in (("audiofile", "AudioFileError"), ("model.conditioning.melody", "MelodyError"), ("presets", "PresetError"),
                      ("bridge.state.session_file", "SessionFileError"), ("bridge.stems.output", "SidecarError"),
                      ("bridge.stems.request", "StemRequestError"), ("model.remote.client", "RemoteError"),
                      ("model.remote.client", "RemoteJobFailed")):
        try:
            errs.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="musicbridge",
        description="Run MusicGen beside a DAW: OSC control, live streams, tempo-locked stems.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"bridge.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"bridge.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
    )
    _quiet_transformers(args.verbose)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    user_errors = _user_errors()
    try:
        with applied(Settings.from_env()):  # the environment, read once for the whole command
            return int(args.func(args) or 0)
    except user_errors as e:
        msg = str(e) or type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        print(f"musicbridge {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"musicbridge {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_transformers(verbose: bool) -> None:
    """Their load-time progress bars and config notes are noise in a CLI and a daemon log. Set
    through the environment, read when (and if) they are imported: importing them to say so
    took 0.7 s of every command."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def run() -> NoReturn:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    openmp_env.apply()  # before anything loads torch, and so libgomp
    end(main())


def end(code: int) -> NoReturn:
    """Leave the process once the command has finished its work, without the interpreter's
    teardown: with torch loaded, freeing every module's objects one by one took 0.6 s after a
    `generate` had written its file. What an exit must do still happens, in the order Python
    does it: the atexit handlers (logging's flush and close, multiprocessing's joins, weakref
    finalizers), then stdout and stderr are flushed; first, as Python does, it waits for every
    non-daemon thread (one may be writing the converted weights' cache, model/memory/weight_cache.py)."""
    main_thread = threading.main_thread()
    try:
        for t in threading.enumerate():
            if t is not main_thread and not t.daemon:
                t.join()
    except KeyboardInterrupt:  # a second Ctrl-C while waiting: leave now, as Python's exit would
        code = 130
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or a closed stream: nothing to keep
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
