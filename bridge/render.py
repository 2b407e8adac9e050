"""Whole-session renders to stems, and regeneration of a stem from its sidecar.

One engine.generate call renders a batch of tracks (all of them, up to `batch_size`); each
track's audio is then locked to the bar grid (stretched if it drifted), run through its chain,
made a seamless loop if asked, and written by plugin_host.stems with a sidecar that records
the whole batch, so `regenerate` can repeat exactly the same engine call and get the same audio.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.session_file import FileTrack, SessionFile, SessionFileError
from model.types import MAX_REQUEST_SECONDS, melody_refusal

SIDECAR_KIND = "musicbridge.stem"
GEN_MARGIN_SECONDS = 0.1  # generated past the needed length, so trimming never pads
Progress = Callable[[int, float], None]


def musicbridge_version() -> str:
    try:
        from importlib.metadata import version

        return version("musicbridge")
    except Exception:  # noqa: BLE001 - not installed as a distribution: running from source
        return "source"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    import torch

    info = engine.info
    rec = {"label": info.label, "device": info.device, "dtype": info.dtype,
           "sample_rate": info.sample_rate, "channels": info.channels, "is_melody": info.is_melody,
           "musicbridge_version": musicbridge_version(), "torch_version": torch.__version__}
    rec.update(checkpoint_fingerprint(info.path))
    return rec


# ------------------------------------------------------------------ planning


@dataclass
class StemPlan:
    """Everything needed to make one stem: the engine request record and the post-processing."""

    name: str
    request: dict[str, Any]  # prompt, seconds, params, melody {source, sha256, track}
    render: dict[str, Any]  # bars, tempo, signature, loop, crossfade, target_rate, samples, chain, ...
    start_seconds: float
    extra: dict[str, Any] = field(default_factory=dict)  # preset and session context for the sidecar


def plan_track(track: FileTrack, session: SessionFile, model_rate: int, loop: bool | None = None,
               seed: int | None = None) -> StemPlan:
    from plugin_host.tempo import (STRETCH_LIMIT, bars_to_samples, bars_to_seconds,
                                   loop_crossfade_samples)

    bpm, sig, rate = session.tempo, session.signature, session.sample_rate
    is_loop = track.loop if loop is None else (loop and track.bars is not None)
    if track.bars is not None:
        seconds = bars_to_seconds(track.bars, bpm, sig)
        samples = bars_to_samples(track.bars, bpm, sig, rate)
    else:
        seconds = float(track.seconds)
        samples = int(round(seconds * rate))
    model_samples = int(round(samples * model_rate / rate))
    crossfade = loop_crossfade_samples(bpm, model_rate, model_samples) if is_loop else 0
    need = (model_samples + crossfade) / model_rate
    # Room for a stretch that speeds the take up by up to STRETCH_LIMIT without running short.
    gen_seconds = need * (1.0 + STRETCH_LIMIT if track.bars is not None else 1.0) + GEN_MARGIN_SECONDS
    if gen_seconds > MAX_REQUEST_SECONDS:
        key = "bars" if track.bars is not None else "seconds"
        raise SessionFileError(f"{session.path}: track {track.name!r}: key '{key}': {seconds:.1f} s "
                               f"needs {gen_seconds:.1f} s of generation; the engine makes at most "
                               f"{MAX_REQUEST_SECONDS:g} s per request")
    params = dict(track.params)
    params["seed"] = seed if seed is not None else (track.seed if track.seed is not None
                                                    else secrets.randbelow(2**31))
    from model.types import SamplingParams

    params = _params_dict(SamplingParams(**params))
    melody = None
    if track.melody is not None:
        melody = {"source": str(track.melody), "sha256": file_sha256(track.melody),
                  "track": track.melody_track}
    start = (track.start_bar - 1) * bars_to_seconds(1, bpm, sig)
    return StemPlan(
        name=track.name,
        request={"prompt": track.full_prompt(bpm), "seconds": round(gen_seconds, 6),
                 "params": params, "melody": melody, "continuation": None},
        render={"bars": track.bars, "seconds": seconds, "tempo": bpm, "time_signature": str(sig),
                "start_bar": track.start_bar, "loop": is_loop, "crossfade_samples": crossfade,
                "model_samples": model_samples, "target_rate": rate, "samples": samples,
                "format": session.format, "chain": [dict(c) for c in track.chain],
                "stretch_to_grid": track.bars is not None},
        start_seconds=start,
        extra={"preset": track.preset.to_dict() if track.preset else None,
               "session": {"file": str(session.path), "sha256": session.sha256}},
    )


def _params_dict(p) -> dict[str, Any]:
    return {"guidance": p.guidance, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "greedy": p.greedy, "seed": p.seed}


def build_request(rec: dict[str, Any], engine, where: str):
    """A GenerationRequest from a request record; the melody file must be unchanged."""
    from model.types import GenerationRequest, SamplingParams

    melody = None
    m = rec.get("melody")
    if m:
        if melody_refusal(engine):
            raise SessionFileError(f"{where}: follows melody {m['source']}, but {melody_refusal(engine)} "
                                   "(--model)")
        src = Path(m["source"])
        if not src.is_file():
            raise FileNotFoundError(f"{where}: melody file {src} does not exist")
        if m.get("sha256") and file_sha256(src) != m["sha256"]:
            raise SessionFileError(f"{where}: melody file {src} has changed since it was recorded "
                                   "(sha256 differs); the stem cannot be reproduced from it")
        from model.melody import load_melody

        try:
            melody = load_melody(str(src), engine.chroma_frame_rate, seconds=rec["seconds"],
                                 track=m.get("track"))
        except (ValueError, OSError) as e:  # MelodyError is a ValueError: name the track too
            raise SessionFileError(f"{where}: key 'melody': {e}") from None
    return GenerationRequest(prompt=rec["prompt"], seconds=float(rec["seconds"]),
                             params=SamplingParams(**rec["params"]), melody=melody)


# ------------------------------------------------------------------ post-processing


def finish_audio(raw: np.ndarray, model_rate: int, render: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """Grid-lock, chain and loop one track's raw model-rate audio; returns (audio, report)."""
    from plugin_host.chain import build_chain, process_chunks
    from plugin_host.tempo import exact_length, make_loop, stretch_to_tempo

    audio = np.ascontiguousarray(raw, dtype=np.float32)
    report: dict[str, Any] = {"raw_sha256": _sha(audio)}
    n, xf = int(render["model_samples"]), int(render["crossfade_samples"])
    if render.get("stretch_to_grid"):
        audio, fit = stretch_to_tempo(audio, model_rate, float(render["tempo"]))
        report["grid"] = fit.to_dict()
    audio = exact_length(audio, n + xf)
    if render.get("chain"):
        audio = process_chunks(build_chain(render["chain"]), audio, model_rate)
    audio = make_loop(audio, n, xf) if render.get("loop") else exact_length(audio, n)
    return audio, report


