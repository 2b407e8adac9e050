"""Find a MusicGen checkpoint (a directory, a Hugging Face id, `auto`, or `tiny`) and load it
through `transformers`' `from_pretrained`.

The engine reads text checkpoints with its own reader (model/load/checkpoint.py), which needs no
`transformers` import; this loader serves melody checkpoints, GPUs, the tests' reference
models and MUSICBRIDGE_LOADER=transformers, for real and tiny checkpoints alike.
"""

from __future__ import annotations

import json
import logging
import os
from model.settings import current as settings
from dataclasses import dataclass
from pathlib import Path
from model.decode.patterns import PATTERNS

log = logging.getLogger(__name__)

KNOWN_IDS = (
    "facebook/musicgen-small",
    "facebook/musicgen-medium",
    "facebook/musicgen-large",
    "facebook/musicgen-melody",
    "facebook/musicgen-melody-large",
    "facebook/musicgen-stereo-small",
    "facebook/musicgen-stereo-medium",
    "facebook/musicgen-stereo-large",
    "facebook/musicgen-stereo-melody",
    "facebook/musicgen-stereo-melody-large",
)
TINY_NAMES = {"tiny": {}, "tiny-melody": {"melody": True}, "tiny-stereo": {"stereo": True}}

TINY_WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! No MusicGen weights were found, so musicbridge is running the OFFLINE TINY MODEL.\n"
    "!! Its weights are random: the audio will be noise-like texture, not music.\n"
    "!! To get real weights, on a machine with network access run once:\n"
    "!!     huggingface-cli download facebook/musicgen-small\n"
    "!! or pass --model /path/to/a/musicgen/checkpoint/directory\n" + "!" * 78
)


class ModelError(RuntimeError):
    """A model that cannot be found or loaded; the message says what to do."""


@dataclass(frozen=True)
class ResolvedModel:
    path: str  # local directory or hub id handed to from_pretrained
    label: str  # what logs and sidecars call it
    is_tiny: bool
    is_melody: bool
    local_only: bool


def _hf_cache_dir() -> Path:
    return settings().hf_hub_cache


def _cached_snapshot(repo_id: str) -> Path | None:
    root = _hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    ref = root / "refs" / "main"
    if ref.exists():
        snap = root / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    snaps = sorted((root / "snapshots").glob("*/config.json")) if root.exists() else []
    return snaps[-1].parent if snaps else None


def _is_melody_config(cfg_path: Path) -> bool:
    try:
        return "melody" in json.loads(cfg_path.read_text()).get("model_type", "")
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path} is not a readable JSON config: {e}") from e


def _check_dir(path: Path) -> None:
    if not path.is_dir():
        raise ModelError(f"model directory {path} does not exist")
    if not (path / "config.json").exists():
        raise ModelError(
            f"{path} is not a MusicGen checkpoint (no config.json); expected a directory written by "
            "save_pretrained or `musicbridge tiny-model`"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path} has a config.json but no weights (*.safetensors or *.bin)")


def _network_allowed() -> bool:
    return not settings().hf_offline


def resolve_model(spec: str) -> ResolvedModel:
    """Turn a `--model` value into something `from_pretrained` can load, or say why not."""
    if spec in TINY_NAMES:
        from model.load.tiny import cached_tiny_model  # torch loads only where this runs

        path = cached_tiny_model(**TINY_NAMES[spec])
        return ResolvedModel(str(path), spec, True, spec == "tiny-melody", True)
    if spec == "auto":
        for repo_id in KNOWN_IDS:
            snap = _cached_snapshot(repo_id)
            if snap is not None:
                return ResolvedModel(str(snap), repo_id, False, "melody" in repo_id, True)
        if _network_allowed():
            try:
                # the hub client loads only where a checkpoint is downloaded
                from huggingface_hub import snapshot_download

                snap = snapshot_download("facebook/musicgen-small", etag_timeout=5)
                return ResolvedModel(snap, "facebook/musicgen-small", False, False, True)
            except Exception as e:  # noqa: BLE001 - any failure here means "offline"
                log.info("could not download facebook/musicgen-small: %s", e)
        log.warning(TINY_WARNING)
        return resolve_model("tiny")
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") != 1:
        _check_dir(p)
        tiny = (p / "musicbridge_tiny.json").exists()
        return ResolvedModel(str(p.resolve()), str(p), tiny, _is_melody_config(p / "config.json"), True)
    if spec.count("/") == 1:
        snap = _cached_snapshot(spec)
        if snap is not None:
            return ResolvedModel(str(snap), spec, False, "melody" in spec, True)
        if not _network_allowed():
            raise ModelError(
                f"model {spec!r} is not in the local Hugging Face cache and the network is off; "
                "download it first or pass a checkpoint directory"
            )
        return ResolvedModel(spec, spec, False, "melody" in spec, False)
    raise ModelError(
        f"unknown model {spec!r}: expected a checkpoint directory, a Hugging Face id such as "
        "facebook/musicgen-small, 'auto', or one of " + ", ".join(TINY_NAMES)
    )


def load_hf_model(resolved: ResolvedModel, device: str = "cpu", dtype=None):
    """Load (model, tokenizer) through `from_pretrained`; raise ModelError on anything broken."""
    import torch  # torch loads only where this runs
    from transformers import AutoTokenizer  # transformers loads only where this runs

    try:
        if resolved.is_melody:
            # transformers loads only where this runs
            from transformers import MusicgenMelodyForConditionalGeneration as cls
        else:
            from transformers import MusicgenForConditionalGeneration as cls  # transformers loads only where this runs
        kw = {"local_files_only": resolved.local_only}
        model = cls.from_pretrained(resolved.path, dtype=dtype or torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path, **kw)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - report any loader failure in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load model from {resolved.path}: {first}") from e
    return model.to(device).eval(), tokenizer


def checkpoint_pattern(resolved: ResolvedModel) -> str:
    """The codebook pattern a checkpoint was trained with: its config's `codebooks_pattern`
    (audiocraft's name for it) where given, else `delay`, which every MusicGen checkpoint and
    `transformers`' own generate use."""

    cfg = Path(resolved.path) / "config.json"
    try:
        name = json.loads(cfg.read_text()).get("codebooks_pattern") if cfg.exists() else None
    except (OSError, ValueError):
        name = None
    if name is None:
        return "delay"
    if name not in PATTERNS:
        raise ModelError(f"{cfg}: codebooks_pattern {name!r} is not one of {', '.join(PATTERNS)}")
    return name
