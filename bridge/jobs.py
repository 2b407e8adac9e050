"""Generation jobs: a priority queue, one worker that batches jobs into engine calls, cancel, progress.

Jobs are accepted instantly (the OSC thread only queues them) and run one batch at a time on
a worker thread, since the engine holds one model. Jobs whose audio has the same length and
the same kind of conditioning share one `engine.generate` call. A ticker reports the progress
of running jobs at least once a second, so a DAW sees a job is alive even between engine
callbacks. Every job ends in exactly one event: done, cancelled or failed.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.protocol import Continue, Generate, Limits, ProtocolError

if TYPE_CHECKING:
    from bridge.session import Track, Transport
    from model.types import GenerationRequest, SamplingParams
    from presets import Preset

log = logging.getLogger("musicbridge.jobs")

Address = tuple[str, int]
STATES = ("queued", "running", "done", "cancelled", "failed")
HISTORY = 1000


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, snapshotted from the session when it was queued.

    melody: a session melody record ({"kind": "midi"|"audio"|"notes"|"chroma", ...}) or None.
    continuation: {"path": take} or None. chain: the preset's effect chain entries.
    sidecar: what to record beside the stem so it can be regenerated.
    """

    track: str
    prompt: str
    seconds: float
    params: Any  # model.types.SamplingParams
    melody: dict[str, Any] | None = None
    continuation: dict[str, Any] | None = None
    chain: tuple[dict[str, Any], ...] = ()
    tempo: float = 120.0
    sidecar: dict[str, Any] = field(default_factory=dict)
    stem_rate: int = 48000
    start_seconds: float = 0.0  # the stem's place on the DAW timeline: its BWF time reference / rate


@dataclass(eq=False)
class Job:
    id: int
    spec: JobSpec
    reply_to: Address
    priority: int = 0
    seq: int = 0
    state: str = "queued"
    fraction: float = 0.0
    path: Path | None = None
    error: tuple[str, str] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def finished(self) -> bool:
        return self.state in ("done", "cancelled", "failed")


# kind is "progress" (fraction), "done" (path), "cancelled" (), "failed" (code, message)
EventSink = Callable[[Job, str, tuple], None]


