"""`musicbridge render`: whole session files to stems, and any stem again from its sidecar.

Each [[track]] becomes a bridge.stems.plan.StemPlan; one engine.generate call renders a batch of
tracks (all of them, up to `batch_size`); bridge.stems.output fits each to the bar grid, runs its
chain, loops it if asked and writes it with a sidecar recording the whole batch, so `regenerate`
repeats exactly the same engine call and gets the same audio. OSC jobs (bridge.stems.jobs) share
every one of those stages, so `regenerate` works on their stems too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bridge.state.session_file import FileTrack, SessionFile, SessionFileError
from bridge.stems.output import engine_record, finish_audio, plan_from_sidecar, read_sidecar, write_planned_stem
from bridge.stems.plan import PlanError, StemPlan, plan_stem, sound
from bridge.stems.request import StemRequestError, build_request, file_sha256
from model.types import melody_refusal
from audiofile import finalize
from model.types import RequestError
from plugin_host.stems import StemError, check_out_dir

Progress = Callable[[int, float], None]


def plan_track(track: FileTrack, session: SessionFile, model_rate: int, loop: bool | None = None,
               seed: int | None = None) -> StemPlan:
    """The stem plan of one [[track]] of a session file (SessionFileError naming its key if it cannot be)."""
    is_loop = track.loop if loop is None else (loop and track.bars is not None)
    prompt, params = sound(track.prompt, track.add_bpm, session.tempo, track.params,
                           seed=seed if seed is not None else track.seed)
    melody = None
    if track.melody is not None:
        melody = {"kind": "file", "source": str(track.melody), "sha256": file_sha256(track.melody),
                  "track": track.melody_track}
    try:
        return plan_stem(track.name, prompt=prompt, params=params, tempo=session.tempo,
                         signature=session.signature, bars=track.bars, seconds=track.seconds,
                         model_rate=model_rate, target_rate=session.sample_rate,
                         start_quarters=(track.start_bar - 1) * session.signature.quarters_per_bar,
                         loop=is_loop, chain=track.chain, fmt=session.format, melody=melody,
                         context={"preset": track.preset.to_dict() if track.preset else None,
                                  "session": {"file": str(session.path), "sha256": session.sha256}})
    except PlanError as e:
        raise SessionFileError(f"{session.path}: track {track.name!r}: key '{e.key}': {e}") from None


def _generate(records: list[dict[str, Any]], engine, wheres: list[str],
              progress: Progress | None) -> list[np.ndarray]:
    """One engine call for a batch of request records; an error names the file and track."""

    try:
        reqs = [build_request(rec, engine, where) for rec, where in zip(records, wheres, strict=True)]
    except (StemRequestError, RequestError) as e:
        raise SessionFileError(str(e)) from None
    return engine.generate(reqs, progress=progress)


# ------------------------------------------------------------------ output folder


def check_out_target(out: str | os.PathLike) -> Path:
    """Fail early (before loading a model) if stems could not be written to `out`; creates nothing."""

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

    d = check_out_target(out)
    if not d.exists():
        try:
            d.mkdir(parents=True)
        except OSError as e:
            raise StemError(f"output folder {d} cannot be created ({e.strerror or e})") from None
    return check_out_dir(d)


def write_json_atomic(out_dir: Path, basename: str, data: dict[str, Any]) -> Path:
    """name.json, name-2.json, ...: never overwriting, never partial."""


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
    """One progress bar per track with the time left (tqdm) on a terminal; plain lines, one per
    tenth of a track, otherwise (a log file or CI keeps every byte, so nothing is redrawn there)."""

    def __init__(self, names: Sequence[str], enabled: bool | None = None, stream=None):
        self.names = list(names)
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.pct = [0] * len(self.names)
        self.t0 = time.monotonic()
        self.width = max((len(n) for n in self.names), default=0)
        self._bars: list | None = None

    def for_batch(self, indices: Sequence[int]) -> Progress:
        """A progress(request_index, fraction) callback for a batch holding these tracks."""
        return lambda j, frac: self.update(indices[j], frac)

    def update(self, track: int, fraction: float) -> None:
        pct = max(0, min(100, int(fraction * 100)))
        if pct <= self.pct[track]:
            return
        before, self.pct[track] = self.pct[track], pct
        if self.enabled:
            bars = self._open()
            bars[track].update(pct - bars[track].n)
            if pct == 100:
                bars[track].refresh()
        elif pct // 10 > before // 10:
            spent = time.monotonic() - self.t0
            left = spent * (100 - pct) / pct
            self.stream.write(f"{self.names[track]}: done after {spent:.1f} s\n" if pct == 100 else
                              f"{self.names[track]}: {pct // 10 * 10}% after {spent:.1f} s, about {left:.1f} s left\n")
            self.stream.flush()

    def _open(self) -> list:
        if self._bars is None:

            self._bars = [tqdm(total=100, desc=f"{n:<{self.width}}", position=i, file=self.stream, leave=True,
                               
                               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} spent, {remaining} left")
                          for i, n in enumerate(self.names)]
        return self._bars

    def close(self) -> None:
        for b in self._bars or ():
            b.close()
        self._bars = None


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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
    check_melodies(session, engine)
    plans = [plan_track(t, session, engine.sample_rate, loop) for t in session.tracks]
    erec = engine_record(engine)
    progress = progress or TrackBars([p.name for p in plans])
    results: list[TrackResult] = []
    for lo in range(0, len(plans), max(1, batch_size)):
        idx = list(range(lo, min(len(plans), lo + batch_size)))
        batch = [plans[i].request for i in idx]
        wheres = [f"{session.path}: track {plans[i].name!r}" for i in idx]
        audios = _generate(batch, engine, wheres, progress.for_batch(idx))
        for j, i in enumerate(idx):
            audio, report = finish_audio(audios[j], engine.sample_rate, plans[i].render)
            path = write_planned_stem(audio, engine.sample_rate, plans[i], erec, batch, j, report, out_dir)
            results.append(TrackResult(plans[i].name, path, plans[i].seconds, report))
    progress.close()
    return results


def regenerate(sidecar_path: str | os.PathLike, engine, out_dir: Path | None = None,
               progress: Progress | None = None) -> tuple[Path, bool]:
    """Repeat the engine call recorded in a sidecar (any stem: rendered or from an OSC job) and
    write the stem again (a new numbered file).

    progress(request_index, fraction) sees every request of the recorded batch.
    Returns (path, identical): identical is True when the new audio hashes to the recorded one.
    """
    sc = read_sidecar(sidecar_path)
    plan = plan_from_sidecar(sc)
    batch = sc["batch"]["requests"]
    audios = _generate(batch, engine, [f"{sidecar_path}: batch request {k}" for k in range(len(batch))], progress)
    index = int(sc["batch"]["index"])
    audio, report = finish_audio(audios[index], engine.sample_rate, plan.render)
    report["regenerated_from"] = str(Path(sidecar_path).resolve())
    out = out_dir or Path(sidecar_path).resolve().parent
    path = write_planned_stem(audio, engine.sample_rate, plan, engine_record(engine), batch, index, report, out)
    return path, report["raw_sha256"] == sc.get("result", {}).get("raw_sha256")
