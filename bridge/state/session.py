"""The daemon's live session: per-track settings and the transport, saved atomically on every change.

State is replaced, never edited in place: a change builds the new state, writes it to a
temporary file, renames it over session.json, and only then becomes current. A failed write
therefore leaves both the file and the running daemon exactly as they were, and a restart
restores every track.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bridge.state.rules import ProtocolError
from bridge.state.session_check import check_session_data, check_track, check_transport
from plugin_host.tempo import TimeSignature, bars_to_seconds

FILE_NAME = "session.json"
VERSION = 1


def replace_json(path: Path, data: dict[str, Any], prefix: str, indent: int | None = None) -> None:
    """Write `path` whole or not at all: a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".json.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=indent, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SessionError(ValueError):
    """A session file that cannot be restored; the message names the file and the problem."""


@dataclass(frozen=True)
class Transport:
    """The daemon's own transport as the session keeps it; bridge.clock.typed follows it."""

    tempo: float = 120.0
    time_signature: TimeSignature = TimeSignature()
    playing: bool = False
    position: float = 0.0  # quarter notes from the session start

    @property
    def numerator(self) -> int:
        return self.time_signature.numerator

    @property
    def denominator(self) -> int:
        return self.time_signature.denominator

    @property
    def signature(self) -> str:
        return str(self.time_signature)

    def bars_to_seconds(self, bars: float) -> float:
        """4 bars at 120 bpm in 4/4 -> 8.0 s (plugin_host.tempo's rule)."""
        return bars_to_seconds(bars, self.tempo, self.time_signature)

    def to_json(self) -> dict[str, Any]:
        return {"tempo": self.tempo, "numerator": self.numerator, "denominator": self.denominator,
                "playing": self.playing, "position": self.position}

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> Transport:
        """A session file's transport, already checked by bridge.state.session_check."""
        return cls(tempo=float(t["tempo"]), time_signature=TimeSignature(int(t["numerator"]), int(t["denominator"])),
                   playing=bool(t["playing"]), position=float(t["position"]))


@dataclass(frozen=True)
class KeptTake:
    """The take a track keeps (`/track/<name>/keep`): the job that made it and the stem it wrote.

    The other takes stay on disk: keeping one sets them aside, it never deletes a file."""

    job: int
    path: str

    def to_json(self) -> dict[str, Any]:
        return {"job": self.job, "path": self.path}


@dataclass(frozen=True)
class TrackSettings:
    """One track's settings in the live session (what OSC changes; a stem is made from them). `melody` and `continuation` are plain JSON-able dicts (see docs/osc.md)."""

    prompt: str = ""
    preset: str = ""
    params: tuple[tuple[str, Any], ...] = ()
    melody: tuple[tuple[str, Any], ...] | None = None
    continuation: tuple[tuple[str, Any], ...] | None = None
    kept: KeptTake | None = None

    def params_dict(self) -> dict[str, Any]:
        return dict(self.params)

    def melody_dict(self) -> dict[str, Any] | None:
        return None if self.melody is None else dict(self.melody)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "preset": self.preset, "params": dict(self.params),
                "melody": self.melody_dict(),
                "continuation": None if self.continuation is None else dict(self.continuation),
                "kept": None if self.kept is None else self.kept.to_json()}


def _kept(d: dict[str, Any] | None) -> KeptTake | None:
    """session.json's "kept" object (checked by bridge.state.session_check first) as its record."""
    return None if d is None else KeptTake(int(d["job"]), str(d["path"]))