class JobQueue:
    """The queue and its worker thread; a context manager (the worker stops on exit)."""

    def __init__(self, engine, stems_dir: Path, on_event: EventSink, *, max_queued: int = 32,
                 max_batch: int = 4, tick: float = 0.5, engine_record: dict[str, Any] | None = None):
        self.engine, self.stems_dir, self.on_event = engine, Path(stems_dir), on_event
        self.max_queued, self.max_batch, self.tick = max_queued, max_batch, tick
        self.engine_record = engine_record or {}
        self.jobs: dict[int, Job] = {}
        self._queued: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._emit = threading.Lock()  # orders a job's progress reports before its final event
        self._seq = itertools.count()
        self._closing = False
        self._stopped = threading.Event()
        self._worker = threading.Thread(target=self._work, name="jobs-worker", daemon=True)
        self._ticker = threading.Thread(target=self._tick, name="jobs-progress", daemon=True)

    def __enter__(self) -> JobQueue:
        self._worker.start()
        self._ticker.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(grace=0.0)

    # ------------------------------------------------------------ the OSC side

    def submit(self, spec: JobSpec, reply_to: Address, priority: int, new_id: Callable[[], int],
               accepted: Callable[[Job], None] | None = None) -> Job:
        """Queue a job (it runs later); ProtocolError busy when full or shutting down.

        `new_id` is called only once the job is sure to be queued, so a refused job uses no id.
        `accepted(job)` runs before the worker can see the job, so "accepted" always precedes
        the job's first progress report.
        """
        with self._cond:
            if self._closing:
                raise ProtocolError("busy", "the daemon is shutting down and accepts no new jobs")
            if len(self._queued) >= self.max_queued:
                raise ProtocolError("busy", f"{len(self._queued)} jobs are already queued, the limit; "
                                            "wait for one to finish or cancel one")
            job = Job(new_id(), spec, reply_to, priority, next(self._seq))
            self.jobs[job.id] = job
            if accepted is not None:
                accepted(job)
            self._queued.append(job)
            self._forget_old()
            self._cond.notify_all()
        return job

    def cancel(self, job_id: int) -> Job:
        """Cancel a queued job now, or ask a running one to stop; ProtocolError if unknown or finished."""
        with self._cond:
            job = self.get(job_id)
            if job.finished:
                raise ProtocolError("bad_args", f"job {job_id} has already finished ({job.state})", job_id)
            job.cancel.set()
            if job.state != "queued":
                return job
            self._queued.remove(job)
            job.state = "cancelled"
        self.on_event(job, "cancelled", ())
        return job

    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise ProtocolError("not_found", f"there is no job {job_id} (ids of finished jobs are kept "
                                             f"for the last {HISTORY} jobs)", job_id)
        return job

    def counts(self) -> tuple[int, int]:
        """(queued, running)."""
        with self._cond:
            return len(self._queued), len(self._running)

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs, cancel queued ones, let running ones finish within `grace` s, then cancel them."""
        with self._cond:
            self._closing = True
            dropped, self._queued = self._queued, []
            for job in dropped:
                job.cancel.set()
                job.state = "cancelled"
            self._cond.notify_all()
        for job in dropped:
            self.on_event(job, "cancelled", ())
        deadline = time.monotonic() + grace
        with self._cond:
            while self._running and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            for job in self._running:
                job.cancel.set()
                log.info("stopping job %d (track %s): still running when the grace period ended", job.id,
                         job.spec.track)
        self._stopped.set()
        if self._worker.is_alive():
            self._worker.join(timeout=5.0)

    def _forget_old(self) -> None:
        if len(self.jobs) > HISTORY:
            for jid in sorted(self.jobs)[: len(self.jobs) - HISTORY]:
                if self.jobs[jid].finished:
                    del self.jobs[jid]

    # ------------------------------------------------------------ the worker

    def _next_batch(self) -> list[Job]:
        """The most urgent job and the queued jobs that can share its engine call (caller holds the lock)."""
        head = min(self._queued, key=lambda j: (-j.priority, j.seq))
        key = batch_key(head.spec, self.engine)
        batch = [head]
        if key is not None:
            for j in sorted(self._queued, key=lambda j: (-j.priority, j.seq)):
                if len(batch) >= self.max_batch:
                    break
                if j is not head and batch_key(j.spec, self.engine) == key:
                    batch.append(j)
        for j in batch:
            self._queued.remove(j)
            j.state = "running"
        self._running = batch
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queued and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                batch = self._next_batch()
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - a failed batch must not stop the queue
                log.exception("internal error while running jobs %s", [j.id for j in batch])
                for j in batch:
                    if not j.finished:
                        self._finish(j, "failed", ("internal", f"internal error: {e}"))
            with self._cond:
                self._running = []
                self._cond.notify_all()

    def _run(self, batch: list[Job]) -> None:
        from model.engine import Cancelled
        from model.types import RequestError

        requests, ready = [], []
        for job in batch:
            self.on_event(job, "progress", (0.0,))
            try:
                requests.append(build_request(job, self.engine))
                ready.append(job)
            except ProtocolError as e:
                self._finish(job, "failed", (e.code, e.message))
            except Exception as e:  # noqa: BLE001 - melody/take loading errors end this job only
                self._finish(job, "failed", ("failed", f"could not prepare the job: {e}"))
        if not ready:
            return
        log.info("running job%s %s on the engine (%s)", "s" if len(ready) > 1 else "",
                 ", ".join(str(j.id) for j in ready), ", ".join(f"{j.spec.track} {j.spec.seconds:g} s" for j in ready))

        def progress(index: int, fraction: float) -> None:
            if 0 <= index < len(ready) and np.isfinite(fraction):
                ready[index].fraction = max(ready[index].fraction, min(float(fraction), 1.0))

        try:
            audios = self.engine.generate(requests, progress)
        except Cancelled:
            audios = [None] * len(ready)
        except RequestError as e:
            for j in ready:
                self._finish(j, "failed", ("model", f"the model refused the job: {e}"))
            return
        except Exception as e:  # noqa: BLE001
            log.exception("the engine failed on jobs %s", [j.id for j in ready])
            for j in ready:
                self._finish(j, "failed", ("failed", f"generation failed: {type(e).__name__}: {e}"))
            return
        for job, audio in zip(ready, audios):
            if audio is None or job.cancel.is_set():
                self._finish(job, "cancelled", ())
                continue
            job.fraction = 1.0
            try:
                path = write_result(job, audio, self.engine, self.stems_dir, self.engine_record)
            except Exception as e:  # noqa: BLE001 - disk full, chain error: this job fails, the daemon goes on
                self._finish(job, "failed", ("failed", f"could not write the stem: {e}"))
                continue
            job.path = path
            self._finish(job, "done", (str(path),))

    def _finish(self, job: Job, state: str, payload: tuple) -> None:
        with self._emit:
            job.state = state
            if state == "failed":
                job.error = payload  # type: ignore[assignment]
            self.on_event(job, state, payload)

    def _tick(self) -> None:
        while not self._stopped.wait(self.tick):
            with self._cond:
                running = list(self._running)
            for j in running:
                with self._emit:  # never a progress report after the job's final event
                    if j.state == "running":
                        self.on_event(j, "progress", (j.fraction,))


# ---------------------------------------------------------------- job stages


def batch_key(spec: JobSpec, engine) -> tuple | None:
    """Jobs with equal keys can share one engine call; None: this job runs alone."""
    if spec.continuation is not None:
        return None
    return (engine.frames_for(spec.seconds), spec.melody is not None)


def build_request(job: Job, engine) -> GenerationRequest:
    """The engine request for a job: melody chroma and continuation take loaded now, on the worker."""
    from model.types import GenerationRequest

    spec = job.spec
    melody = None
    if spec.melody is not None:
        melody = melody_chroma(spec.melody, engine.chroma_frame_rate, spec.seconds, spec.tempo)
    audio_prompt = None
    if spec.continuation is not None:
        from plugin_host.audio_io import read_audio, resample

        take, rate = read_audio(spec.continuation["path"])
        audio_prompt = resample(take, rate, engine.sample_rate) if rate != engine.sample_rate else take
        audio_prompt = fit_channels(audio_prompt, engine.channels)
    return GenerationRequest(prompt=spec.prompt, seconds=spec.seconds, params=spec.params, melody=melody,
                             audio_prompt=audio_prompt, cancel=job.cancel)


def fit_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    if audio.shape[0] == channels:
        return audio
    mono = audio.mean(axis=0, keepdims=True)
    return np.repeat(mono, channels, axis=0).astype(np.float32)


def melody_chroma(melody: dict[str, Any], rate: float, seconds: float, tempo: float) -> np.ndarray:
    """A (frames, 12) chroma at the model's chroma rate from a session melody record."""
    kind = melody["kind"]
    if kind == "chroma":
        from bridge.session import chroma_from_text

        src = np.frombuffer(chroma_from_text(melody["data"]), dtype="<f4").reshape(-1, 12)
        return resample_chroma(src, float(melody["frame_rate"]), rate, seconds)
    try:
        import model.melody as mm
    except ImportError:
        raise ProtocolError("unavailable", "this build has no melody support (model.melody is missing)") from None
    if kind in ("midi", "audio"):
        return np.asarray(mm.load_melody(melody["path"], rate, seconds=seconds), dtype=np.float32)
    if kind == "notes":
        fn = getattr(mm, "notes_to_chroma", None)
        if fn is None:
            raise ProtocolError("unavailable", "this build cannot turn notes into a melody yet "
                                               "(model.melody.notes_to_chroma is missing)")
        notes = [(int(p), float(s) * 60.0 / tempo, float(n) * 60.0 / tempo) for p, s, n in melody["notes"]]
        return np.asarray(fn(notes, rate, seconds), dtype=np.float32)
    raise ProtocolError("failed", f"unknown melody kind {kind!r} in the session")


