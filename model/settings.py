"""The engine's settings from the environment, read in one place and held as one frozen record.

The command line applies `Settings.from_env()` around each command (`applied`); code in model/
asks `current()`. Outside a command (a library user, a test), `current()` reads the environment
at that call, so a setting changed between calls is seen.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

_OFF = ("0", "off", "false", "no")


@dataclass(frozen=True)
class Settings:
    kernels: str = "1"             # MUSICBRIDGE_KERNELS: "1" our C kernels, "0" PyTorch's, "float" widening int8
    march: str = "native"          # MUSICBRIDGE_MARCH: the -march the C kernels are built for
    compiler: tuple[str, ...] = ()  # CC (with its flags, as make's), else gcc or cc on PATH
    cross_fold: bool = True        # MUSICBRIDGE_CROSS_FOLD=0 keeps cross-attention's projections (A/B)
    prefill: str = ""              # MUSICBRIDGE_PREFILL: "float32" or "bfloat16" forces the prefill's dtype
    cuda_graphs: bool = True       # MUSICBRIDGE_CUDA_GRAPHS=0 runs the GPU step eagerly
    loader: str = ""               # MUSICBRIDGE_LOADER=transformers loads through `transformers`
    weight_cache: str = ""         # MUSICBRIDGE_WEIGHT_CACHE: "" / on, off, or a folder
    cache_dir: Path = Path.home() / ".cache" / "musicbridge"  # MUSICBRIDGE_CACHE, else $XDG_CACHE_HOME/musicbridge
    hf_hub_cache: Path = Path.home() / ".cache" / "huggingface" / "hub"  # HF_HUB_CACHE, else $HF_HOME/hub
    hf_offline: bool = False       # HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        def flag(name: str) -> bool:
            return env.get(name, "1").strip().lower() not in _OFF

        def offline(name: str) -> bool:
            return env.get(name, "0") not in ("0", "", "false")

        xdg = env.get("XDG_CACHE_HOME")
        cache = Path(env["MUSICBRIDGE_CACHE"]) if env.get("MUSICBRIDGE_CACHE") else \
            (Path(xdg) if xdg else Path.home() / ".cache") / "musicbridge"
        hub = Path(env["HF_HUB_CACHE"]) if env.get("HF_HUB_CACHE") else \
            Path(env.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        return cls(kernels=env.get("MUSICBRIDGE_KERNELS", "1").strip() or "1",
                   march=env.get("MUSICBRIDGE_MARCH", "").strip() or "native",
                   compiler=tuple(shlex.split(env.get("CC", ""))),
                   cross_fold=flag("MUSICBRIDGE_CROSS_FOLD"),
                   prefill=env.get("MUSICBRIDGE_PREFILL", "").strip(),
                   cuda_graphs=flag("MUSICBRIDGE_CUDA_GRAPHS"),
                   loader=env.get("MUSICBRIDGE_LOADER", "").strip(),
                   weight_cache=env.get("MUSICBRIDGE_WEIGHT_CACHE", "").strip(),
                   cache_dir=cache, hf_hub_cache=hub,
                   hf_offline=offline("HF_HUB_OFFLINE") or offline("TRANSFORMERS_OFFLINE"))


_applied: Settings | None = None


def current() -> Settings:
    """The settings of the running command, else the environment's now."""
    return _applied if _applied is not None else Settings.from_env()


@contextlib.contextmanager
def applied(settings: Settings) -> Iterator[Settings]:
    """`settings` for everything in model/ until the block ends (the command line's edge)."""
    global _applied
    before, _applied = _applied, settings
    try:
        yield settings
    finally:
        _applied = before
