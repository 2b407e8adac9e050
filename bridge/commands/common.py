"""Flags and checks shared by the commands that load a model or sample tokens."""

from __future__ import annotations

import argparse
import math
import os

from bridge.commands.progress import timed
from model.memory.heap import loading
from model.remote.client import RemoteEngine, RemoteError
from model.types import MAX_REQUEST_SECONDS, SAMPLING_RANGES, SamplingParams


class UsageError(Exception):
    """A user mistake: bad flag value, missing file, unknown model."""


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def request_seconds(text: str) -> float:
    """A length of music one engine request can make: (0, model.types.MAX_REQUEST_SECONDS]."""

    v = positive_float(text)
    if v > MAX_REQUEST_SECONDS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_REQUEST_SECONDS:g} seconds (one request), "
                                         f"got {text!r}")
    return v


def sampling_value(key: str):
    """An argparse type for one sampling parameter, in the range model.types.SAMPLING_RANGES gives it."""

    r = SAMPLING_RANGES[key]
    whole = key in ("top_k", "seed")

    def parse(text: str) -> float | int:
        try:
            v = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {'whole ' if whole else ''}number, got {text!r}") from None
        if v not in r:
            raise argparse.ArgumentTypeError(f"expected a number in {r}, got {text!r}")
        return v

    parse.__name__ = key  # argparse names the type in its messages
    return parse


def nonneg_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return v


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="auto",
                   help="checkpoint directory, Hugging Face id, 'auto' (best local checkpoint, "
                        "else download musicgen-small, else the tiny model) or 'tiny'")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16", "int8", "int4"],
                   help="weights precision for the decoder (auto: the fastest within the quality "
                        "bound, measured on this machine once and cached)")
    p.add_argument("--pattern", default=None,
                   choices=["delay", "parallel", "flatten", "coarse_first"],
                   help="codebook interleaving pattern (default: the checkpoint's own, 'delay' for "
                        "MusicGen checkpoints; others decode in a layout the model was not trained on)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--engine URL: decode on a remote engine (`musicbridge worker`, docs/remote.md) instead of here."""
    p.add_argument("--engine", metavar="URL", default=None,
                   help="use the remote engine `musicbridge worker` serves at http[s]://HOST:PORT; --model then "
                        "names this machine's copy of its checkpoint, for the codec (default: the one it reports)")
    add_engine_access_args(p)


def add_engine_access_args(p: argparse.ArgumentParser) -> None:
    """The key and the certificate to trust, for any command that talks to a remote engine."""
    p.add_argument("--engine-key", metavar="KEY", default=os.environ.get("MUSICBRIDGE_ENGINE_KEY"),
                   help="the worker's key (default $MUSICBRIDGE_ENGINE_KEY, which keeps it out of the process list)")
    p.add_argument("--engine-ca", metavar="PEM", default=None,
                   help="trust this certificate (authority) for an https:// engine with its own certificate")


def load_engine(args: argparse.Namespace, model: str | None = None, dtype: str | None = None,
                device: str | None = None, pattern: str | None = None, long_running: bool = False):
    """`model.engine.Engine.load` with the command's model flags (each overridable), torch's
    import included, inside `model.memory.heap.loading` (no collector passes over what loading makes;
    `long_running`: collect once before the freeze). With --engine URL: the remote engine there
    (`model.remote.client.RemoteEngine`, a context manager), its device and precision the worker's."""

    if getattr(args, "engine", None):
        with loading(collect=long_running):
            try:
                return RemoteEngine.connect(args.engine, args.engine_key, model or args.model, ca_file=args.engine_ca)
            except RemoteError as e:
                raise UsageError(str(e)) from None
    spec, dev, dt = model or args.model, device or args.device, dtype or args.dtype
    with timed(f"loading {spec}", f"load {spec} {dev} {dt}"), loading(collect=long_running):
        from model.engine import Engine  # torch loads only where this runs

        return Engine.load(spec, device=dev, dtype=dt, pattern=pattern or args.pattern)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=sampling_value("seed"), default=None, help="seed for reproducible sampling")
    p.add_argument("--greedy", action="store_true", help="argmax decoding (no sampling)")
    p.add_argument("--guidance", type=sampling_value("guidance"), default=3.0,
                   help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=sampling_value("temperature"), default=1.0)
    p.add_argument("--top-k", type=sampling_value("top_k"), default=250, help="0 = off")
    p.add_argument("--top-p", type=sampling_value("top_p"), default=0.0, help="0 = off")


def sampling_params(args: argparse.Namespace):
    return SamplingParams.from_dict({k: getattr(args, k) for k in SamplingParams.__dataclass_fields__})