def resample_chroma(src: np.ndarray, src_rate: float, rate: float, seconds: float) -> np.ndarray:
    """Nearest-frame resampling of a chroma onto the model's frame grid; past its end: silence (zeros)."""
    n = max(1, int(round(seconds * rate)))
    idx = np.floor(np.arange(n) * src_rate / rate + 1e-9).astype(np.int64)
    out = np.zeros((n, 12), dtype=np.float32)
    ok = idx < len(src)
    out[ok] = src[idx[ok]]
    return out


def write_result(job: Job, audio: np.ndarray, engine, stems_dir: Path, engine_record: dict[str, Any]) -> Path:
    """The stem on disk (through the track's chain, at the stem rate, exact length) with its sidecar."""
    from plugin_host.stems import write_stem

    spec = job.spec
    chain = None
    if spec.chain:
        from plugin_host.chain import build_chain

        chain = build_chain(list(spec.chain), where=f"track {spec.track}: chain")
    sidecar = {"kind": "musicbridge.osc-job", "job": job.id, "track": spec.track, "model": engine_record,
               "prompt": spec.prompt, "seconds": spec.seconds, **spec.sidecar}
    return write_stem(audio, engine.sample_rate, stems_dir, spec.track, sidecar, target_rate=spec.stem_rate,
                      chain=chain, samples=int(round(spec.seconds * spec.stem_rate)),
                      start_seconds=spec.start_seconds)


