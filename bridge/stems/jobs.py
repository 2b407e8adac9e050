"""Generation jobs: a priority queue, one worker that batches jobs into engine calls, cancel, progress.

Jobs are accepted instantly (the OSC thread only queues them) and run one batch at a time on
a worker thread, since the engine holds one model. Jobs whose audio has the same length and
the same kind of conditioning share one `engine.generate` call. A ticker reports the progress
of running jobs at least once a second, so a DAW sees a job is alive even between engine
callbacks. Every job ends in exactly one event: done, cancelled or failed.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bridge.osc.protocol import Continue, Generate, Limits, ProtocolError
from bridge.stems.output import finish_audio, write_planned_stem
from bridge.stems.plan import PlanError, StemPlan, check_params, plan_stem, sound
from bridge.stems.request import build_request, session_melody_record
from bridge.stems.write_errors import describe_write_error
from model.types import Cancelled, RequestError, melody_refusal

if TYPE_CHECKING:
    from bridge.state.session import TrackSettings, Transport
    from model.types import GenerationRequest, SamplingParams
    from presets import Preset

log = logging.getLogger("musicbridge.jobs")

Address = tuple[str, int]
STATES = ("queued", "running", "done", "cancelled", "failed")
HISTORY = 1000


@dataclass(eq=False)
class Job:
    """One queued stem: its plan (bridge.stems.plan.StemPlan), who to tell, and how it is going."""

    id: int
    plan: StemPlan
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
        self.inputs = None  # bridge.osc.input_files.Inputs: checked, pinned, limited reads of takes and melody files
        self.jobs: dict[int, Job] = {}
        self._queued: list[Job] = []
        self._running: list[Job] = []
        self._live: list[Job] = []  # jobs played live (run_live), each on its own thread
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

    def submit(self, plan: StemPlan, reply_to: Address, priority: int, new_id: Callable[[], int],
               accepted: Callable[[Job], None] | None = None) -> Job:
        """Queue a job (it runs later); ProtocolError busy when full or shutting down.

        `new_id` is called only once the job is sure to be queued, so a refused job uses no id.
        `accepted(job)` runs before the worker can see the job, so "accepted" always precedes
        the job's first progress report.
        """
        with self._cond:
            if self._closing:
                raise ProtocolError("busy", "the daemon is shutting down and accepts no new jobs")
            self._take_places(1, "the job needs a place", "wait for one to finish or cancel one")
            job = Job(new_id(), plan, reply_to, priority, next(self._seq))
            self._announce(job, accepted)
            self._queued.append(job)
            self._forget_old()
            self._cond.notify_all()
        return job

    def submit_all(self, plans: list[StemPlan], reply_to: Address, priority: int, new_id: Callable[[], int],
                   accepted: Callable[[Job], None] | None = None) -> list[Job]:
        """Queue several jobs at once (the takes of one variations request): all or none, and
        the worker sees them together, so they share one engine call (up to max_batch). Where one
        cannot be accepted, the takes announced before it are withdrawn (cancelled) and none runs."""
        withdrawn: list[Job] = []
        try:
            with self._cond:
                if self._closing:
                    raise ProtocolError("busy", "the daemon is shutting down and accepts no new jobs")
                self._take_places(len(plans), f"{len(plans)} variations need {len(plans)} places",
                                  "wait, or lower variations")
                jobs: list[Job] = []
                try:
                    for plan in plans:
                        job = Job(new_id(), plan, reply_to, priority, next(self._seq))
                        self._announce(job, accepted)
                        jobs.append(job)
                except BaseException:
                    withdrawn = jobs
                    raise
                self._queued.extend(jobs)
                self._forget_old()
                self._cond.notify_all()
            return jobs
        finally:
            for job in withdrawn:  # outside the queue's lock, as every final event is sent
                self._finish(job, "cancelled", ())

    def run_live(self, plan: StemPlan, reply_to: Address, new_id: Callable[[], int],
                 play: Callable[[Job, Any, Callable[[float], None]], Any],
                 accepted: Callable[[Job], None] | None = None) -> Job:
        """A job someone listens to (`/track/<name>/play`): it skips the queue and runs now on its own
        thread, its steps ahead of offline ones. `play(job, request, progress)` generates and plays it
        and returns the audio (None: cancelled); the stem is then finished and written as for any job."""
        with self._cond:
            if self._closing:
                raise ProtocolError("busy", "the daemon is shutting down and accepts no new jobs")
            self._take_places(1, "the job needs a place", "wait for one to finish or cancel one")
            job = Job(new_id(), plan, reply_to, 0, next(self._seq), state="running")
            self._announce(job, accepted)
            self._live.append(job)
            self._forget_old()
        threading.Thread(target=self._run_live, args=(job, play), name=f"live-job-{job.id}", daemon=True).start()
        return job

    def _announce(self, job: Job, accepted: Callable[[Job], None] | None) -> None:
        """Register a new job and run `accepted(job)` (the daemon records it in its journal, then
        answers /job/accepted). A job whose acceptance raises is forgotten and the error raised:
        it was never accepted. Call holding _cond."""
        self.jobs[job.id] = job
        if accepted is not None:
            try:
                accepted(job)
            except BaseException:
                del self.jobs[job.id]
                raise

    def _take_places(self, n: int, what: str, hint: str) -> None:
        """ProtocolError busy unless n more jobs fit under max_queued (call holding _cond); `what` says
        who needs the places. Live plays count too: each runs at once on its own thread, so without
        the limit a burst of /play would start as many generations side by side."""
        held = len(self._queued) + len(self._live)
        if held + n > self.max_queued:
            raise ProtocolError("busy", f"{what} and {self.max_queued - held} of {self.max_queued} are free "
                                        f"({len(self._queued)} queued, {len(self._live)} playing live); {hint}")

    def _run_live(self, job: Job, play) -> None:
        self.on_event(job, "progress", (0.0,))
        try:
            request = build_request(job.plan.request, self.engine, f"job {job.id}", cancel=job.cancel)

            def progress(f: float) -> None:
                job.fraction = max(job.fraction, min(float(f), 1.0))

            audio = play(job, request, progress)
            if audio is None or job.cancel.is_set():
                self._finish(job, "cancelled", ())
                return
            job.fraction = 1.0
            job.plan.context["job"] = job.id
            finished, report = finish_audio(audio, self.engine.sample_rate, job.plan.render)
            job.path = write_planned_stem(finished, self.engine.sample_rate, job.plan, self.engine_record,
                                          [job.plan.request], 0, report, self.stems_dir)
            self._finish(job, "done", (str(job.path),))
        except ProtocolError as e:
            self._finish(job, "failed", (e.code, e.message))
        except Exception as e:  # noqa: BLE001 - this job fails, the daemon goes on
            log.exception("live job %d failed", job.id)
            self._finish(job, "failed", ("failed", f"playing while generating failed: {type(e).__name__}: {e}"))
        finally:
            with self._cond:
                self._live.remove(job)
                self._cond.notify_all()

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

    def take_of(self, job_id: int, track: str) -> Job:
        """A finished take of `track` whose stem is on disk (what /track/<name>/keep may keep); ProtocolError
        naming why not: an unknown job (not_found), another track's, one not done (bad_args), a stem gone."""
        job = self.get(job_id)
        if job.plan.name != track:
            raise ProtocolError("bad_args", f"job {job_id} is a take of track {job.plan.name!r}, not of {track!r}",
                                job_id)
        if job.state != "done" or job.path is None:
            raise ProtocolError("bad_args", f"job {job_id} is {job.state}, not done: only a finished take can be "
                                            "kept", job_id)
        if not Path(job.path).is_file():
            raise ProtocolError("not_found", f"job {job_id}'s stem {job.path} is no longer on disk", job_id)
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
            while (self._running or self._live) and time.monotonic() < deadline:
                self._cond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            for job in self._running + self._live:
                job.cancel.set()
                log.info("stopping job %d (track %s): still running when the grace period ended", job.id,
                         job.plan.name)
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
        key = batch_key(head.plan, self.engine)
        batch = [head]
        if key is not None:
            for j in sorted(self._queued, key=lambda j: (-j.priority, j.seq)):
                if len(batch) >= self.max_batch:
                    break
                if j is not head and batch_key(j.plan, self.engine) == key:
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
        requests, ready = [], []
        for job in batch:
            self.on_event(job, "progress", (0.0,))
            try:
                requests.append(self.request_of(job))
                ready.append(job)
            except ProtocolError as e:  # from bridge.osc.input_files: a file refused where it is opened
                if job.cancel.is_set():  # cancelled while its take was being read
                    self._finish(job, "cancelled", ())
                else:
                    self._finish(job, "failed", (e.code, e.message))
            except Exception as e:  # noqa: BLE001 - melody/take loading errors end this job only
                self._finish(job, "failed", ("failed", f"could not prepare the job: {e}"))
        if not ready:
            return
        log.info("running job%s %s on the engine (%s)", "s" if len(ready) > 1 else "",
                 ", ".join(str(j.id) for j in ready), ", ".join(f"{j.plan.name} {j.plan.seconds:g} s" for j in ready))

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
        records = [j.plan.request for j in ready]
        for index, (job, audio) in enumerate(zip(ready, audios, strict=True)):
            if audio is None or job.cancel.is_set():
                self._finish(job, "cancelled", ())
                continue
            job.fraction = 1.0
            self.engine.gate.offline_turn(job.cancel.is_set)  # between live chunks (model/decode/scheduler.py)
            try:
                path = self.write_stem(job, audio, records, index)
            except Exception as e:  # noqa: BLE001 - disk full, chain error: this job fails, the daemon goes on

                need = int(job.plan.render.get("samples") or 0) * 2 * 4 + (1 << 20)  # stereo float, generous
                self._finish(job, "failed", ("failed", describe_write_error(e, self.stems_dir, need)))
                continue
            job.path = path
            self._finish(job, "done", (str(path),))

    def request_of(self, job: Job) -> GenerationRequest:
        """The engine request of a job (melody chroma and take loaded now, on the calling worker)."""
        return build_request(job.plan.request, self.engine, f"job {job.id}", cancel=job.cancel,
                             inputs=self.inputs)

    def write_stem(self, job: Job, audio: np.ndarray, batch: list[dict[str, Any]] | None = None,
                   index: int = 0) -> Path:
        """The job's stem on disk: fitted to the grid, chained, placed, with the sidecar recording
        `batch` (the request records of the engine call that made it; default: this job alone)."""
        job.plan.context["job"] = job.id
        finished, report = finish_audio(audio, self.engine.sample_rate, job.plan.render)
        return write_planned_stem(finished, self.engine.sample_rate, job.plan, self.engine_record,
                                  batch or [job.plan.request], index, report, self.stems_dir)

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