def _sha(a: np.ndarray) -> str:
    from plugin_host.stems import audio_sha256

    return audio_sha256(a)


def write_track(audio: np.ndarray, model_rate: int, plan: StemPlan, engine_rec: dict[str, Any],
                batch: list[dict[str, Any]], index: int, report: dict[str, Any], out_dir: Path) -> Path:
    from plugin_host.stems import write_stem

    r = plan.render
    sidecar = {
        "kind": SIDECAR_KIND, "track": plan.name, "model": engine_rec, "prompt": plan.request["prompt"],
        "preset": plan.extra.get("preset"), "params": plan.request["params"],
        "seed": plan.request["params"]["seed"], "melody": plan.request["melody"],
        "continuation": plan.request["continuation"], "tempo": r["tempo"],
        "time_signature": r["time_signature"], "start_bar": r["start_bar"], "bars": r["bars"],
        "loop": r["loop"], "render": r, "result": report, "session": plan.extra.get("session"),
        "engine_version": engine_rec["musicbridge_version"],
        "batch": {"index": index, "requests": batch},
    }
    return write_stem(audio, model_rate, out_dir, plan.name, sidecar, target_rate=r["target_rate"],
                      fmt=r["format"], start_seconds=plan.start_seconds, samples=r["samples"])


# ------------------------------------------------------------------ output folder


def check_out_target(out: str | os.PathLike) -> Path:
    """Fail early (before loading a model) if stems could not be written to `out`; creates nothing."""
    from plugin_host.stems import StemError, check_out_dir

    d = Path(out).expanduser().absolute()
    if d.exists():
        return check_out_dir(d)
    parent = d.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise StemError(f"output folder {d} cannot be created: {parent} is a file, not a folder")
    try:
        check_out_dir(parent)
    except StemError as e:
        raise StemError(f"output folder {d} cannot be created: {e}") from None
    return d


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """The output folder, created if missing; StemError naming it when it cannot be written."""
    from plugin_host.stems import StemError, check_out_dir

    d = check_out_target(out)
    if not d.exists():
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise StemError(f"output folder {d} cannot be created ({e.strerror or e})") from None
    return check_out_dir(d)


def write_json_atomic(out_dir: Path, basename: str, data: dict[str, Any]) -> Path:
    """name.json, name-2.json, ...: never overwriting, never partial."""
    import tempfile

    from audiofile import finalize

    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{basename}.", suffix=".part.json", dir=out_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        for n in range(1, 10_000):
            path = out_dir / (f"{basename}.json" if n == 1 else f"{basename}-{n}.json")
            if path.exists():
                continue
            try:
                finalize(tmp, path, overwrite=False)
                return path
            except FileExistsError:
                continue
        raise FileExistsError(f"no free name for {basename}.json in {out_dir}")
    finally:
        Path(tmp).unlink(missing_ok=True)


# ------------------------------------------------------------------ progress