def track_sound(name: str, track: Track, preset: Preset | None, tempo: float) -> tuple[str, SamplingParams]:
    """(prompt, SamplingParams) of a track: its prompt or its preset's, "<bpm> bpm" unless the
    preset says add_bpm = false, and the preset's params with the track's own on top."""
    base = track.prompt or (preset.prompt if preset else "")
    if not base:
        raise ProtocolError("bad_args", f"track {name} has no prompt; send /track/{name}/prompt "
                                        f"or /track/{name}/preset first")
    add_bpm = preset.add_bpm if preset else True
    prompt = f"{base}, {_fmt_bpm(tempo)} bpm" if add_bpm else base
    return prompt, sampling_params({**(dict(preset.params) if preset else {}), **track.params_dict()})


def plan_job(cmd: Generate | Continue, track: Track, preset: Preset | None, transport: Transport, engine,
             limits: Limits, stem_rate: int = 48000) -> JobSpec:
    """The job a /track/<name>/generate or /continue asks for, from the track, its preset and the transport.

    The prompt is the track's own, else its preset's, with "<bpm> bpm" appended unless the
    preset says add_bpm = false; params are the preset's with the track's on top; bars become
    seconds at the transport tempo and time signature (4 bars at 120 bpm in 4/4 = 8.0 s).
    """
    t = transport
    prompt, params = track_sound(cmd.track, track, preset, t.tempo)
    bars = getattr(cmd, "bars", None)
    if bars is not None:
        seconds = t.bars_to_seconds(bars)
        length = f"{bars} bars at {_fmt_bpm(t.tempo)} bpm in {t.signature} = {seconds:g} s"
    else:
        seconds = float(cmd.seconds)
        length = f"{seconds:g} s"
    if seconds > limits.max_seconds:
        raise ProtocolError("limit", f"{length} is over this daemon's limit of {limits.max_seconds:g} s per job")
    melody = track.melody_dict()
    if melody is not None and not engine.is_melody:
        raise ProtocolError("model", f"track {cmd.track} follows a melody but model {engine.info.label} is "
                                     f"text-only; clear it with /track/{cmd.track}/melody/clear or use a "
                                     "MusicGen-Melody checkpoint")
    path = getattr(cmd, "path", None)
    continuation = {"path": str(path), "seconds": seconds} if path is not None else None
    sidecar = {"preset": preset.to_dict() if preset else None, "params": _params_json(params),
               "transport": {"tempo": t.tempo, "signature": t.signature, "position": t.position},
               "bars": bars, "length": length, "melody": _melody_record(melody), "continuation": continuation}
    return JobSpec(track=cmd.track, prompt=prompt, seconds=float(seconds), params=params, melody=melody,
                   continuation=continuation, chain=tuple(dict(c) for c in preset.chain) if preset else (),
                   tempo=t.tempo, sidecar=sidecar, stem_rate=stem_rate)


def _fmt_bpm(bpm: float) -> str:
    return str(int(bpm)) if float(bpm).is_integer() else f"{bpm:g}"


def sampling_params(params: dict[str, Any]) -> SamplingParams:
    from model.types import RequestError, SamplingParams

    try:
        return SamplingParams(**params)
    except (RequestError, TypeError) as e:
        raise ProtocolError("bad_args", f"those parameters do not go together: {e}") from None


def _params_json(p) -> dict[str, Any]:
    return {"guidance": p.guidance, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
            "greedy": p.greedy, "seed": p.seed}


def _melody_record(melody: dict[str, Any] | None) -> dict[str, Any] | None:
    if melody is None:
        return None
    if melody["kind"] == "chroma":
        import hashlib

        from bridge.session import chroma_from_text

        data = chroma_from_text(melody["data"])
        return {"kind": "chroma", "frame_rate": melody["frame_rate"], "frames": len(data) // 48,
                "sha256": hashlib.sha256(data).hexdigest()}
    return dict(melody)