def batch_key(plan: StemPlan, engine) -> tuple | None:
    """Jobs with equal keys can share one engine call; None: this job runs alone."""
    if plan.request["continuation"] is not None:
        return None
    return (engine.frames_for(plan.request["seconds"]), plan.request["melody"] is not None)


def track_sound(name: str, track: TrackSettings, preset: Preset | None, tempo: float) -> tuple[str, SamplingParams]:
    """(prompt, SamplingParams) of a live track: its prompt or its preset's, "<bpm> bpm" unless the
    preset says add_bpm = false, the preset's params with the track's own on top, and a seed."""
    base = track.prompt or (preset.prompt if preset else "")
    if not base:
        raise ProtocolError("bad_args", f"track {name} has no prompt; send /track/{name}/prompt "
                                        f"or /track/{name}/preset first")
    try:
        return sound(base, preset.add_bpm if preset else True, tempo,
                     dict(preset.params) if preset else {}, sampling_only(track.params_dict()))
    except RequestError as e:
        raise ProtocolError("bad_args", f"those parameters do not go together: {e}") from None


def sampling_only(params: dict[str, Any]) -> dict[str, Any]:
    """A track's params less the ones that are not sampling parameters (variations)."""
    return {k: v for k, v in params.items() if k != "variations"}


def variation_plans(plan: StemPlan, n: int) -> list[StemPlan]:
    """n takes of one plan, each with its own seed (the plan's, +1, +2, ...); their jobs share
    a batch key, so the queue runs them in one engine pass (up to its batch size)."""
    if n <= 1:
        return [plan]
    seed = int(plan.request["params"]["seed"])
    plans = []
    for i in range(n):
        p = copy.deepcopy(plan)
        p.request["params"]["seed"] = (seed + i) % 2**63
        p.context["variation"] = {"take": i + 1, "of": n}
        plans.append(p)
    return plans


