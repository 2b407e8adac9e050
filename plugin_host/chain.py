"""Effect chains: preset chain entries to a Pedalboard, and block-wise processing.

A chain entry is a plain dict from a preset or session file, e.g.
``{"plugin": "Reverb", "room_size": 0.4}`` for a built-in Pedalboard plugin, or
``{"plugin": "vst3", "path": "/path/Plug.vst3", "params": {"mix": 0.5}}`` for a VST3.
Entries are validated here so that a typo fails when the preset loads, not mid-render.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pedalboard

# Containers, base classes and plugins that need a file or coefficients, not a parameter list.
_NOT_BUILTIN = {"Plugin", "PluginContainer", "Pedalboard", "Chain", "Mix", "ExternalPlugin",
                "VST3Plugin", "AudioUnitPlugin", "IIRFilter", "Convolution"}


class ChainError(ValueError):
    """A chain entry that cannot be built; the message names the entry, the key and what is expected."""


def builtin_plugins() -> dict[str, type]:
    """Built-in Pedalboard plugins usable by class name, e.g. {"Reverb": pedalboard.Reverb}."""

    out = {}
    for name in dir(pedalboard):
        cls = getattr(pedalboard, name)
        if (isinstance(cls, type) and issubclass(cls, pedalboard.Plugin) and not name.startswith("_")
                and name not in _NOT_BUILTIN):
            out[name] = cls
    return out


def plugin_parameters(cls: type) -> list[str]:
    """Names of the settable parameters of a built-in plugin class."""
    return sorted(k for k, v in vars(cls).items() if isinstance(v, property) and v.fset is not None
                  and not k.startswith("_"))


def build_chain(specs: Sequence[Mapping[str, Any]], where: str = "chain") -> "pedalboard.Pedalboard":  # noqa: F821
    """A Pedalboard from chain entries; ChainError names `where[index].key` on any mistake."""

    if isinstance(specs, (str, bytes)) or not isinstance(specs, Sequence):
        raise ChainError(f"{where}: expected a list of plugin entries, got {type(specs).__name__}")
    plugins = []
    for i, spec in enumerate(specs):
        at = f"{where}[{i}]"
        if not isinstance(spec, Mapping):
            raise ChainError(f"{at}: expected a table like {{plugin = \"Reverb\", room_size = 0.4}}, "
                             f"got {type(spec).__name__}")
        kind = spec.get("plugin")
        if not isinstance(kind, str) or not kind:
            raise ChainError(f"{at}.plugin: expected a plugin name (e.g. \"Reverb\") or \"vst3\"")
        if kind.lower() == "vst3":
            plugins.append(_load_vst3(spec, at))
        else:
            plugins.append(_builtin(kind, spec, at))
    return pedalboard.Pedalboard(plugins)


def _builtin(kind: str, spec: Mapping[str, Any], at: str):
    known = builtin_plugins()
    cls = known.get(kind)
    if cls is None:
        raise ChainError(f"{at}.plugin: unknown plugin {kind!r}; expected \"vst3\" or one of "
                         f"{', '.join(sorted(known))}")
    params = plugin_parameters(cls)
    plugin = cls()
    for key, value in spec.items():
        if key == "plugin":
            continue
        if key not in params:
            raise ChainError(f"{at}.{key}: {kind} has no parameter {key!r}; expected one of "
                             f"{', '.join(params) or '(none)'}")
        _set_param(plugin, kind, key, value, f"{at}.{key}")
    return plugin


def _set_param(plugin, kind: str, key: str, value: Any, at: str) -> None:
    current = getattr(plugin, key)
    enum_type = type(current)
    if hasattr(enum_type, "__members__") and not isinstance(current, (bool, int, float)):
        members = enum_type.__members__
        if not isinstance(value, str) or value not in members:
            raise ChainError(f"{at}: expected one of {', '.join(members)}, got {value!r}")
        value = members[value]
    elif isinstance(current, bool):
        if not isinstance(value, bool):
            raise ChainError(f"{at}: expected true or false, got {value!r}")
    elif isinstance(current, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ChainError(f"{at}: expected a finite number, got {value!r}")
        if isinstance(current, int) and not isinstance(current, bool) and not float(value).is_integer():
            raise ChainError(f"{at}: expected a whole number, got {value!r}")
        value = type(current)(value)
    try:
        setattr(plugin, key, value)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ChainError(f"{at}: {kind} rejected {value!r} ({e})") from None


def _load_vst3(spec: Mapping[str, Any], at: str):
    unknown = set(spec) - {"plugin", "path", "params", "name"}
    if unknown:
        raise ChainError(f"{at}.{sorted(unknown)[0]}: unknown key for a vst3 entry; expected "
                         "path, params and optionally name")
    path = spec.get("path")
    if not isinstance(path, str) or not path:
        raise ChainError(f"{at}.path: expected the path of a .vst3 plugin bundle")
    full = Path(os.path.expanduser(path))
    if not full.exists():
        raise ChainError(f"{at}.path: VST3 plugin {full} does not exist")
    params = spec.get("params", {})
    if not isinstance(params, Mapping):
        raise ChainError(f"{at}.params: expected a table of parameter values")
    name = spec.get("name")
    if name is not None and not isinstance(name, str):
        raise ChainError(f"{at}.name: expected the plugin name inside a multi-plugin bundle")
    if not hasattr(pedalboard, "load_plugin"):
        raise ChainError(f"{at}: this pedalboard build cannot load VST3 plugins")
    try:
        return pedalboard.load_plugin(str(full), parameter_values=dict(params), plugin_name=name)
    except (ImportError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise ChainError(f"{at}: cannot load VST3 {full} ({e})") from None


def process_chunks(chain, audio: np.ndarray, sample_rate: int, block: int = 8192) -> np.ndarray:
    """Run float32 (channels, samples) through `chain` block by block, keeping state between blocks.

    The first block resets the chain (no state from an earlier use leaks in); later blocks
    continue its reverb tails and filter states, exactly as a live stream would. The output
    has the input's shape, so stems stay sample-exact.
    """
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (channels, samples), got shape {audio.shape}")
    if block <= 0:
        raise ValueError(f"block must be a positive number of samples, got {block}")
    out = np.empty_like(audio)
    for start in range(0, audio.shape[1], block):
        piece = audio[:, start:start + block]
        y = chain(piece, sample_rate, buffer_size=block, reset=start == 0)
        out[:, start:start + piece.shape[1]] = _fit(np.asarray(y, dtype=np.float32), piece.shape)
    return out


def _fit(y: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Match a plugin's output to the input block's shape (mono plugins, channel changes)."""
    if y.ndim == 1:
        y = y[None, :]
    if y.shape[0] != shape[0]:
        y = np.repeat(y[:1], shape[0], axis=0) if y.shape[0] == 1 else y[:shape[0]]
    if y.shape[1] < shape[1]:
        y = np.pad(y, ((0, 0), (0, shape[1] - y.shape[1])))
    return y[:, :shape[1]]
