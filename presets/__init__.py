"""Presets: a named prompt, generation params and effect chain, stored as TOML.

Shipped presets live beside this file; a user folder ($MUSICBRIDGE_PRESETS, else
~/.config/musicbridge/presets) adds more and overrides shipped ones of the same name.
One schema, validated on load, so a mistake names the file, the key and what is expected::

    description = "dusty boom-bap drums"
    prompt = "lofi hip hop drum loop, dusty vinyl, swung hats"
    add_bpm = true                  # append "<bpm> bpm" to the prompt when a tempo is known

    [params]                        # any of guidance, temperature, top_k, top_p, greedy, seed
    guidance = 3.0
    top_k = 250

    [[chain]]                       # Pedalboard plugins, in order (see plugin_host.chain)
    plugin = "LowpassFilter"
    cutoff_frequency_hz = 9000
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.types import RequestError, SamplingParams
from plugin_host.chain import ChainError, build_chain

SHIPPED_DIR = Path(__file__).resolve().parent
MAX_NAME = 64
# The one preset-name rule (bridge.state.rules uses it for OSC and session.json); matched whole with
# fullmatch: `^...$` lets a trailing newline through.
NAME_RE = re.compile(f"[A-Za-z0-9_-]{{1,{MAX_NAME}}}")
TOP_LEVEL_KEYS = ("description", "prompt", "add_bpm", "params", "chain")
PARAM_TYPES: dict[str, tuple[type, ...]] = {
    "guidance": (int, float), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
    "greedy": (bool,), "seed": (int,),
}


class PresetError(ValueError):
    """A preset that is missing or malformed; the message names the file, the key and what is expected."""


@dataclass(frozen=True)
class Preset:
    """A validated preset. `params` holds only the keys the file sets; treat it as read-only."""

    name: str
    prompt: str
    params: Mapping[str, Any] = field(default_factory=dict)
    chain: tuple[Mapping[str, Any], ...] = ()
    add_bpm: bool = True
    description: str = ""
    source: Path | None = None

    def prompt_for(self, bpm: float | None = None) -> str:
        """The prompt, with "<bpm> bpm" appended when the preset asks for it and a tempo is known."""
        return prompt_with_bpm(self.prompt, bpm, self.add_bpm)

    def sampling_params(self, **overrides: Any):
        """model.types.SamplingParams from this preset's params, with `overrides` on top."""

        return SamplingParams.from_dict({**self.params, **{k: v for k, v in overrides.items() if v is not None}})

    def build_chain(self):
        """A fresh pedalboard.Pedalboard for this preset's chain (one per track: chains hold state)."""

        return build_chain(list(self.chain), where=f"{self.source or self.name}: chain")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a sidecar JSON or an OSC status reply."""
        return {"name": self.name, "prompt": self.prompt, "params": dict(self.params),
                "chain": [dict(c) for c in self.chain], "add_bpm": self.add_bpm,
                "description": self.description, "source": str(self.source) if self.source else None}


def fmt_bpm(bpm: float) -> str:
    """120.0 -> "120", 97.5 -> "97.5"."""
    return str(int(bpm)) if float(bpm).is_integer() else f"{bpm:g}"


def prompt_with_bpm(prompt: str, bpm: float | None, add_bpm: bool = True) -> str:
    """The one prompt builder: "<prompt>, <bpm> bpm" when add_bpm and a tempo is known, else the prompt.

    OSC jobs, session renders and jams all build their prompt here, so the same track asks the
    model for the same text whichever way it is made.
    """
    if bpm is None or not add_bpm:
        return prompt
    return f"{prompt}, {fmt_bpm(bpm)} bpm"


def user_dir() -> Path:
    """Where user presets live: $MUSICBRIDGE_PRESETS, else $XDG_CONFIG_HOME or ~/.config /musicbridge/presets."""
    env = os.environ.get("MUSICBRIDGE_PRESETS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "musicbridge" / "presets"


def preset_files() -> dict[str, Path]:
    """Every preset name and the file it loads from; user files override shipped ones by name."""
    found: dict[str, Path] = {}
    for folder in (SHIPPED_DIR, user_dir()):
        if folder.is_dir():
            for p in sorted(folder.glob("*.toml")):
                if NAME_RE.fullmatch(p.stem):
                    found[p.stem] = p
    return dict(sorted(found.items()))


def list_presets() -> list[Preset]:
    """All presets, loaded and validated, sorted by name (the first bad one raises PresetError)."""
    return [load_preset_file(p) for p in preset_files().values()]


def load_preset(name: str) -> Preset:
    """A preset by name (user folder first, then shipped), or from a .toml path."""
    if not isinstance(name, str) or not name:
        raise PresetError("preset name must be non-empty text")
    if name.endswith(".toml") or os.sep in name or "/" in name:
        return load_preset_file(Path(name).expanduser())
    files = preset_files()
    if name not in files:
        raise PresetError(f"unknown preset {name!r}; expected one of {', '.join(files) or '(none)'} "
                          f"(shipped in {SHIPPED_DIR}, user presets in {user_dir()})")
    return load_preset_file(files[name])


def load_preset_file(path: str | os.PathLike) -> Preset:
    """Parse and validate one preset file."""
    p = Path(path)
    if not p.is_file():
        raise PresetError(f"preset file {p} does not exist")
    if not NAME_RE.fullmatch(p.stem):
        raise PresetError(f"{p}: preset file names must match [A-Za-z0-9_-]{{1,64}}.toml")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise PresetError(f"{p}: not UTF-8 text ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise PresetError(f"{p}: invalid TOML: {e}") from None
    return preset_from_dict(data, name=p.stem, source=p)


def preset_from_dict(data: Mapping[str, Any], name: str, source: Path | None = None) -> Preset:
    """Validate a parsed preset table (also used for presets written inline in session files)."""
    where = str(source) if source else f"preset {name}"
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise PresetError(f"{where}: unknown key {key!r}; expected {', '.join(TOP_LEVEL_KEYS)}")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise PresetError(f"{where}: key 'prompt': expected non-empty text describing the music")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise PresetError(f"{where}: key 'description': expected text")
    add_bpm = data.get("add_bpm", True)
    if not isinstance(add_bpm, bool):
        raise PresetError(f"{where}: key 'add_bpm': expected true or false, got {add_bpm!r}")
    params = check_params(data.get("params", {}), where)
    chain = data.get("chain", [])
    if not isinstance(chain, list) or not all(isinstance(c, Mapping) for c in chain):
        raise PresetError(f"{where}: key 'chain': expected an array of tables ([[chain]] entries)")

    try:
        build_chain(chain, where="chain")
    except ChainError as e:
        key, _, msg = str(e).partition(": ")
        raise PresetError(f"{where}: key '{key}': {msg}") from None
    return Preset(name=name, prompt=prompt.strip(), params=params,
                  chain=tuple(dict(c) for c in chain), add_bpm=add_bpm,
                  description=description.strip(), source=source)


def check_params(params: Any, where: str) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise PresetError(f"{where}: key 'params': expected a table like [params] guidance = 3.0")
    out: dict[str, Any] = {}
    for key, value in params.items():
        at = f"{where}: key 'params.{key}'"
        if key not in PARAM_TYPES:
            raise PresetError(f"{at}: unknown parameter; expected one of {', '.join(PARAM_TYPES)}")
        types = PARAM_TYPES[key]
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            kind = {"greedy": "true or false", "top_k": "a whole number", "seed": "a whole number"}
            raise PresetError(f"{at}: expected {kind.get(key, 'a number')}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PresetError(f"{at}: expected a finite number, got {value!r}")
        out[key] = float(value) if float in types and not isinstance(value, bool) else value

    try:
        SamplingParams.from_dict(out)
    except RequestError as e:
        raise PresetError(f"{where}: key 'params': {e}") from None
    return out