def check_track_params(preset: Preset | None, params: dict[str, Any]) -> None:
    """ProtocolError bad_args unless the preset's params with these on top go together."""
    try:
        check_params(dict(preset.params) if preset else {}, sampling_only(params))
    except RequestError as e:
        raise ProtocolError("bad_args", f"those parameters do not go together: {e}") from None


def plan_job(cmd: Generate | Continue, track: TrackSettings, preset: Preset | None, transport: Transport, engine,
             limits: Limits, stem_rate: int = 48000) -> StemPlan:
    """The stem a /track/<name>/generate or /continue asks for, from the track, its preset and the transport.

    The same plan a session file's track gets (bridge.stems.plan): the prompt is the track's own,
    else its preset's, with "<bpm> bpm" unless the preset says add_bpm = false; bars become
    seconds at the transport tempo and time signature (4 bars at 120 bpm in 4/4 = 8.0 s) and
    the take is fitted to the bar grid; the stem sits at the transport position (its BWF time
    reference); a seed is drawn when the track has none, so the sidecar can regenerate it.
    """
    t = transport
    prompt, params = track_sound(cmd.track, track, preset, t.tempo)
    melody = track.melody_dict()
    if melody is not None and melody_refusal(engine):
        raise ProtocolError("model", f"track {cmd.track} follows a melody, but {melody_refusal(engine)}; "
                                     f"or clear it with /track/{cmd.track}/melody/clear")
    path = getattr(cmd, "path", None)
    continuation = {"path": str(path), "seconds": float(cmd.seconds), "sha256": None} if path is not None else None
    try:
        plan = plan_stem(cmd.track, prompt=prompt, params=params, tempo=t.tempo, signature=t.time_signature,
                         bars=getattr(cmd, "bars", None), seconds=cmd.seconds, model_rate=engine.sample_rate,
                         target_rate=stem_rate, start_quarters=t.position,
                         chain=preset.chain if preset else (), melody=session_melody_record(melody, t.tempo),
                         continuation=continuation,
                         context={"preset": preset.to_dict() if preset else None,
                                  "transport": {"tempo": t.tempo, "signature": t.signature, "position": t.position}})
    except PlanError as e:
        raise ProtocolError("limit", f"{e}") from None
    if plan.seconds > limits.max_seconds:
        raise ProtocolError("limit", f"{plan.length_text} is over this daemon's limit of {limits.max_seconds:g} s "
                                     "per job")
    return plan
