"""The OSC daemon: messages in, session changes and jobs out, replies back to the sender.

Wiring only: bridge.osc.udp receives, bridge.osc.protocol turns each message into a command (or an
error), this module applies it to bridge.state.session or queues it on bridge.stems.jobs, and answers.
Handlers run on the OSC thread and never run inference; they change state or queue a job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge.osc import protocol as P
from bridge.osc.access import Access
from bridge.clock import FollowSpec
from bridge.clock.hub import ClockHub, JamGridSource, output_clock
from bridge.osc.input_files import InputLimits, Inputs
from bridge.state.journal import Entry, Journal, remove_stale_temporaries
from bridge.stems.jobs import Job, JobQueue, check_track_params, plan_job, variation_plans
from bridge.stems.plan import placed_at
from bridge.osc.udp import Address, OscServer
from bridge.osc.paths import PathPolicy
from bridge.osc.protocol import Limits, ProtocolError
from bridge.osc.reply_budget import EVENT_RESERVE, ReplyBudget
from bridge.state.session import KeptTake, LiveSession
from bridge.state.session_check import chroma_to_text
from model.types import melody_refusal
from bridge.live.control import LiveControl
from bridge.stems.output import engine_record
from presets import PresetError, load_preset, preset_files
from plugin_host.tempo import TimeSignature

log = logging.getLogger("musicbridge.serve")


@dataclass
class DaemonConfig:
    host: str = "127.0.0.1"
    port: int = 9010
    reply_to: Address | None = None
    session_dir: Path = Path("musicbridge-session")
    stems_dir: Path | None = None  # default: <session_dir>/stems
    allow_dirs: tuple[Path, ...] = ()
    grace: float = 10.0
    limits: Limits = field(default_factory=Limits)
    stem_rate: int = 48000
    allow_from: tuple[str, ...] = ()  # CIDR networks that may send at all; empty: loopback only
    key: str | None = None  # senders other than 127.0.0.1/::1 must /hello with it first
    input_limits: InputLimits = field(default_factory=InputLimits)
    resume: bool = False  # queue jobs a crash interrupted again instead of reporting them failed
    follow: FollowSpec = field(default_factory=FollowSpec)  # the clock that leads (serve --follow)
    ardour: Address | None = None    # Ardour's OSC port, asked for transport feedback (--follow osc)
    done_list: Path | None = None    # every finished stem is appended here (daw/reaper imports it)


ERROR_REPLIES_PER_SECOND = 200
# what a host may send before /hello with --key: the key itself, padding, and the address proof
# (which reveals nothing and changes nothing but where replies may go)
NO_HELLO_NEEDED = frozenset({"/hello", "/pad", "/cookie", "/prove"})


class _LogLimiter:
    """At most `per_second` events a second of a noisy kind (log lines, error replies); the rest are counted.

    A token bucket, not a window per clock second: up to `per_second` events at once, then one
    more every 1/per_second s. A window that a flood filled stayed shut until the clock reached
    the next whole second, so a good client's one bad message, sent up to a second after a flood
    of junk had ended, went unanswered; with the bucket, once a flood stops the next event after
    1/per_second s is allowed. Over any t seconds at most per_second * (1 + t) are allowed, as
    with the window. What was refused is logged as one count at most once a second.
    """

    def __init__(self, per_second: int = 5, what: str = "rejected messages were not logged",
                 clock: Callable[[], float] = time.monotonic):
        self.per_second, self.what, self._clock = per_second, what, clock
        self._lock = threading.Lock()
        self.tokens = float(per_second)
        self.refilled = self.reported = clock()
        self.dropped = 0

    def allow(self) -> bool:
        with self._lock:
            now = self._clock()
            self.tokens = min(float(self.per_second), self.tokens + (now - self.refilled) * self.per_second)
            self.refilled = now
            if self.dropped and now - self.reported >= 1.0:
                log.info("(%d more %s)", self.dropped, self.what)
                self.dropped, self.reported = 0, now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            if not self.dropped:
                self.reported = now  # the count covers at least the second from its first refusal
            self.dropped += 1
            return False


def handles(*classes: type) -> Callable:
    """Mark a Daemon method as the handler of these command classes (the dispatch table's entries)."""
    def mark(fn: Callable) -> Callable:
        fn.handles = classes  # type: ignore[attr-defined]
        return fn
    return mark


class Daemon:
    """A running bridge; a context manager that binds the socket on enter and stops cleanly on exit."""

    def __init__(self, engine, config: DaemonConfig, audio=None, notes=None):
        """audio: an open plugin_host.output.AudioOutput for live output and xrun counts, or None.
        notes: a bridge.live.notes.NoteRouter fed by --midi-in ports (None: OSC notes only)."""

        self.engine, self.config, self.audio = engine, config, audio
        self.stems_dir = Path(config.stems_dir or Path(config.session_dir) / "stems")
        self.paths = PathPolicy([self.stems_dir, *config.allow_dirs])
        self.session = LiveSession(config.session_dir, max_tracks=config.limits.max_tracks)
        self.jobs = JobQueue(engine, self.stems_dir, self._job_event, max_queued=config.limits.max_queued,
                             engine_record=engine_record(engine))
        self.inputs = Inputs(self.paths, config.input_limits)
        self.jobs.inputs = self.inputs
        self.access = Access(config.allow_from, config.key)
        self.budget = ReplyBudget()
        self.journal = Journal(config.session_dir)
        self.server = OscServer(config.host, config.port, self.handle, self._bad_packet, budget=self.budget,
                                admit=self.access.admits, group=self.session.saved_together,
                                on_group_failed=self._group_failed, unsaved=self.session.unsaved)
        self._ok_log = _LogLimiter(20, "changes were not logged: too many at once")
        self._budget_log = _LogLimiter(1, "replies over the reply byte budget were dropped")
        self._own_initiative = threading.local()
        self.clock = ClockHub(self.session, config.follow, clock=output_clock(audio), ardour=config.ardour,
                              send=self.server.send)
        self._limiter = _LogLimiter()
        self.tracebacks = self.server.tracebacks  # one rate limit for every traceback the OSC path logs
        self._error_replies = _LogLimiter(ERROR_REPLIES_PER_SECOND, "error replies were not sent: too many "
                                                                    "bad messages at once")
        # jams, live notes and the typed bar grid (bridge/live/control.py)
        # a jam reads stored melody files through the same input limits as jobs
        self.live = LiveControl(engine, audio, notes, JamGridSource(self.clock), self._event, self.inputs)
        self.jams = self.live.jams  # track -> bridge.live.jam.Jam (the latest one per track)
        self._closed = False
        self._jobs_entered = False

    HANDLERS: dict[type, Callable[[Daemon, Any, Address], None]]  # built below the class from @handles

    def __enter__(self) -> Daemon:
        remove_stale_temporaries(Path(self.config.session_dir), self.stems_dir)
        interrupted = self.journal.load_interrupted()
        self.jobs.__enter__()
        self._jobs_entered = True
        try:
            self.server.__enter__()
        except BaseException:
            self.jobs.shutdown(0.0)
            raise
        try:
            self.clock.__enter__()
        except BaseException:
            self._closed = True
            self.jobs.shutdown(0.0)
            self.server.__exit__(None, None, None)
            raise
        self._report_interrupted(interrupted)
        return self

    def _report_interrupted(self, entries: list[Entry]) -> None:
        """Jobs a crash cut off: `/job/failed id "interrupted"` to their reply address, or queued again."""
        for e in entries:
            if e.proven:  # it proved its address to the run that crashed: its events need no credit
                self.budget.trust(e.reply_to)
            if self.config.resume:
                log.info("job %d (%s) was interrupted by a crash; queueing it again (--resume)", e.job_id, e.address)
                self._own_initiative.value = True  # its answers answer no packet: sent as events
                try:
                    self.handle(e.address, list(e.args), e.sender)
                finally:
                    self._own_initiative.value = False
            else:
                log.info("job %d (%s) was interrupted by a crash; reporting it failed to %s:%d", e.job_id,
                         e.address, *e.reply_to)
                self._event(e.reply_to, "/job/failed", (e.job_id, "interrupted"))

    def __exit__(self, *exc) -> None:
        self.shutdown(self.config.grace)

    def shutdown(self, grace: float) -> None:
        """Refuse new jobs, let running ones finish within `grace` seconds, then close the socket."""
        if self._closed:
            return
        self._closed = True
        queued, running = self.jobs.counts()
        if queued or running:
            log.info("shutting down: cancelling %d queued job(s), giving %d running job(s) up to %g s",
                     queued, running, grace)
        self.live.close()
        self.clock.close()
        self.jobs.shutdown(grace)
        self.server.__exit__(None, None, None)
        log.info("musicbridge stopped; the session is saved in %s", self.session.path)

    # ------------------------------------------------------------ replies

    def _to(self, sender: Address) -> Address:
        return self.config.reply_to or sender

    def reply(self, sender: Address, address: str, *args: Any, hold: bool = True) -> None:
        """An answer to a packet: to --reply-to (set by the operator), or to the sender, paid from its budget.

        Held (hold=True) until the session changes of the packets handled with this one are saved.
        """
        if getattr(self._own_initiative, "value", False):
            self._event(self._to(sender), address, args)
        elif self.config.reply_to is not None:
            self.server.reply(self.config.reply_to, address, args, hold=hold, budgeted=False)
        elif not self.server.reply(sender, address, args, hold=hold) and self._budget_log.allow():
            log.info("reply %s to %s:%d dropped: larger than what that host has sent, and the address is not "
                     "proven; pad the question, prove the address with /cookie and /prove, or serve "
                     "--reply-to (docs/osc.md, \"Reply budget\")", address[:80], sender[0], sender[1])

    def _error(self, sender: Address, e: ProtocolError, address: str, logged: bool = False) -> None:
        """An /error reply, within the error reply budget; logged (rate-limited) unless `logged` already."""
        if not logged and self._limiter.allow():
            log.info("rejected %r from %s:%d: %r (%s)", address[:80], sender[0], sender[1], e.message[:300], e.code)
        if self._error_replies.allow():  # a flood of junk gets a bounded trickle of answers
            self.reply(sender, "/error", e.code, e.message, address[:256], e.job_id)

    def _group_failed(self, e: Exception, senders: set[Address]) -> None:
        """The session could not be saved after a group of packets: their changes were undone; say so."""
        message = e.message if isinstance(e, ProtocolError) else f"internal error: {e}"
        for to in {self._to(s) for s in senders}:
            self._event(to, "/error", ("failed", message, "", 0))

    def _event(self, to: Address, address: str, args: tuple, keep: int = 0) -> bool:
        """A message that answers no packet of its own (a job's progress and end, a jam's chunks and
        status): to --reply-to as it is, to any other host paid from its byte credit (docs/osc.md).
        Dropped when it does not fit; a job's final state stays queryable with /job/<id>/status."""
        if to == self.config.reply_to:
            return self.server.reply(to, address, args, hold=False, budgeted=False)
        if self.server.reply(to, address, args, hold=False, keep=keep):
            return True
        if self._budget_log.allow():
            log.info("event %s to %s:%d dropped: over the reply byte budget of that host, which has not "
                     "proved its address (docs/osc.md)", address[:80], to[0], to[1])
        return False

    def _bad_packet(self, why: str, sender: Address) -> None:
        self._error(sender, ProtocolError("bad_packet", why), "")

    def _job_event(self, job: Job, kind: str, payload: tuple) -> None:
        to = job.reply_to
        if kind == "progress":  # a dropped one is coalesced into the next that fits: it carries the latest
            self._event(to, "/job/progress", (job.id, float(payload[0])), keep=EVENT_RESERVE)
        elif kind == "done":
            log.info("job %d done: track %s, %g s, wrote %s", job.id, job.plan.name, job.plan.seconds, payload[0])
            self._append_done(job, str(payload[0]))  # before the reply: whoever hears /job/done finds the line
            self._event(to, "/job/done", (job.id, payload[0]))
        elif kind == "cancelled":
            log.info("job %d (track %s) cancelled", job.id, job.plan.name)
            self._event(to, "/job/cancelled", (job.id,))
        elif kind == "failed":
            code, message = payload
            log.info("job %d (track %s) failed: %s", job.id, job.plan.name, message)
            self._event(to, "/error", (code, message, f"/job/{job.id}", job.id))
        if kind != "progress":  # after the reply: the journal write (fsync) must not delay it
            self.journal.remove(job.id)

    # ------------------------------------------------------------ messages

    def handle(self, address: str, args: list[Any], sender: Address) -> None:
        """One message: parse, apply, answer. Every failure becomes an /error reply."""
        try:
            replay = getattr(self._own_initiative, "value", False)  # --resume: accepted before the crash
            if address not in NO_HELLO_NEEDED and not replay and self.access.needs_hello(sender):
                raise ProtocolError("forbidden", "this daemon needs a key: send /hello with it first (serve --key)")
            if isinstance(address, str) and self.clock.feedback(address, args, sender):
                return  # a DAW's transport feedback (docs/daw.md): followed or ignored, never answered
            cmd = P.parse(address, args, limits=self.config.limits, paths=self.paths)
            self._apply(cmd, sender)
        except ProtocolError as e:
            self._error(sender, e, address if isinstance(address, str) else "")
        except Exception as e:  # noqa: BLE001 - a bug answers `internal`, the daemon carries on
            # A message that reaches a bug usually comes in floods (a bundle of 1024 copies):
            # the traceback is rate-limited per code, the reply goes through the error budget.
            self.tracebacks.exception("internal", "internal error on %r from %s:%d", str(address)[:80], *sender)
            self._error(sender, ProtocolError("internal", f"internal error: {type(e).__name__}: {str(e)[:200]}"),
                        address if isinstance(address, str) else "", logged=True)

    def _ok(self, sender: Address, cmd: P.Command, what: str) -> None:
        if self._ok_log.allow():
            log.info("%s", what)
        self.reply(sender, "/ok", cmd.address)

    def _apply(self, cmd: P.Command, sender: Address) -> None:
        handler = self.HANDLERS.get(type(cmd))
        if handler is None:  # a command class without a handler is a bug, not user input
            raise ProtocolError("internal", f"no handler for {type(cmd).__name__}")
        handler(self, cmd, sender)

    # One handler per command class, marked @handles(CommandClass): each changes state or queues
    # a job, then answers. To add a message: a frozen command class and its builder in
    # bridge.osc.protocol, and a method here marked @handles(ThatClass).

    @handles(P.Hello)
    def _hello(self, cmd: P.Hello, sender: Address) -> None:
        """Introduces the sender's host (needed with --key for hosts other than 127.0.0.1 / ::1)."""
        refused = self.access.hello(sender, cmd.key)
        if refused is not None:
            raise ProtocolError("forbidden", refused.message)
        log.info("%s introduced itself with the key", sender[0])
        self.reply(sender, "/ok", "/hello")

    @handles(P.Pad)
    def _pad(self, cmd: P.Pad, sender: Address) -> None:
        """Padding: its bytes earned the sender reply credit when it arrived (docs/osc.md); no answer."""

    @handles(P.Cookie)
    def _cookie(self, cmd: P.Cookie, sender: Address) -> None:
        """The cookie that proves the sender's address (bridge.osc.reply_budget); paid like any answer."""
        self.reply(sender, "/cookie", self.budget.cookie(sender))

    @handles(P.Prove)
    def _prove(self, cmd: P.Prove, sender: Address) -> None:
        if not self.budget.prove(sender, cmd.cookie):
            raise ProtocolError("forbidden", "/prove: not the cookie /cookie gave this address (IP and port) in the "
                                             "last minute; ask /cookie again and send back what it answers")
        log.info("%s:%d proved its address: replies and events to it need no reply credit", *sender)
        self.reply(sender, "/ok", "/prove")

    @handles(P.Ping)
    def _ping(self, cmd: P.Ping, sender: Address) -> None:
        self.reply(sender, "/pong")

    @handles(P.Status)
    def _status(self, cmd: P.Status, sender: Address) -> None:
        queued, running = self.jobs.counts()
        st = self.clock.state()
        xruns = int(self.audio.stats()["xruns"]) if self.audio is not None else -1
        info = self.engine.info
        health = getattr(self.engine, "health", None)  # a remote engine (model.remote.client) says if it is reachable
        engine = "local" if health is None else health()[1]
        note = self.clock.note()  # what to change for the followed clock to be heard: a trailing string, if any
        self.reply(sender, "/status", info.label, len(self.session.tracks), queued, running, xruns,
                   float(st.tempo), str(st.signature), int(st.playing), float(st.beat), st.source, float(st.age),
                   info.device, info.dtype, float(st.quarter_notes), engine, *((note,) if note else ()))

    @handles(P.TransportState)
    def _transport_state(self, cmd: P.TransportState, sender: Address) -> None:
        st = self.clock.state()
        self.reply(sender, "/transport/state", st.source, float(st.tempo), st.signature.numerator,
                   st.signature.denominator, int(st.playing), float(st.beat), float(st.age), float(st.quarter_notes))

    @handles(P.ListTracks)
    def _list_tracks(self, cmd: P.ListTracks, sender: Address) -> None:
        self.reply(sender, "/tracks", *sorted(self.session.tracks))

    @handles(P.TrackState)
    def _track_state(self, cmd: P.TrackState, sender: Address) -> None:
        tr = self.session.track(cmd.track)
        if tr is None:
            raise ProtocolError("not_found", f"there is no track {cmd.track!r}; /tracks lists them")
        state = tr.to_json()
        m = state["melody"]
        if m and m["kind"] == "chroma":  # keep the reply well inside one datagram
            frames = len(m["data"]) * 3 // 4 // 48
            state["melody"] = {"kind": "chroma", "frame_rate": m["frame_rate"], "frames": frames}
        elif m and m["kind"] == "notes":
            state["melody"] = {"kind": "notes", "notes": len(m["notes"])}
        self.reply(sender, f"/track/{cmd.track}/state", json.dumps(state))

    @handles(P.SetPrompt)
    def _set_prompt(self, cmd: P.SetPrompt, sender: Address) -> None:
        self.session.update_track(cmd.track, prompt=cmd.text)
        self._ok(sender, cmd, f"track {cmd.track}: prompt is now {cmd.text[:80]!r}")

    @handles(P.MelodyClear)
    def _melody_clear(self, cmd: P.MelodyClear, sender: Address) -> None:
        self._existing(cmd.track)
        self.session.update_track(cmd.track, melody=None)
        self._ok(sender, cmd, f"track {cmd.track}: melody cleared")

    @handles(P.ClearTrack)
    def _clear_track(self, cmd: P.ClearTrack, sender: Address) -> None:
        self.session.clear_track(cmd.track)
        self._ok(sender, cmd, f"track {cmd.track}: cleared")

    @handles(P.DeleteTrack)
    def _delete_track(self, cmd: P.DeleteTrack, sender: Address) -> None:
        self.session.delete_track(cmd.track)
        self._ok(sender, cmd, f"track {cmd.track}: deleted")

    @handles(P.KeepTake)
    def _keep_take(self, cmd: P.KeepTake, sender: Address) -> None:
        """The track's kept stem, recorded in the session; no file is moved or deleted."""
        self._existing(cmd.track)
        if cmd.job_id is None:
            self.session.update_track(cmd.track, kept=None)
            self._ok(sender, cmd, f"track {cmd.track}: keeps no take")
            return
        job = self.jobs.take_of(cmd.job_id, cmd.track)
        self.session.update_track(cmd.track, kept=KeptTake(job.id, str(job.path)))
        self._ok(sender, cmd, f"track {cmd.track}: keeps the take of job {job.id}, {job.path}")

    @handles(P.CancelJob)
    def _cancel_job(self, cmd: P.CancelJob, sender: Address) -> None:
        if not self.access.may_manage(cmd.job_id, sender):
            raise ProtocolError("forbidden", f"job {cmd.job_id} was queued by another host; only that host "
                                             "or 127.0.0.1 may cancel it", cmd.job_id)
        job = self.jobs.cancel(cmd.job_id)
        if job.state == "running":
            log.info("job %d (track %s): stopping at the next step", job.id, job.plan.name)

    @handles(P.JobStatus)
    def _job_status(self, cmd: P.JobStatus, sender: Address) -> None:
        job = self.jobs.get(cmd.job_id)
        self.reply(sender, "/job/status", job.id, job.state, float(job.fraction),
                   str(job.path) if job.path else "")

    @handles(P.SetTempo)
    def _set_tempo(self, cmd: P.SetTempo, sender: Address) -> None:
        self.session.update_transport(tempo=cmd.bpm)
        self.clock.typed_changed()
        self._ok(sender, cmd, f"tempo is now {cmd.bpm:g} bpm")

    @handles(P.SetSignature)
    def _set_signature(self, cmd: P.SetSignature, sender: Address) -> None:
        self.session.update_transport(time_signature=TimeSignature(cmd.numerator, cmd.denominator))
        self.clock.typed_changed()
        self._ok(sender, cmd, f"time signature is now {cmd.numerator}/{cmd.denominator}")

    @handles(P.Play, P.Stop)
    def _play_stop(self, cmd: P.Play | P.Stop, sender: Address) -> None:
        changes: dict[str, Any] = {"playing": isinstance(cmd, P.Play)}
        if cmd.quarter_notes is not None:
            changes["position"] = cmd.quarter_notes
        t = self.session.update_transport(**changes)
        self.clock.typed_changed(cmd.quarter_notes)
        self._ok(sender, cmd, f"transport {'playing' if t.playing else 'stopped'} at quarter note {t.position:g}")

    @handles(P.Locate)
    def _locate(self, cmd: P.Locate, sender: Address) -> None:
        self.session.update_transport(position=cmd.quarter_notes)
        self.clock.typed_changed(cmd.quarter_notes)
        self._ok(sender, cmd, f"transport moved to quarter note {cmd.quarter_notes:g}")

    @handles(P.JamStart)
    def _jam_start(self, cmd: P.JamStart, sender: Address) -> None:
        track = self._existing(cmd.track)
        m = track.melody_dict()
        if m and m["kind"] in ("midi", "audio"):  # the file may have changed since it was set: check it again
            self.inputs.check_now(m["path"], m["kind"])
        preset = _load_preset(track.preset) if track.preset else None
        self._ok(sender, cmd, self.live.jam_start(cmd.track, track, preset, self._stem_transport(None)[0],
                                                  self._to(sender)))

    @handles(P.JamStop)
    def _jam_stop(self, cmd: P.JamStop, sender: Address) -> None:
        self.live.jam_stop(cmd.track)
        self._ok(sender, cmd, f"jam on track {cmd.track}: stopping at the next bar line")

    @handles(P.JamStatus)
    def _jam_status(self, cmd: P.JamStatus, sender: Address) -> None:
        self.live.jam_status(cmd.track, self._to(sender))

    @handles(P.Note)
    def _note(self, cmd: P.Note, sender: Address) -> None:
        """No /ok: a stream of notes stays quiet (errors are answered)."""
        self.live.note(cmd.track, cmd.pitch, cmd.velocity)

    @handles(P.NotesOff)
    def _notes_off(self, cmd: P.NotesOff, sender: Address) -> None:
        self.live.notes_off(cmd.track)
        self._ok(sender, cmd, f"track {cmd.track}: all live notes off")

    @handles(P.MidiChannel)
    def _midi_channel(self, cmd: P.MidiChannel, sender: Address) -> None:
        self.live.midi_channel(cmd.track, cmd.channel)
        self._ok(sender, cmd, f"MIDI channel {cmd.channel} -> track {cmd.track}" if cmd.channel
                 else f"track {cmd.track}: MIDI channels back to the default")

    def _existing(self, name: str):
        tr = self.session.track(name)
        if tr is None:
            raise ProtocolError("not_found", f"there is no track {name!r}; set its prompt or preset first")
        return tr

    @handles(P.SetPreset)
    def _set_preset(self, cmd: P.SetPreset, sender: Address) -> None:
        if cmd.name:
            preset = _load_preset(cmd.name)
            track = self.session.track(cmd.track)
            check_track_params(preset, track.params_dict() if track else {})
        self.session.update_track(cmd.track, preset=cmd.name)
        self._ok(sender, cmd, f"track {cmd.track}: preset {cmd.name!r}" if cmd.name
                 else f"track {cmd.track}: preset removed")

    @handles(P.SetParam)
    def _set_param(self, cmd: P.SetParam, sender: Address) -> None:
        track = self.session.track(cmd.track)
        params = track.params_dict() if track else {}
        if cmd.value is None:
            params.pop(cmd.key, None)
        else:
            params[cmd.key] = cmd.value
        check_track_params(_load_preset(track.preset) if track and track.preset else None, params)
        self.session.update_track(cmd.track, params=params)
        self._ok(sender, cmd, f"track {cmd.track}: {cmd.key} = {cmd.value if cmd.value is not None else 'default'}")

    @handles(P.MelodyMidi, P.MelodyAudio, P.MelodyNotes, P.MelodyChroma)
    def _set_melody(self, cmd: P.Command, sender: Address) -> None:
        if melody_refusal(self.engine):
            raise ProtocolError("model", f"{melody_refusal(self.engine)} (start the daemon with one)")
        if isinstance(cmd, (P.MelodyMidi, P.MelodyAudio)):
            self.inputs.check_now(cmd.path, "midi" if isinstance(cmd, P.MelodyMidi) else "audio")
            melody = {"kind": "midi" if isinstance(cmd, P.MelodyMidi) else "audio", "path": str(cmd.path)}
            what = f"melody from {cmd.path}"
        elif isinstance(cmd, P.MelodyNotes):
            melody = {"kind": "notes", "notes": [list(n) for n in cmd.notes]}
            what = f"melody from {len(cmd.notes)} notes"
        else:
            assert isinstance(cmd, P.MelodyChroma)
            melody = {"kind": "chroma", "data": chroma_to_text(cmd.data), "frame_rate": cmd.frame_rate}
            what = f"melody from a {cmd.frames}-frame chroma"
        self.session.update_track(cmd.track, melody=melody)  # type: ignore[attr-defined]
        self._ok(sender, cmd, f"track {cmd.track}: {what}")  # type: ignore[attr-defined]

    @handles(P.Generate, P.PlayGenerate, P.Continue)
    def _generate(self, cmd: P.Generate | P.Continue, sender: Address) -> None:
        s = self.session
        live = isinstance(cmd, P.PlayGenerate)
        if live and self.audio is None:
            raise ProtocolError("unavailable", "this daemon has no live audio output; start it with --audio "
                                               "DEVICE to play while generating, or use /generate")
        track = self._existing(cmd.track)
        preset = _load_preset(track.preset) if track.preset else None
        transport, timeline = self._stem_transport(getattr(cmd, "at_bar", None))
        plan = plan_job(cmd, track, preset, transport, self.engine, self.config.limits, self.config.stem_rate)
        plan = placed_at(plan, timeline["seconds"])  # the followed clock's timeline, tempo map included
        plan.context["timeline"] = timeline
        if plan.seconds * self.engine.frame_rate < 1.0:
            raise ProtocolError("bad_args", f"{cmd.address}: {plan.seconds:g} s is shorter than one frame of the "
                                            f"model ({1.0 / self.engine.frame_rate:g} s)")
        if isinstance(cmd, P.Continue):
            self.inputs.check_now(cmd.path, "take")
            s.update_track(cmd.track, continuation={"path": str(cmd.path), "seconds": cmd.seconds})

        def accepted(job: Job) -> None:
            try:  # recorded before it is acknowledged: whatever /job/accepted answered, a restart finds
                self.journal.add(Entry(job.id, cmd.address, _message_args(cmd), self._to(sender), sender,
                                       self.budget.proven(self._to(sender))))
            except OSError as e:
                raise ProtocolError("failed", f"{e}; the job was not queued: free the disk (or fix the session "
                                              "folder) and send it again") from None
            self.access.own(job.id, sender)
            self.reply(sender, "/job/accepted", job.id, cmd.track, hold=False)  # before any progress
            log.info("job %d queued: track %s, %s, prompt %r%s", job.id, cmd.track, plan.length_text,
                     plan.request["prompt"][:80], f", priority {cmd.priority}" if cmd.priority else "")

        takes = 1 if isinstance(cmd, P.Continue) or live else int(track.params_dict().get("variations") or 1)
        if live:  # heard while it generates: it skips the offline queue (bridge/live/play.py)
            self.jobs.run_live(plan, self._to(sender), s.take_job_id, self.live.player_for(preset), accepted)
        elif takes == 1:
            self.jobs.submit(plan, self._to(sender), cmd.priority, s.take_job_id, accepted)
        else:  # variations: N takes queued at once, so they share one engine pass
            self.jobs.submit_all(variation_plans(plan, takes), self._to(sender), cmd.priority, s.take_job_id,
                                 accepted)

    # ------------------------------------------------------------ the followed clock (docs/daw.md)

    def _stem_transport(self, at_bar: int | None):
        """The transport a stem is planned with: the leading clock's tempo and signature now (so
        `generate ... bars` follows the DAW), and as position the stem's place on the timeline, which
        becomes its BWF time reference: bar `at_bar` if the request names one, else the bar line at or
        before where the transport is. Also the sidecar's record of how that place was found."""
        st = self.clock.state()
        sig = st.signature
        beat, seconds = self.clock.stem_start(at_bar)
        transport = replace(self.session.transport, tempo=st.tempo, time_signature=sig, playing=st.playing,
                            position=sig.beats_to_quarters(beat))  # the session counts quarter notes
        timeline = {"clock": st.source, "asked_at_beat": round(st.beat, 6), "at_bar": at_bar,
                    "bar": int(round(beat / sig.numerator)) + 1, "beat": beat, "seconds": seconds}
        return transport, timeline

    def _append_done(self, job: Job, path: str) -> None:
        """One line per finished stem, "<job>\t<track>\t<path>", for DAW scripts that cannot take OSC
        (daw/reaper/musicbridge_import.lua); a failure to write is logged, the job stays done."""
        if self.config.done_list is None:
            return
        try:
            with open(self.config.done_list, "a", encoding="utf-8") as f:
                f.write(f"{job.id}\t{job.plan.name}\t{path}\n")
        except OSError as e:
            log.warning("could not append job %d to the done list %s: %s", job.id, self.config.done_list, e)


# The dispatch table, command class -> handler, gathered from the @handles marks above.
Daemon.HANDLERS = {cls: fn for fn in vars(Daemon).values() for cls in getattr(fn, "handles", ())}


def _message_args(cmd: P.Generate | P.Continue) -> tuple[Any, ...]:
    """The arguments of a message that asks for `cmd` again (the journal replays it with --resume)."""
    if isinstance(cmd, P.Continue):
        return (str(cmd.path), float(cmd.seconds), int(cmd.priority))
    if cmd.bars is not None:
        return (int(cmd.bars), "bars", int(cmd.priority))
    return (float(cmd.seconds), int(cmd.priority))  # type: ignore[arg-type]


def _load_preset(name: str):
    if name not in preset_files():
        raise ProtocolError("not_found", f"unknown preset {name!r}; expected one of {', '.join(preset_files())}")
    try:
        return load_preset(name)
    except PresetError as e:
        raise ProtocolError("bad_args", f"preset {name!r} cannot be used: {e}") from None
