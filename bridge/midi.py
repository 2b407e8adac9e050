"""Live notes from MIDI ports (or OSC) into a rolling melody that a jam reads as chroma.

`LiveMelody` keeps the notes of the last few minutes, each stamped on arrival with the
transport clock (time.monotonic by default, the jam's clock). `chroma(start_s, seconds,
frame_rate)` answers what the player played over any stretch: per frame the highest note
sounding at the frame's centre, zeros where nothing sounds. `MidiInput` opens a port through
mido (python-rtmidi, any of its APIs: JACK, ALSA, CoreMIDI, WinMM) and feeds a LiveMelody from
rtmidi's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np


class LiveMelody:
    """Thread-safe rolling buffer of notes; writers are MIDI/OSC threads, the reader is the jam."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, keep_seconds: float = 300.0):
        self.clock = clock
        self.keep_seconds = keep_seconds
        self._lock = threading.Lock()
        self._done: deque[tuple[int, float, float]] = deque()  # (pitch, on, off)
        self._held: dict[int, float] = {}  # pitch -> on time

    def note_on(self, pitch: int, at: float | None = None) -> None:
        if not 0 <= int(pitch) <= 127:
            raise ValueError(f"MIDI pitch must be 0-127, got {pitch}")
        t = self.clock() if at is None else at
        with self._lock:
            if pitch in self._held:  # a repeated note-on ends the previous one
                self._done.append((pitch, self._held[pitch], t))
            self._held[int(pitch)] = t

    def note_off(self, pitch: int, at: float | None = None) -> None:
        t = self.clock() if at is None else at
        with self._lock:
            on = self._held.pop(int(pitch), None)
            if on is not None:
                self._done.append((int(pitch), on, t))
            while self._done and self._done[0][2] < t - self.keep_seconds:
                self._done.popleft()

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

    def chroma(self, start_s: float, seconds: float, frame_rate: float) -> np.ndarray:
        """(frames, 12) one-hot of the highest note at each frame centre in [start_s, start_s+seconds)."""
        n = max(1, int(round(seconds * frame_rate)))
        centres = start_s + (np.arange(n) + 0.5) / frame_rate
        with self._lock:
            notes = list(self._done) + [(p, on, float("inf")) for p, on in self._held.items()]
        top = np.full(n, -1, dtype=np.int64)
        for pitch, on, off in notes:
            sounding = (centres >= on) & (centres < off)
            top[sounding] = np.maximum(top[sounding], pitch)
        out = np.zeros((n, 12), dtype=np.float32)
        voiced = top >= 0
        out[np.nonzero(voiced)[0], top[voiced] % 12] = 1.0
        return out


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
        self._port = None

    def __enter__(self) -> MidiInput:
        import mido

        backend = mido.Backend(f"mido.backends.rtmidi/{self.api}" if self.api else "mido.backends.rtmidi")
        if self.port_name is None:
            self._port = backend.open_input(self.virtual_name, virtual=True, callback=self.melody.message)
        else:
            names = backend.get_input_names()
            matches = [n for n in names if n == self.port_name] or [n for n in names if self.port_name in n]
            if len(matches) != 1:
                found = ", ".join(names) or "none"
                raise ValueError(f"MIDI input {self.port_name!r} matches {len(matches)} ports; ports: {found}")
            self._port = backend.open_input(matches[0], callback=self.melody.message)
        return self

    def __exit__(self, *exc) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None
        self.melody.all_off()