class TrackBars:
    """One progress bar per track, redrawn in place on a terminal; silent otherwise."""

    def __init__(self, names: Sequence[str], enabled: bool | None = None, stream=None):
        self.names = list(names)
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.pct = [0] * len(self.names)
        self.drawn = False
        self.width = max((len(n) for n in self.names), default=0)

    def for_batch(self, indices: Sequence[int]) -> Progress:
        """A progress(request_index, fraction) callback for a batch holding these tracks."""
        return lambda j, frac: self.update(indices[j], frac)

    def update(self, track: int, fraction: float) -> None:
        pct = max(0, min(100, int(fraction * 100)))
        if pct == self.pct[track]:
            return
        self.pct[track] = pct
        if self.enabled:
            self._draw()

    def _draw(self) -> None:
        w = self.stream
        if self.drawn:
            w.write(f"\x1b[{len(self.names)}F")
        for name, pct in zip(self.names, self.pct):
            filled = pct * 30 // 100
            w.write(f"\x1b[2K{name:<{self.width}} [{'#' * filled}{'.' * (30 - filled)}] {pct:3d}%\n")
        w.flush()
        self.drawn = True


# ------------------------------------------------------------------ the two entry points


@dataclass
class TrackResult:
    name: str
    path: Path
    seconds: float
    report: dict[str, Any]


def check_melodies(session: SessionFile, engine) -> None:
    for t in session.tracks:
        if t.melody is not None and melody_refusal(engine):
            raise SessionFileError(
                f"{session.path}: track {t.name!r}: key 'melody': {melody_refusal(engine)} (--model)")


def render_session(session: SessionFile, engine, out_dir: Path, *, loop: bool | None = None,
                   batch_size: int = 8, progress: TrackBars | None = None) -> list[TrackResult]:
    """Render every track; tracks go to the engine in batches of up to `batch_size` (one call each)."""
    from model.types import RequestError

    check_melodies(session, engine)
    plans = [plan_track(t, session, engine.sample_rate, loop) for t in session.tracks]
    erec = engine_record(engine)
    progress = progress or TrackBars([p.name for p in plans])
    results: list[TrackResult] = []
    for lo in range(0, len(plans), max(1, batch_size)):
        idx = list(range(lo, min(len(plans), lo + batch_size)))
        batch = [plans[i].request for i in idx]
        try:
            reqs = [build_request(rec, engine, f"{session.path}: track {plans[i].name!r}")
                    for i, rec in zip(idx, batch)]
        except RequestError as e:
            raise SessionFileError(f"{session.path}: {e}") from None
        audios = engine.generate(reqs, progress=progress.for_batch(idx))
        for j, i in enumerate(idx):
            audio, report = finish_audio(audios[j], engine.sample_rate, plans[i].render)
            path = write_track(audio, engine.sample_rate, plans[i], erec, batch, j, report, out_dir)
            results.append(TrackResult(plans[i].name, path, plans[i].render["samples"]
                                       / plans[i].render["target_rate"], report))
    return results


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sidecar {p} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SessionFileError(f"{p}: not a JSON sidecar ({e})") from None
    if not isinstance(data, dict) or data.get("kind") != SIDECAR_KIND:
        raise SessionFileError(f"{p}: key 'kind': expected {SIDECAR_KIND!r} (a stem sidecar written by "
                               "musicbridge render)")
    for key in ("batch", "render", "model", "track"):
        if key not in data:
            raise SessionFileError(f"{p}: key {key!r} is missing; this sidecar cannot regenerate its stem")
    return data


def regenerate(sidecar_path: str | os.PathLike, engine, out_dir: Path | None = None,
               progress: Progress | None = None) -> tuple[Path, bool]:
    """Repeat the engine call recorded in a sidecar and write the stem again (a new numbered file).

    progress(request_index, fraction) sees every request of the recorded batch.
    Returns (path, identical): identical is True when the new audio hashes to the recorded one.
    """
    sc = read_sidecar(sidecar_path)
    where = f"{sidecar_path}"
    batch = sc["batch"]["requests"]
    index = int(sc["batch"]["index"])
    reqs = [build_request(rec, engine, f"{where}: batch request {k}") for k, rec in enumerate(batch)]
    audios = engine.generate(reqs, progress=progress)
    audio, report = finish_audio(audios[index], engine.sample_rate, sc["render"])
    plan = StemPlan(name=sc["track"], request=batch[index], render=sc["render"],
                     start_seconds=float(sc.get("file", {}).get("start_seconds", 0.0)),
                     extra={"preset": sc.get("preset"), "session": sc.get("session")})
    report["regenerated_from"] = str(Path(sidecar_path).resolve())
    out = out_dir or Path(sidecar_path).resolve().parent
    path = write_track(audio, engine.sample_rate, plan, engine_record(engine), batch, index, report, out)
    return path, report["raw_sha256"] == sc.get("result", {}).get("raw_sha256")
