"""What the panel shows, read from a running daemon: the clock, tracks, jobs, jams and stems.

Read-only and lock-light: every read is of state the daemon already keeps (the session's tracks
dict is replaced on each change, job and jam fields are plain attributes, a jam's history is
only appended to), copied in one step, so the jam's generation loop never waits for the panel.
The records are frozen dataclasses with their own to_json; `PanelView.snapshot()` gathers them
and the history the panel keeps itself (meters over the last minute, time-left estimates).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bridge.live.jam import bins_text
from presets import load_preset, preset_files

log = logging.getLogger("musicbridge.panel")

METER_SECONDS = 60.0  # the meters' plots cover the last minute
METER_EVERY = 0.5  # seconds between two meter samples
ROLL_SECONDS = 8.0  # the piano roll strip shows the last 8 s of live notes
CHUNKS_SHOWN = 8  # chroma strips of the last 8 chunks of a jam
JOBS_SHOWN = 40


def _num(v: Any) -> float | None:
    """A JSON-safe number: None for missing, infinite or NaN values."""
    if v is None:
        return None
    f = float(v)
    return round(f, 4) if math.isfinite(f) else None


@dataclass(frozen=True)
class ClockView:
    source: str
    tempo: float
    numerator: int
    denominator: int
    playing: bool
    beat: float
    age: float  # seconds since the leading clock last moved, -1 for never

    def to_json(self) -> dict[str, Any]:
        bar = int(self.beat // self.numerator) + 1 if self.beat >= 0 else 1
        beat_in_bar = self.beat - (bar - 1) * self.numerator + 1
        return {"source": self.source, "tempo": round(self.tempo, 3), "signature": f"{self.numerator}/{self.denominator}",
                "playing": self.playing, "bar": bar, "beat": round(beat_in_bar, 2), "age": round(self.age, 2),
                "typed": self.source == "typed"}


@dataclass(frozen=True)
class TrackView:
    name: str
    prompt: str
    preset: str
    params: tuple[tuple[str, Any], ...]
    chain: tuple[str, ...]
    gain: float
    pan: float
    melody: str  # what the track's melody is: "", "live notes", "midi", "audio", "notes", "chroma"
    notes: tuple[tuple[int, float, float], ...]  # live notes (pitch, start, end) in seconds from now (<= 0)
    kept: int  # the job id of the take the track keeps (/track/<name>/keep), 0 for none
    kept_name: str  # that take's file name

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "prompt": self.prompt, "preset": self.preset, "params": dict(self.params),
                "chain": list(self.chain), "gain": self.gain, "pan": self.pan, "melody": self.melody,
                "notes": [[p, round(a, 3), round(b, 3)] for p, a, b in self.notes],
                "kept": self.kept, "kept_name": self.kept_name}


@dataclass(frozen=True)
class JobView:
    id: int
    track: str
    state: str
    fraction: float
    seconds: float
    eta: float | None  # seconds left, estimated from the progress so far
    path: str
    error: str
    take: int
    of: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "track": self.track, "state": self.state, "fraction": round(self.fraction, 4),
                "seconds": round(self.seconds, 3), "eta": _num(self.eta), "path": self.path, "error": self.error,
                "take": self.take, "of": self.of}


@dataclass(frozen=True)
class ChunkView:
    """One jam chunk: the chroma it was conditioned on, the chroma of its audio, and their cosine."""

    index: int
    bar: float
    condition: str  # one character per chroma frame: 0-9, a, b the pitch class, '.' silence
    output: str  # the same for what came out ('' until scored)
    cosine: float | None  # MusicGen's melody metric (model.conditioning.melody.chroma_cosine_similarity)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "bar": round(self.bar, 3), "condition": self.condition, "output": self.output,
                "cosine": _num(self.cosine)}


@dataclass(frozen=True)
class JamView:
    track: str
    state: str
    behind: bool
    chunks: int
    status: tuple[tuple[str, Any], ...]
    meters: tuple[tuple[str, tuple[float | None, ...]], ...]  # name -> samples, METER_EVERY apart, oldest first
    strips: tuple[ChunkView, ...]

    def to_json(self) -> dict[str, Any]:
        return {"track": self.track, "state": self.state, "behind": self.behind, "chunks": self.chunks,
                "status": dict(self.status), "meters": {k: list(v) for k, v in self.meters},
                "strips": [c.to_json() for c in self.strips]}


@dataclass(frozen=True)
class StemView:
    job: int
    track: str
    name: str
    seconds: float
    take: int
    of: int
    group: str  # takes of one --variations request share a group
    kept: bool  # the take its track keeps (the session's record, so it outlives the page and the daemon)
    set_aside: bool  # another take of the kept take's group: still on disk, not the track's stem

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "track": self.track, "name": self.name, "seconds": round(self.seconds, 3),
                "take": self.take, "of": self.of, "group": self.group, "kept": self.kept,
                "set_aside": self.set_aside}


METERS = ("realtime_factor", "chunk_latency", "buffered", "underruns", "behind", "note_latency")


@dataclass
class _JamMemory:
    """What the panel remembers of one jam between snapshots."""

    jam: Any
    samples: dict[str, deque] = field(default_factory=lambda: {m: deque(maxlen=int(METER_SECONDS / METER_EVERY))
                                                               for m in METERS})
    last_sample: float = -math.inf
    scored: dict[int, tuple[str, float | None]] = field(default_factory=dict)


class PanelView:
    """Snapshots of one daemon for the panel; call from one thread (the panel's)."""

    def __init__(self, daemon, clock=time.monotonic):
        self.daemon = daemon
        self._clock = clock
        self._started: dict[int, tuple[float, float]] = {}  # job id -> (first seen running, fraction then)
        self._jams: dict[str, _JamMemory] = {}
        self._presets: tuple[float, list[str]] = (-math.inf, [])
        self._chains: dict[str, tuple[float, tuple[str, ...]]] = {}
        self.failures = 0

    def presets(self) -> list[str]:
        """Preset names for the page's menu, looked up again every few seconds (a user may add a file)."""
        at, names = self._presets
        if self._clock() - at > 5.0:
            names = list(preset_files())
            self._presets = (self._clock(), names)
        return names

    def snapshot(self) -> dict[str, Any]:
        """Every part of the page's state, JSON-able, keyed by part (the server sends the parts that changed)."""
        parts = {"info": self.info, "clock": lambda: self.clock().to_json(),
                 "tracks": lambda: [t.to_json() for t in self.tracks()],
                 "jobs": lambda: [j.to_json() for j in self.jobs()],
                 "jams": lambda: [j.to_json() for j in self.jams()],
                 "stems": lambda: [s.to_json() for s in self.stems()]}
        out = {}
        for name, read in parts.items():
            try:
                out[name] = read()
            except Exception:  # noqa: BLE001 - one part that cannot be read leaves the others live; logged rarely
                self.failures += 1
                if self.failures <= 3 or self.failures % 1000 == 0:
                    log.exception("panel: reading the daemon's %s failed (%d times so far)", name, self.failures)
        return out

    def info(self) -> dict[str, Any]:
        d = self.daemon
        info = d.engine.info
        return {"model": info.label, "device": info.device, "dtype": info.dtype, "osc_port": d.server.port,
                "live_audio": d.audio is not None, "melody_model": bool(getattr(d.engine, "is_melody", False)),
                "presets": self.presets()}

    # ------------------------------------------------------------ parts

    def clock(self) -> ClockView:
        st = self.daemon.clock.state()
        return ClockView(st.source, float(st.tempo), int(st.signature.numerator), int(st.signature.denominator),
                         bool(st.playing), float(st.beat), float(st.age))

    def tracks(self) -> list[TrackView]:
        d = self.daemon
        tracks = d.session.tracks  # replaced whole on every change: this dict is a consistent copy
        now = d.live.clock()
        out = []
        for name in sorted(tracks):
            tr = tracks[name]
            chain, gain, pan = self._mix(name, tr)
            m = tr.melody_dict()
            notes = self._notes(name, now)
            melody = m["kind"] if m else ("live notes" if notes or name in d.jams else "")
            kept = tr.kept
            out.append(TrackView(name, tr.prompt, tr.preset, tuple(sorted(tr.params_dict().items())), chain,
                                 gain, pan, melody, notes, kept.job if kept else 0,
                                 Path(kept.path).name if kept else ""))
        return out

    def _mix(self, name: str, tr) -> tuple[tuple[str, ...], float, float]:
        """The track's chain (plugin names, from its preset) and its gain and pan (a jam's own mix, else unity)."""
        chain = self._chain(tr.preset) if tr.preset else ()
        jam = self.daemon.jams.get(name)
        gain, pan = (float(jam._mix[0]), float(jam._mix[1])) if jam is not None else (1.0, 0.0)
        return chain, gain, pan

    def _chain(self, preset: str) -> tuple[str, ...]:
        """A preset's chain as plugin names, read from its file at most every few seconds (not 10 times a second)."""
        at, chain = self._chains.get(preset, (-math.inf, ()))
        if self._clock() - at > 5.0:
            try:
                chain = tuple(str(c.get("plugin", "?")) for c in load_preset(preset).chain)
            except Exception:  # noqa: BLE001 - a preset that cannot load shows so; the OSC path says why
                chain = ("(preset cannot load)",)
            self._chains[preset] = (self._clock(), chain)
        return chain

    def _notes(self, name: str, now: float) -> tuple[tuple[int, float, float], ...]:
        router = self.daemon.live.notes
        melodies = [router.existing(name)]
        if melodies[0] is not None and router.hears_omni(name):
            melodies.append(router.omni)
        out = []
        for m in melodies:
            if m is None:
                continue
            for pitch, on, off in m.notes():
                if off > now - ROLL_SECONDS:
                    out.append((int(pitch), max(on - now, -ROLL_SECONDS), min(off - now, 0.0)))
        return tuple(sorted(out, key=lambda n: n[1]))

    def jobs(self) -> list[JobView]:
        now = self._clock()
        jobs = sorted(list(self.daemon.jobs.jobs.values()), key=lambda j: -j.id)
        shown = [j for j in jobs if not j.finished] + [j for j in jobs if j.finished][:JOBS_SHOWN]
        out = []
        for j in sorted(shown, key=lambda j: -j.id):
            eta = None
            state, fraction = j.state, float(j.fraction)
            if state == "running":
                start = self._started.setdefault(j.id, (now, fraction))
                done = fraction - start[1]
                if done > 0.01:
                    eta = (now - start[0]) * (1.0 - fraction) / done
            else:
                self._started.pop(j.id, None)
            var = j.plan.context.get("variation") or {}
            error = j.error[1] if j.error else ""
            out.append(JobView(j.id, j.plan.name, state, fraction, float(j.plan.seconds), eta,
                               str(j.path) if j.path else "", error, int(var.get("take", 1)), int(var.get("of", 1))))
        return out

    def stems(self) -> list[StemView]:
        tracks = self.daemon.session.tracks  # replaced whole on every change: a consistent copy
        kept = {tr.kept.job for tr in tracks.values() if tr.kept is not None}
        found = []
        for j in sorted(list(self.daemon.jobs.jobs.values()), key=lambda j: j.id):
            if j.state != "done" or j.path is None:
                continue
            var = j.plan.context.get("variation") or {}
            take, of = int(var.get("take", 1)), int(var.get("of", 1))
            seed = int(j.plan.request["params"].get("seed") or 0) - (take - 1)
            group = f"{j.plan.name}/{seed}/{of}" if of > 1 else f"job{j.id}"
            found.append((j, take, of, group))
        kept_groups = {group for j, _, _, group in found if j.id in kept}
        out = [StemView(j.id, j.plan.name, j.path.name, float(j.plan.seconds), take, of, group, j.id in kept,
                        group in kept_groups and j.id not in kept) for j, take, of, group in found]
        return out[-JOBS_SHOWN:]

    def stem_path(self, job_id: int):
        """The file a finished job wrote, or None: the panel serves only stems the daemon made."""
        j = self.daemon.jobs.jobs.get(job_id)
        return j.path if j is not None and j.state == "done" and j.path is not None else None

    # ------------------------------------------------------------ jams

    def jams(self) -> list[JamView]:
        now = self._clock()
        out = []
        for name, jam in sorted(dict(self.daemon.jams).items()):
            mem = self._jams.get(name)
            if mem is None or mem.jam is not jam:  # a new jam on this track starts new plots
                mem = self._jams[name] = _JamMemory(jam)
            st = jam.status()
            if now - mem.last_sample >= METER_EVERY and st["state"] not in ("stopped", "failed"):
                mem.last_sample = now
                for m in METERS:
                    v = st.get(m)
                    mem.samples[m].append(_num(float(v)) if v is not None else None)
            strips = tuple(self._strip(jam, mem, e) for e in list(jam.history[-CHUNKS_SHOWN:]))
            status = {k: (_num(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                      for k, v in st.items()}
            out.append(JamView(name, st["state"], bool(st["behind"]), int(st["chunks"]), tuple(status.items()),
                               tuple((m, tuple(mem.samples[m])) for m in METERS), strips))
        return out

    def _strip(self, jam, mem: _JamMemory, entry: dict[str, Any]) -> ChunkView:
        k = int(entry["index"])
        cond = entry.get("chroma")
        if k not in mem.scored:
            pieces = next((p for i, p in list(jam.recent_audio) if i == k), None)
            if pieces is not None:
                mem.scored[k] = self._score(jam, cond, pieces)
                while len(mem.scored) > 4 * CHUNKS_SHOWN:
                    mem.scored.pop(min(mem.scored))
        output, cosine = mem.scored.get(k, ("", None))
        return ChunkView(k, float(entry["bar"]), bins_text(entry.get("melody_bins") or []), output, cosine)

    def _score(self, jam, cond, pieces: list[np.ndarray]) -> tuple[str, float | None]:
        """The chroma of a chunk's audio (the model's own extractor) and its cosine with the conditioning."""
        # torch loads only where this runs
        from model.conditioning.melody import audio_to_chroma, chroma_cosine_similarity

        if not pieces:
            return "", None
        try:
            audio = np.concatenate(pieces, axis=1)
            eng = jam.engine
            out = audio_to_chroma(audio, eng.sample_rate, eng.chroma_frame_rate)
            bins = [int(np.argmax(r)) if r.any() else -1 for r in out]
            cosine = chroma_cosine_similarity(cond, out) if cond is not None and len(cond) else None
            return bins_text(bins), cosine
        except Exception:  # noqa: BLE001 - a chunk that cannot be scored shows no score; the jam plays on
            log.debug("could not score a jam chunk", exc_info=True)
            return "", None
