"""Live notes from MIDI ports (or OSC) into a rolling melody that a jam reads as chroma.

`LiveMelody` keeps the notes of the last few minutes, each stamped on arrival with the
clock it is given (the daemon gives the live output's clock, so note times and audio times are
on one clock and note-to-audio latency can be measured; time.monotonic without audio). `chroma(start_s, seconds,
frame_rate)` answers what the player played over any stretch: per frame the highest note
sounding at the frame's centre, zeros where nothing sounds. `MidiInput` opens a port
(bridge.midi.ports) and feeds a LiveMelody from our reader thread.

The state is bounded whatever arrives, so a flood of notes cannot slow the jam that reads it: at
most MAX_HELD_NOTES notes are held (a note-on beyond that ends the oldest held note, as if
released then) and at most MAX_REMEMBERED_NOTES finished notes are remembered, from the last
`keep_seconds` only (the oldest dropped first, pruned on every note-on and note-off). A chunk's
chroma therefore costs at most those notes, each only over the frames it covers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

import mido
import numpy as np

from bridge.midi.ports import MidiReader, as_mido, open_input_port

log = logging.getLogger("musicbridge.midi")

MAX_HELD_NOTES = 64  # notes sounding at once; more than any hands and pedal hold
MAX_REMEMBERED_NOTES = 4096  # finished notes kept; a jam reads a few bars back, far fewer than this


class LiveMelody:
    """Thread-safe rolling buffer of notes; writers are MIDI/OSC threads, the reader is the jam."""

    live = True  # a jam reads what was played, not what will be (bridge/live/jam.py's melody policy)

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep_seconds: float = 300.0,
                 max_held: int = MAX_HELD_NOTES, max_remembered: int = MAX_REMEMBERED_NOTES):
        self.clock = clock
        self.changed_at: float | None = None  # clock time of the last note-on/off
        self.keep_seconds = keep_seconds
        self.max_held = max_held
        self._lock = threading.Lock()
        self._done: deque[tuple[int, float, float]] = deque(maxlen=max_remembered)  # (pitch, on, off), oldest first
        self._held: dict[int, float] = {}  # pitch -> on time, in the order they were struck

    @property
    def held_count(self) -> int:
        return len(self._held)

    @property
    def remembered_count(self) -> int:
        return len(self._done)

    def _prune(self, t: float) -> None:
        while self._done and self._done[0][2] < t - self.keep_seconds:
            self._done.popleft()

    def note_on(self, pitch: int, at: float | None = None) -> None:
        if not 0 <= int(pitch) <= 127:
            raise ValueError(f"MIDI pitch must be 0-127, got {pitch}")
        pitch = int(pitch)
        t = self.clock() if at is None else at
        with self._lock:
            self.changed_at = t
            on = self._held.pop(pitch, None)
            if on is not None:  # a repeated note-on ends the previous one
                self._done.append((pitch, on, t))
            while len(self._held) >= self.max_held:  # the oldest held note ends now
                oldest = next(iter(self._held))
                self._done.append((oldest, self._held.pop(oldest), t))
            self._held[pitch] = t
            self._prune(t)

    def note_off(self, pitch: int, at: float | None = None) -> None:
        t = self.clock() if at is None else at
        with self._lock:
            on = self._held.pop(int(pitch), None)
            if on is not None:
                self.changed_at = t
                self._done.append((int(pitch), on, t))
            self._prune(t)

    def all_off(self, at: float | None = None) -> None:
        for pitch in list(self._held):
            self.note_off(pitch, at)

    def message(self, msg) -> None:
        """Feed a mido message (note_on with velocity 0 is a note-off, as MIDI says)."""
        if msg.type == "note_on" and msg.velocity > 0:
            self.note_on(msg.note)
        elif msg.type in ("note_off", "note_on"):
            self.note_off(msg.note)
        elif msg.type == "control_change" and msg.control in (120, 123):
            self.all_off()

    def notes(self) -> list[tuple[int, float, float]]:
        """(pitch, on, off) of the notes kept; a held note ends at +inf."""
        with self._lock:
            return list(self._done) + [(p, on, float("inf")) for p, on in self._held.items()]

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        """(frames, 12) one-hot of the highest note at each frame centre in [start_s, start_s+seconds)."""
        return chroma_of(self.notes(), start_s, seconds, frame_rate)


def chroma_of(notes: list[tuple[int, float, float]], start_s: float, seconds: float,
              frame_rate: float) -> np.ndarray:
    """(frames, 12) one-hot of the highest of `notes` sounding at each frame centre.

    Only the notes overlapping the window are visited, each over the frames it covers."""
    n = max(1, int(round(seconds * frame_rate)))
    centres = start_s + (np.arange(n) + 0.5) / frame_rate
    top = np.full(n, -1, dtype=np.int64)
    first, last = float(centres[0]), float(centres[-1])
    for pitch, on, off in notes:
        if off <= first or on > last:
            continue
        a = int(np.searchsorted(centres, on, "left"))  # first centre >= on
        b = int(np.searchsorted(centres, off, "left"))  # first centre >= off
        if a < b:
            np.maximum(top[a:b], pitch, out=top[a:b])
    out = np.zeros((n, 12), dtype=np.float32)
    voiced = top >= 0
    out[np.nonzero(voiced)[0], top[voiced] % 12] = 1.0
    return out


class TrackNotes:
    """What a track's jam hears: its own notes (OSC, routed channels) and, while no channel is
    routed to it, the notes of every unrouted channel. A live MelodySource (bridge/live/jam.py)."""

    live = True

    def __init__(self, router: NoteRouter, track: str):
        self.router, self.track = router, track

    @property
    def changed_at(self) -> float | None:
        own, omni = self.router.melody(self.track), self.router.omni
        times = [t for t in (own.changed_at, omni.changed_at if self.router.hears_omni(self.track) else None)
                 if t is not None]
        return max(times) if times else None

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        notes = self.router.melody(self.track).notes()
        if self.router.hears_omni(self.track):
            notes += self.router.omni.notes()
        return chroma_of(notes, start_s, seconds, frame_rate)


class MidiInput:
    """An open MIDI input port feeding a LiveMelody; a context manager.

    port: the name of an existing port (or a unique part of it), or None for a new virtual port
    called `virtual_name` that a controller or DAW connects to. api: an rtmidi API name such as
    "UNIX_JACK" or "LINUX_ALSA" (default: rtmidi's default).
    """

    def __init__(self, melody: LiveMelody, port: str | None = None, api: str | None = None,
                 virtual_name: str = "musicbridge-in"):
        self.melody = melody
        self.port_name = port
        self.api = api
        self.virtual_name = virtual_name
        self._reader: MidiReader | None = None

    def __enter__(self) -> MidiInput:
        name = None
        if self.port_name is not None:
            backend = mido.Backend(f"mido.backends.rtmidi/{self.api}" if self.api else "mido.backends.rtmidi")
            names = backend.get_input_names()
            matches = [n for n in names if n == self.port_name] or [n for n in names if self.port_name in n]
            if len(matches) != 1:
                found = ", ".join(names) or "none"
                raise ValueError(f"MIDI input {self.port_name!r} matches {len(matches)} ports; ports: {found}")
            name = matches[0]
        rt = open_input_port(self.api, name, self.virtual_name)
        self._reader = MidiReader(rt, as_mido(self.melody.message), name or self.virtual_name).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._reader is not None:
            self._reader.__exit__(*exc)
            self._reader = None
        self.melody.all_off()


class NoteRouter:
    """MIDI channels to tracks: each track has a LiveMelody (its OSC notes and routed channels);
    unrouted channels feed `omni`, which every track with no channel routed to it also hears (the
    default: all channels to whichever track jams). Writers: rtmidi threads and the OSC thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._melodies: dict[str, LiveMelody] = {}
        self._routes: dict[int, str] = {}  # channel 1-16 -> track
        self.omni = LiveMelody(clock)  # the notes of every channel not routed to a track
        self.messages = 0  # MIDI messages received (all ports)

    def source(self, track: str) -> TrackNotes:
        """The live MelodySource a jam on `track` reads."""
        self.melody(track)
        return TrackNotes(self, track)

    def hears_omni(self, track: str) -> bool:
        with self._lock:
            return track not in self._routes.values()

    def melody(self, track: str) -> LiveMelody:
        with self._lock:
            m = self._melodies.get(track)
            if m is None:
                m = self._melodies[track] = LiveMelody(self.clock)
            return m

    def existing(self, track: str) -> LiveMelody | None:
        """The track's LiveMelody if it has one (a reader such as the panel creates none)."""
        with self._lock:
            return self._melodies.get(track)

    def route(self, channel: int, track: str | None) -> None:
        """Route MIDI channel 1-16 to `track` (None: back to the default)."""
        if not 1 <= int(channel) <= 16:
            raise ValueError(f"MIDI channel must be 1-16, got {channel}")
        with self._lock:
            if track is None:
                self._routes.pop(int(channel), None)
            else:
                self._routes[int(channel)] = track
        if track is not None:
            self.melody(track)

    def routes(self) -> dict[int, str]:
        with self._lock:
            return dict(self._routes)

    def targets(self, channel: int) -> list[LiveMelody]:
        with self._lock:
            track = self._routes.get(channel)
            return [self._melodies[track]] if track is not None else [self.omni]

    def message(self, msg) -> None:
        """A mido message from any port (channels are 0-based in mido, 1-based here)."""
        self.messages += 1
        channel = getattr(msg, "channel", None)
        if channel is None:
            return
        for m in self.targets(channel + 1):
            m.message(msg)


def open_midi_inputs(specs: list[str], callback, stack) -> list[str]:
    """Open every input port named (exactly, or by a part of its name that matches one port) in
    `specs`, over every rtmidi API this machine has (JACK, ALSA, CoreMIDI, WinMM; "API: name", as
    the error and `musicbridge devices` list them, picks one API's port); each stays open
    until `stack` (a contextlib.ExitStack) closes. Returns "API: port" names; ValueError saying
    which ports exist when a name matches none or several."""

    ports: list[tuple[str, str, object]] = []  # (api, name, backend)
    try:
        apis = mido.Backend("mido.backends.rtmidi").module.get_api_names()
    except Exception as e:  # noqa: BLE001 - python-rtmidi missing or broken
        raise ValueError(f"MIDI input is not available here: python-rtmidi is not usable ({e})") from None
    for api in apis:
        try:
            b = mido.Backend(f"mido.backends.rtmidi/{api}")
            ports += [(api, n, b) for n in b.get_input_names()]
        except Exception:  # noqa: BLE001 - an API without its server (no JACK running) has no ports
            continue
    opened = []
    for spec in specs:
        full = [(f"{a}: {n}", (a, n, b)) for a, n, b in ports]  # "UNIX_JACK: port" picks one API's port
        matches = ([p for f, p in full if spec in (f, p[1])]
                   or [p for f, p in full if spec in f])
        if len(matches) != 1:
            found = "; ".join(f"{a}: {n}" for a, n, _ in ports) or "none (is the JACK/ALSA MIDI system running?)"
            raise ValueError(f"--midi-in {spec!r} matches {len(matches)} input ports; expected exactly one. "
                             f"Input ports: {found}")
        api, name, _ = matches[0]
        stack.enter_context(MidiReader(open_input_port(api, name), as_mido(callback), f"{api}: {name}"))
        opened.append(f"{api}: {name}")
    return opened
