"""From the model's audio to a stem on disk: bar-grid fit, chain, loop, and the one sidecar schema.

Every stem, from an OSC job or a session render, goes through finish_audio and write_planned_stem,
so every stem is fitted to the grid the same way, carries the same BWF time reference and the
same sidecar (kind "musicbridge.stem"), and `musicbridge render --from-sidecar` can make any of
them again. The sidecar records the whole engine batch the stem came from: batched requests
share one engine call, and repeating that call is what reproduces the audio bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from bridge.stems.plan import StemPlan
from plugin_host.chain import build_chain, process_chunks
from plugin_host.stems import audio_sha256, write_stem
from plugin_host.tempo import exact_length, make_loop, stretch_to_tempo

SIDECAR_KIND = "musicbridge.stem"


class SidecarError(ValueError):
    """A sidecar that cannot regenerate its stem; the message names the file and the key."""


def musicbridge_version() -> str:
    try:
        return version("musicbridge")
    except Exception:  # noqa: BLE001 - not installed as a distribution: running from source
        return "source"


def checkpoint_fingerprint(path: str) -> dict[str, Any]:
    """Identify the weights a stem came from without reading gigabytes.

    A Hugging Face cache snapshot is named by its commit (the revision). Any local folder also
    gets a sha256 over file names and sizes, small files whole, and the first and last MiB of
    large ones (safetensors headers and tails differ between checkpoints).
    """
    p = Path(path)
    out: dict[str, Any] = {"path": str(path)}
    if p.parent.name == "snapshots":
        out["revision"] = p.name
    if not p.is_dir():
        return out
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(p)}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= 2 << 20:
                h.update(fh.read())
            else:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    out["checkpoint_sha256"] = h.hexdigest()
    return out


def engine_record(engine) -> dict[str, Any]:
    """The model, precision and software a stem was made with (regeneration loads the same)."""
    import torch  # torch loads only where this runs

    info = engine.info
    rec = {"label": info.label, "device": info.device, "dtype": info.dtype, "pattern": info.pattern,
           "sample_rate": info.sample_rate, "channels": info.channels, "is_melody": info.is_melody,
           "musicbridge_version": musicbridge_version(), "torch_version": torch.__version__}
    rec.update(checkpoint_fingerprint(info.path))
    return rec


def finish_audio(raw: np.ndarray, model_rate: int, render: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """Grid-lock, chain and loop one stem's raw model-rate audio; returns (audio, report)."""

    audio = np.ascontiguousarray(raw, dtype=np.float32)
    report: dict[str, Any] = {"raw_sha256": audio_sha256(audio)}
    n, xf = int(render["model_samples"]), int(render["crossfade_samples"])
    if render.get("stretch_to_grid"):
        audio, fit = stretch_to_tempo(audio, model_rate, float(render["tempo"]))
        report["grid"] = fit.to_dict()
    audio = exact_length(audio, n + xf)
    if render.get("chain"):
        audio = process_chunks(build_chain(render["chain"]), audio, model_rate)
    audio = make_loop(audio, n, xf) if render.get("loop") else exact_length(audio, n)
    return audio, report


def stem_sidecar(plan: StemPlan, engine_rec: dict[str, Any], batch: list[dict[str, Any]], index: int,
                 report: dict[str, Any]) -> dict[str, Any]:
    """The one sidecar schema: the request, its batch, the render record, the result and the context."""
    r, q = plan.render, plan.request
    return {
        **plan.context,
        "kind": SIDECAR_KIND, "track": plan.name, "model": engine_rec, "prompt": q["prompt"],
        "params": q["params"], "seed": q["params"]["seed"], "melody": q["melody"],
        "continuation": q["continuation"], "tempo": r["tempo"], "time_signature": r["time_signature"],
        "start_bar": r["start_bar"], "bars": r["bars"], "seconds": r["seconds"], "length": plan.length_text,
        "loop": r["loop"], "render": r, "result": report, "engine_version": engine_rec.get("musicbridge_version"),
        "batch": {"index": index, "requests": batch},
    }


def write_planned_stem(audio: np.ndarray, model_rate: int, plan: StemPlan, engine_rec: dict[str, Any],
                       batch: list[dict[str, Any]], index: int, report: dict[str, Any], out_dir: Path) -> Path:
    """Write a finished stem (exact length at the plan's rate, BWF time reference) with its sidecar."""

    r = plan.render
    return write_stem(audio, model_rate, out_dir, plan.name, stem_sidecar(plan, engine_rec, batch, index, report),
                      target_rate=r["target_rate"], fmt=r["format"], start_seconds=plan.start_seconds,
                      samples=r["samples"])


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sidecar {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SidecarError(f"{p}: not a JSON sidecar ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != SIDECAR_KIND:
        raise SidecarError(f"{p}: key 'kind': expected {SIDECAR_KIND!r} (a stem sidecar written by "
                           "musicbridge render or serve)")
    for key in ("batch", "render", "model", "track"):
        if key not in data:
            raise SidecarError(f"{p}: key {key!r} is missing; this sidecar cannot regenerate its stem")
    data["render"].setdefault("start_seconds", float(data.get("file", {}).get("start_seconds", 0.0)))
    data["render"].setdefault("start_bar", data.get("start_bar", 1))
    return data


def plan_from_sidecar(sc: dict[str, Any]) -> StemPlan:
    """The plan a sidecar records (its own request of the batch), for writing the stem again."""
    keep = ("preset", "session", "job", "transport")
    return StemPlan(sc["track"], sc["batch"]["requests"][int(sc["batch"]["index"])], sc["render"],
                    {k: sc[k] for k in keep if k in sc})