def _frozen(d: dict[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    return None if d is None else tuple(sorted(d.items()))


class LiveSession:
    """The daemon's session (session.json), changed by OSC; bridge.state.session_file.SessionFile is a TOML render plan.

    Tracks and transport of one session folder. Thread-safe; every change is saved before it shows."""

    def __init__(self, folder: str | os.PathLike, max_tracks: int = 64):
        self.folder = Path(folder).expanduser()
        self.path = self.folder / FILE_NAME
        self.max_tracks = max_tracks
        self._lock = threading.Lock()
        self._group_depth, self._group_dirty, self._group_before = 0, False, None
        self.transport = Transport()
        self.tracks: dict[str, TrackSettings] = {}
        self.next_job_id = 1
        if self.path.exists():
            self._load()

    # ------------------------------------------------------------ persistence

    def _load(self) -> None:
        where = str(self.path)
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SessionError(f"session file {where} cannot be read ({e}); move it away to start fresh") from None
        try:
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError(f"expected an object with \"version\": {VERSION}")
            check_session_data(data)  # every field in range before any is used (bridge.state.session_check)
            transport = Transport.from_json(data["transport"])
            tracks = {}
            for name, tr in dict(data["tracks"]).items():
                tracks[name] = TrackSettings(prompt=str(tr.get("prompt", "")), preset=str(tr.get("preset", "")),
                                             params=_frozen(dict(tr.get("params") or {})) or (),
                                             melody=_frozen(tr.get("melody")),
                                             continuation=_frozen(tr.get("continuation")),
                                             kept=_kept(tr.get("kept")))
            next_id = int(data.get("next_job_id", 1))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise SessionError(f"session file {where} is not a valid musicbridge session ({e}); "
                               "move it away to start fresh") from None
        self.transport, self.tracks, self.next_job_id = transport, tracks, max(1, next_id)

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, "transport": self.transport.to_json(),
                "tracks": {n: t.to_json() for n, t in sorted(self.tracks.items())},
                "next_job_id": self.next_job_id}

    def _write(self, data: dict[str, Any]) -> None:
        replace_json(self.path, data, prefix=".session.", indent=2)

    def _commit(self, transport: Transport, tracks: dict[str, TrackSettings], next_job_id: int,
                now: bool = False) -> None:
        """Save the new state, then make it current (caller holds the lock); inside `saved_together`,
        only make it current (the save comes at the end of the group)."""
        self._refuse_unloadable(transport, tracks)
        old = (self.transport, self.tracks, self.next_job_id)
        self.transport, self.tracks, self.next_job_id = transport, tracks, next_job_id
        if self._group_depth and not now:
            self._group_dirty = True
            return
        try:
            self._write(self.to_json())
        except (OSError, ValueError) as e:
            self.transport, self.tracks, self.next_job_id = old
            raise ProtocolError("failed", f"could not save the session to {self.path}: {e}") from None
        if self._group_depth:  # a save inside a group (a job id) saved the group's changes so far too
            self._group_before = (self.transport, self.tracks)

    def _refuse_unloadable(self, transport: Transport, tracks: dict[str, TrackSettings]) -> None:
        """ProtocolError("internal") for a change the next start would refuse to load: the loader's checks
        (bridge.state.session_check) run on what changed, so no value is ever saved that cannot be restored."""
        try:
            if transport is not self.transport:
                check_transport(transport.to_json())
            for name, tr in tracks.items():
                if self.tracks.get(name) is not tr:
                    check_track(name, tr.to_json())
        except ValueError as e:
            raise ProtocolError("internal", f"refused a change the session file could not load again: {e}") from None

    def unsaved(self) -> bool:
        """Whether a change inside `saved_together` is waiting for the group's save."""
        return self._group_dirty

    @contextlib.contextmanager
    def saved_together(self):
        """Changes inside are saved with one write (and one fsync) at the end, not one each.

        Why: a burst of valid changes (one bundle of a thousand prompts) once cost a 10 ms fsync
        each on the receive thread, stalling /ping for seconds. The caller holds back the
        acknowledgements of the changes until this block has ended without error, so "saved
        before acknowledged" still holds. On a failed save the group's changes are undone (job
        ids are kept: an id handed out is never reused) and ProtocolError("failed") is raised.
        """
        with self._lock:
            if self._group_depth == 0:
                self._group_before, self._group_dirty = (self.transport, self.tracks), False
            self._group_depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._group_depth -= 1
                if self._group_depth == 0 and self._group_dirty:
                    self._group_dirty = False
                    try:
                        self._write(self.to_json())
                    except (OSError, ValueError) as e:
                        self.transport, self.tracks = self._group_before  # type: ignore[misc]
                        raise ProtocolError("failed", f"could not save the session to {self.path}: {e}; "
                                                      "the changes of this burst were undone") from None

    def save(self) -> None:
        with self._lock:
            self._write(self.to_json())

    # ------------------------------------------------------------ changes

    def track(self, name: str) -> TrackSettings | None:
        return self.tracks.get(name)

    def update_track(self, name: str, **changes: Any) -> TrackSettings:
        """Create or change a track; `params`, `melody`, `continuation` are given as dicts (or None)."""
        for k in ("params", "melody", "continuation"):
            if k in changes:
                changes[k] = _frozen(changes[k]) if k != "params" else (_frozen(changes[k]) or ())
        with self._lock:
            if name not in self.tracks and len(self.tracks) >= self.max_tracks:
                raise ProtocolError("limit", f"this session already has {self.max_tracks} tracks, the limit; "
                                             "delete one with /track/<name>/delete")
            new = replace(self.tracks.get(name, TrackSettings()), **changes)
            self._commit(self.transport, {**self.tracks, name: new}, self.next_job_id)
            return new

    def clear_track(self, name: str) -> None:
        self._require(name)
        with self._lock:
            self._commit(self.transport, {**self.tracks, name: TrackSettings()}, self.next_job_id)

    def delete_track(self, name: str) -> None:
        self._require(name)
        with self._lock:
            self._commit(self.transport, {n: t for n, t in self.tracks.items() if n != name}, self.next_job_id)

    def _require(self, name: str) -> TrackSettings:
        t = self.tracks.get(name)
        if t is None:
            raise ProtocolError("not_found", f"there is no track {name!r}; /tracks lists them")
        return t

    def update_transport(self, **changes: Any) -> Transport:
        with self._lock:
            new = replace(self.transport, **changes)
            self._commit(new, self.tracks, self.next_job_id)
            return new

    def take_job_id(self) -> int:
        """A job id never used before in this session folder (ids survive restarts)."""
        with self._lock:
            n = self.next_job_id
            self._commit(self.transport, self.tracks, n + 1, now=True)  # durable before the job is announced
            return n

