"""The daemon's live side: jams, live notes (MIDI ports and OSC) and the bar grid, in one place.

Why a module of its own: the daemon's dispatch stays wiring only; everything that has a live
lifetime (a jam's thread, its output track, the note router fed by rtmidi's threads, the typed
grid on the output clock) is owned here and closed with the daemon. Handlers never run
inference: /jam/start builds a Jam and starts its thread, notes are stamped into a LiveMelody.

One pipeline: a jam conditions on a track's *melody source*, which is either the track's stored
melody looped on the grid (bridge.live.melody_source.LoopedMelody) or, with none stored, the track's
live notes (bridge.live.notes.LiveMelody, fed by every --midi-in port and by OSC
/track/<name>/note). Both go through the same Jam, the same LiveStream and the same output.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from bridge.live.jam import Jam, JamError, bins_text
from bridge.live.melody_source import LoopedMelody, stored_melody
from bridge.live.notes import NoteRouter
from bridge.live.play import play_while_generating
from bridge.osc.protocol import ProtocolError
from bridge.stems.jobs import track_sound
from model.types import melody_refusal

log = logging.getLogger("musicbridge.serve")

Send = Callable[[Any, str, tuple], None]  # (address to, OSC address, args)


class LiveControl:
    """Jams and live notes for one daemon; close() stops every jam at once."""

    def __init__(self, engine, audio, notes, grid: Callable[[], Any], send: Send, inputs=None):
        """grid: the leading clock's grid as jams read it (bridge.clock.hub.JamGridSource); inputs:
        bridge.osc.input_files.Inputs, through which stored melody files are checked and limited."""

        self.engine, self.audio, self.send = engine, audio, send
        self.clock: Callable[[], float] = ((lambda: audio.position / audio.samplerate) if audio is not None
                                           else time.monotonic)
        self.notes = notes if notes is not None else NoteRouter(self.clock)
        self.grid = grid
        self.jams: dict[str, Any] = {}  # track -> bridge.live.jam.Jam (the latest one per track)
        self.inputs = inputs
        self._text_only_warned = False
        # who hears of an audio output failure: the reply address of each jam and live play, by key
        self._listeners: dict[Any, Any] = {}
        if hasattr(audio, "on_event"):  # an AudioOutputProcess: its child is watched and reopened
            audio.on_event = self._audio_event

    def close(self) -> None:
        for jam in self.jams.values():
            jam.close()

    # ------------------------------------------------------------ the output's child failing

    def _audio_event(self, kind: str, message: str) -> None:
        """The live output's child failed, was reopened, or could not be yet (its watchdog thread):
        logged, and `/audio/event s:kind s:message i:restarts` goes to whoever is playing, so a
        jam that went quiet is never silent about it (docs/osc.md)."""
        (log.info if kind == "reopened" else log.warning)("live audio output: %s", message)
        restarts = int(getattr(self.audio, "restarts", 0))
        for to in set(self._listeners.values()):
            self.send(to, "/audio/event", (kind, message, restarts))

    # ------------------------------------------------------------ notes

    def note(self, track: str, pitch: int, velocity: int) -> None:
        self._need_melody_model(track)
        m = self.notes.melody(track)
        if velocity > 0:
            m.note_on(pitch)
        else:
            m.note_off(pitch)

    def notes_off(self, track: str) -> None:
        """All of the track's notes off, and those it hears from unrouted MIDI channels."""
        self.notes.melody(track).all_off()
        if self.notes.hears_omni(track):
            self.notes.omni.all_off()

    def midi_channel(self, track: str, channel: int) -> None:
        """Route MIDI channel 1-16 to `track`; 0 routes every channel routed to it back to the default."""
        if channel == 0:
            for ch, t in self.notes.routes().items():
                if t == track:
                    self.notes.route(ch, None)
        else:
            self.notes.route(channel, track)

    def _need_melody_model(self, track: str) -> None:
        if melody_refusal(self.engine):
            raise ProtocolError("model", f"track {track} gets live notes, but {melody_refusal(self.engine)}")

    # ------------------------------------------------------------ playing while generating

    def player_for(self, preset):
        """The `play` callable of JobQueue.run_live for /track/<name>/play: the track's chain, the grid."""

        def play(job, request, progress):
            chain = preset.build_chain() if preset and preset.chain else None
            self._listeners[("play", job.id)] = job.reply_to
            try:
                return play_while_generating(self.engine, self.audio, self.grid, job, request, chain, progress)
            finally:
                self._listeners.pop(("play", job.id), None)

        return play

    # ------------------------------------------------------------ jams

    def jam_start(self, name: str, track, preset, transport, to) -> str:
        if self.audio is None:
            raise ProtocolError("unavailable", "this daemon has no live audio output; start it with "
                                               "--audio DEVICE to jam")

        old = self.jams.get(name)
        if old is not None and old.state not in ("stopped", "failed") and not old.wait(0):
            raise ProtocolError("bad_args", f"a jam is already running on track {name!r}; /jam/stop it first")
        prompt, params = track_sound(name, track, preset, transport.tempo)
        melody, what = None, "text only"
        if track.melody is not None:
            if melody_refusal(self.engine):
                raise ProtocolError("model", f"track {name} follows a melody, but {melody_refusal(self.engine)}")
            rate = self.engine.chroma_frame_rate
            bar = transport.bars_to_seconds(1)
            # Nothing here expands the melody or parses a file: the jam's thread reads each
            # chunk's window (and a file before its first chunk), so this answers at once.
            try:
                melody = LoopedMelody(stored_melody(track.melody_dict(), rate, transport.tempo, self.inputs),
                                      rate, bar)
            except ValueError as e:  # model.conditioning.melody.MelodyError: notes or a chroma it cannot use
                raise ProtocolError("bad_args", f"track {name}: its melody: {e}") from None
            what = (f"its stored melody looped every {melody.seconds / bar:g} bars" if melody.loaded
                    else "its stored melody file looped on whole bars")
        elif self.engine.is_melody:
            melody, what = self.notes.source(name), "live notes"
        chain = preset.build_chain() if preset and preset.chain else None
        if old is not None:
            old.close()
        try:
            jam = Jam(self.engine, self.audio, name, prompt, melody=melody, params=params, chain=chain,
                      grid=self.grid, on_status=lambda st: self.send_status(to, st),
                      on_chunk=lambda e: self._chunk(to, name, e))
        except JamError as e:
            raise ProtocolError("bad_args", f"cannot jam on track {name}: {e}") from None
        self.jams[name] = jam
        self._listeners[("jam", name)] = to  # the latest jam on the track: told until the daemon stops
        jam.start()
        return f"jam on track {name}: started ({prompt[:60]!r}, following {what})"

    def jam_stop(self, name: str) -> None:
        jam = self.jams.get(name)
        if jam is None or jam.state in ("stopping", "stopped", "failed"):
            raise ProtocolError("not_found", f"no jam is running on track {name!r}")
        jam.stop()

    def jam_status(self, name: str, to) -> None:
        jam = self.jams.get(name)
        if jam is None:
            raise ProtocolError("not_found", f"no jam has run on track {name!r}")
        self.send_status(to, jam.status())

    def send_status(self, to, st: dict[str, Any]) -> None:
        """/jam/status s:track s:state i:behind i:chunks f:realtime_factor i:underruns s:error
        f:chunk_latency f:note_latency f:first_audio_seconds i:prefills (-1: not measured yet)."""
        def num(v) -> float:
            return float(v) if v is not None and v < 1e9 else -1.0

        rtf = st.get("realtime_factor")
        self.send(to, "/jam/status", (st["track"], st["state"], int(bool(st["behind"])), int(st["chunks"]),
                                      float(rtf) if rtf is not None and rtf < 1e9 else 0.0,
                                      int(st["underruns"]), st.get("error") or "",
                                      num(st.get("chunk_latency")), num(st.get("note_latency")),
                                      num(st.get("first_audio_seconds")), int(st.get("prefills") or 0)))

    def _chunk(self, to, name: str, e: dict[str, Any]) -> None:
        """/jam/chunk: what conditioned each chunk, where it plays, and how long it took."""

        self.send(to, "/jam/chunk", (name, int(e["index"]), float(e["start_time"]), float(e["bar"]),
                                     float(e["conditioned_at"]), bins_text(e["melody_bins"]),
                                     float(e["generate_seconds"]), float(e["first_audio_seconds"] or -1.0),
                                     int(e["reprefilled"]), int(e["late"]), int(e["offline_steps"]),
                                     int(e["shared_steps"])))
        log.info("jam %s: chunk %d at bar %.2f, %.2f s in %.2f s%s%s", name, e["index"], e["bar"] + 1,
                 e["chunk_seconds"], e["generate_seconds"], " (re-prefilled)" if e["reprefilled"] else "",
                 f", melody {bins_text(e['melody_bins'])}" if e["melody_bins"] else "")
