"""The OSC daemon: messages in, session changes and jobs out, replies back to the sender.

Wiring only: bridge.osc receives, bridge.protocol turns each message into a command (or an
error), this module applies it to bridge.session or queues it on bridge.jobs, and answers.
Handlers run on the OSC thread and never run inference; they change state or queue a job.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bridge import protocol as P
from bridge.clock import FollowSpec
from bridge.clock.hub import ClockHub, output_clock
from bridge.jobs import Job, JobQueue, check_track_params, plan_job, track_sound
from bridge.osc import Address, OscServer
from bridge.paths import PathPolicy
from bridge.protocol import Limits, ProtocolError
from bridge.session import LiveSession, chroma_to_text
from model.types import melody_refusal

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
    follow: FollowSpec = field(default_factory=FollowSpec)  # the clock that leads (serve --follow)
    ardour: Address | None = None    # Ardour's OSC port, asked for transport feedback (--follow osc)
    done_list: Path | None = None    # every finished stem is appended here (daw/reaper imports it)


ERROR_REPLIES_PER_SECOND = 200


class _LogLimiter:
    """At most `per_second` events a second of a noisy kind (log lines, error replies); the rest are counted."""

    def __init__(self, per_second: int = 5, what: str = "rejected messages were not logged"):
        self.per_second, self.what = per_second, what
        self.window, self.count, self.dropped = 0, 0, 0

    def allow(self) -> bool:
        now = int(time.monotonic())
        if now != self.window:
            if self.dropped:
                log.info("(%d more %s)", self.dropped, self.what)
            self.window, self.count, self.dropped = now, 0, 0
        self.count += 1
        if self.count > self.per_second:
            self.dropped += 1
            return False
        return True


def handles(*classes: type) -> Callable:
    """Mark a Daemon method as the handler of these command classes (the dispatch table's entries)."""
    def mark(fn: Callable) -> Callable:
        fn.handles = classes  # type: ignore[attr-defined]
        return fn
    return mark


class Daemon:
    """A running bridge; a context manager that binds the socket on enter and stops cleanly on exit."""

    def __init__(self, engine, config: DaemonConfig, audio=None):
        """audio: an open plugin_host.output.AudioOutput for live output and xrun counts, or None."""
        from bridge.stem_output import engine_record

        self.engine, self.config, self.audio = engine, config, audio
        self.stems_dir = Path(config.stems_dir or Path(config.session_dir) / "stems")
        self.paths = PathPolicy([self.stems_dir, *config.allow_dirs])
        self.session = LiveSession(config.session_dir, max_tracks=config.limits.max_tracks)
        self.jobs = JobQueue(engine, self.stems_dir, self._job_event, max_queued=config.limits.max_queued,
                             engine_record=engine_record(engine))
        self.server = OscServer(config.host, config.port, self.handle, self._bad_packet)
        self.clock = ClockHub(self.session, config.follow, clock=output_clock(audio), ardour=config.ardour,
                              send=self.server.send)
        self._limiter = _LogLimiter()
        self._error_replies = _LogLimiter(ERROR_REPLIES_PER_SECOND, "error replies were not sent: too many "
                                                                    "bad messages at once")
        self.jams: dict[str, Any] = {}  # track -> bridge.jam.Jam (the latest one per track)
        self._closed = False
        self._jobs_entered = False

    HANDLERS: dict[type, Callable[[Daemon, Any, Address], None]]  # built below the class from @handles

    def __enter__(self) -> Daemon:
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
        return self

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
        for jam in self.jams.values():
            jam.close()
        self.clock.close()
        self.jobs.shutdown(grace)
        self.server.__exit__(None, None, None)
        log.info("musicbridge stopped; the session is saved in %s", self.session.path)

    # ------------------------------------------------------------ replies

    def _to(self, sender: Address) -> Address:
        return self.config.reply_to or sender

    def reply(self, sender: Address, address: str, *args: Any) -> None:
        self.server.send(self._to(sender), address, args)

    def _error(self, sender: Address, e: ProtocolError, address: str) -> None:
        if self._limiter.allow():
            log.info("rejected %s from %s:%d: %s (%s)", address[:80], sender[0], sender[1], e.message, e.code)
        if self._error_replies.allow():  # a flood of junk gets a bounded trickle of answers
            self.reply(sender, "/error", e.code, e.message, address[:256], e.job_id)

    def _bad_packet(self, why: str, sender: Address) -> None:
        self._error(sender, ProtocolError("bad_packet", why), "")

    def _job_event(self, job: Job, kind: str, payload: tuple) -> None:
        to = job.reply_to
        if kind == "progress":
            self.server.send(to, "/job/progress", (job.id, float(payload[0])))
        elif kind == "done":
            log.info("job %d done: track %s, %g s, wrote %s", job.id, job.plan.name, job.plan.seconds, payload[0])
            self._append_done(job, str(payload[0]))  # before the reply: whoever hears /job/done finds the line
            self.server.send(to, "/job/done", (job.id, payload[0]))
        elif kind == "cancelled":
            log.info("job %d (track %s) cancelled", job.id, job.plan.name)
            self.server.send(to, "/job/cancelled", (job.id,))
        elif kind == "failed":
            code, message = payload
            log.info("job %d (track %s) failed: %s", job.id, job.plan.name, message)
            self.server.send(to, "/error", (code, message, f"/job/{job.id}", job.id))

    # ------------------------------------------------------------ messages

    def handle(self, address: str, args: list[Any], sender: Address) -> None:
        """One message: parse, apply, answer. Every failure becomes an /error reply."""
        try:
            if isinstance(address, str) and self.clock.feedback(address, args, sender):
                return  # a DAW's transport feedback (docs/daw.md): followed or ignored, never answered
            cmd = P.parse(address, args, limits=self.config.limits, paths=self.paths)
            self._apply(cmd, sender)
        except ProtocolError as e:
            self._error(sender, e, address if isinstance(address, str) else "")
        except Exception as e:  # noqa: BLE001 - a bug answers `internal`, the daemon carries on
            log.exception("internal error on %s", str(address)[:80])
            self.reply(sender, "/error", "internal", f"internal error: {type(e).__name__}: {e}",
                       str(address)[:256], 0)

    def _ok(self, sender: Address, cmd: P.Command, what: str) -> None:
        log.info("%s", what)
        self.reply(sender, "/ok", cmd.address)

    def _apply(self, cmd: P.Command, sender: Address) -> None:
        handler = self.HANDLERS.get(type(cmd))
        if handler is None:  # a command class without a handler is a bug, not user input
            raise ProtocolError("internal", f"no handler for {type(cmd).__name__}")
        handler(self, cmd, sender)

    # One handler per command class, marked @handles(CommandClass): each changes state or queues
    # a job, then answers. To add a message: a frozen command class and its builder in
    # bridge.protocol, and a method here marked @handles(ThatClass).

    @handles(P.Ping)
    def _ping(self, cmd: P.Ping, sender: Address) -> None:
        self.reply(sender, "/pong")

    @handles(P.Status)
    def _status(self, cmd: P.Status, sender: Address) -> None:
        queued, running = self.jobs.counts()
        source, tempo, num, den, playing, beat, age = self.clock.state()
        xruns = int(self.audio.stats()["xruns"]) if self.audio is not None else -1
        self.reply(sender, "/status", self.engine.info.label, len(self.session.tracks), queued, running, xruns,
                   float(tempo), f"{num}/{den}", int(playing), float(beat), source, float(age))

    @handles(P.TransportState)
    def _transport_state(self, cmd: P.TransportState, sender: Address) -> None:
        source, tempo, num, den, playing, beat, age = self.clock.state()
        self.reply(sender, "/transport/state", source, float(tempo), num, den, int(playing), float(beat),
                   float(age))

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

    @handles(P.CancelJob)
    def _cancel_job(self, cmd: P.CancelJob, sender: Address) -> None:
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
        self.session.update_transport(numerator=cmd.numerator, denominator=cmd.denominator)
        self.clock.typed_changed()
        self._ok(sender, cmd, f"time signature is now {cmd.numerator}/{cmd.denominator}")

    @handles(P.Play, P.Stop)
    def _play_stop(self, cmd: P.Play | P.Stop, sender: Address) -> None:
        changes: dict[str, Any] = {"playing": isinstance(cmd, P.Play)}
        if cmd.beat is not None:
            changes["position"] = cmd.beat
        t = self.session.update_transport(**changes)
        self.clock.typed_changed(cmd.beat)
        self._ok(sender, cmd, f"transport {'playing' if t.playing else 'stopped'} at beat {t.position:g}")

    @handles(P.Locate)
    def _locate(self, cmd: P.Locate, sender: Address) -> None:
        self.session.update_transport(position=cmd.beat)
        self.clock.typed_changed(cmd.beat)
        self._ok(sender, cmd, f"transport moved to beat {cmd.beat:g}")

    @handles(P.JamStop)
    def _jam_stop(self, cmd: P.JamStop, sender: Address) -> None:
        jam = self.jams.get(cmd.track)
        if jam is None or jam.state in ("stopping", "stopped", "failed"):
            raise ProtocolError("not_found", f"no jam is running on track {cmd.track!r}")
        jam.stop()
        self._ok(sender, cmd, f"jam on track {cmd.track}: stopping at the next bar line")

    @handles(P.JamStatus)
    def _jam_status(self, cmd: P.JamStatus, sender: Address) -> None:
        jam = self.jams.get(cmd.track)
        if jam is None:
            raise ProtocolError("not_found", f"no jam has run on track {cmd.track!r}")
        self._send_jam_status(self._to(sender), jam.status())

    @handles(P.JamStart)
    def _jam_start(self, cmd: P.JamStart, sender: Address) -> None:
        if self.audio is None:
            raise ProtocolError("unavailable", "this daemon has no live audio output; start it with "
                                               "--audio DEVICE to jam")
        try:
            from bridge.jam import Jam, JamError
        except ImportError:
            raise ProtocolError("unavailable", "live jam is not available in this build") from None
        old = self.jams.get(cmd.track)
        if old is not None and old.state not in ("stopped", "failed") and not old.wait(0):
            raise ProtocolError("bad_args", f"a jam is already running on track {cmd.track!r}; "
                                            f"/jam/stop it first")
        track = self._existing(cmd.track)
        preset = _load_preset(track.preset) if track.preset else None
        t, _timeline = self._stem_transport(None)  # the leading clock's tempo and signature
        prompt, params = track_sound(cmd.track, track, preset, t.tempo)
        melody = None
        if track.melody is not None:
            if melody_refusal(self.engine):
                raise ProtocolError("model", f"track {cmd.track} follows a melody, but "
                                             f"{melody_refusal(self.engine)}")
            from bridge.melody_source import LoopedMelody, whole_melody_chroma

            rate = self.engine.chroma_frame_rate
            melody = LoopedMelody(whole_melody_chroma(track.melody_dict(), rate, t.tempo), rate)
        chain = None
        if preset and preset.chain:
            chain = preset.build_chain()
        to = self._to(sender)
        if old is not None:
            old.close()
        try:
            jam = Jam(self.engine, self.audio, cmd.track, prompt, melody=melody, params=params, chain=chain,
                      tempo=t.tempo, numerator=t.numerator, denominator=t.denominator,
                      origin_frame=self._jam_origin(), on_status=lambda st: self._send_jam_status(to, st))
        except JamError as e:
            raise ProtocolError("bad_args", f"cannot jam on track {cmd.track}: {e}") from None
        self.jams[cmd.track] = jam
        jam.start()
        self._ok(sender, cmd, f"jam on track {cmd.track}: started ({prompt[:60]!r})")

    def _send_jam_status(self, to: Address, st: dict[str, Any]) -> None:
        rtf = st.get("realtime_factor")
        self.server.send(to, "/jam/status", (st["track"], st["state"], int(bool(st["behind"])), int(st["chunks"]),
                                             float(rtf) if rtf is not None and rtf < 1e9 else 0.0,
                                             int(st["underruns"]), st.get("error") or ""))

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

    @handles(P.Generate, P.Continue)
    def _generate(self, cmd: P.Generate | P.Continue, sender: Address) -> None:
        s = self.session
        track = self._existing(cmd.track)
        preset = _load_preset(track.preset) if track.preset else None
        transport, timeline = self._stem_transport(getattr(cmd, "at_bar", None))
        plan = plan_job(cmd, track, preset, transport, self.engine, self.config.limits, self.config.stem_rate)
        plan.context["timeline"] = timeline
        if isinstance(cmd, P.Continue):
            s.update_track(cmd.track, continuation={"path": str(cmd.path), "seconds": cmd.seconds})

        def accepted(job: Job) -> None:
            self.reply(sender, "/job/accepted", job.id, cmd.track)
            log.info("job %d queued: track %s, %s, prompt %r%s", job.id, cmd.track, plan.length_text,
                     plan.request["prompt"][:80], f", priority {cmd.priority}" if cmd.priority else "")

        self.jobs.submit(plan, self._to(sender), cmd.priority, s.take_job_id, accepted)


    # ------------------------------------------------------------ the followed clock (docs/daw.md)

    def _stem_transport(self, at_bar: int | None):
        """The transport a stem is planned with: the leading clock's tempo and signature now (so
        `generate ... bars` follows the DAW), and as position the stem's place on the timeline, which
        becomes its BWF time reference: bar `at_bar` if the request names one, else the bar line at or
        before where the transport is. Also the sidecar's record of how that place was found."""
        from dataclasses import replace

        source, tempo, num, den, playing, beat_now, _age = self.clock.state()
        beat, seconds = self.clock.stem_start(at_bar)
        transport = replace(self.session.transport, tempo=tempo, numerator=num, denominator=den, playing=playing,
                            position=beat * 4.0 / den)  # the session counts quarter notes
        timeline = {"clock": source, "asked_at_beat": round(beat_now, 6), "at_bar": at_bar,
                    "bar": int(round(beat / num)) + 1, "beat": beat, "seconds": seconds}
        return transport, timeline

    def _jam_origin(self) -> int | None:
        """A bar line of the followed DAW's grid, as an output frame (None: the jam's own grid)."""
        if self.config.follow.source == "typed" or self.audio is None:
            return None
        g = self.clock.jam_grid()
        return int(round(g.next_bar_time(self.clock.now()) * self.audio.samplerate))

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


def _load_preset(name: str):
    from presets import PresetError, load_preset, preset_files

    if name not in preset_files():
        raise ProtocolError("not_found", f"unknown preset {name!r}; expected one of {', '.join(preset_files())}")
    try:
        return load_preset(name)
    except PresetError as e:
        raise ProtocolError("bad_args", f"preset {name!r} cannot be used: {e}") from None
