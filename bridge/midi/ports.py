"""MIDI input ports read on a thread of ours, never in the MIDI system's own thread.

`open_input_port` opens an rtmidi input (any of its APIs: JACK, ALSA, CoreMIDI, WinMM) without a
callback; `MidiReader` drains it and hands each message on with the driver's own timestamp. Live
notes (bridge.live.notes) and the MIDI clock follower (bridge.clock.midi_clock) read ports this way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import mido
import rtmidi

log = logging.getLogger("musicbridge.midi")

POLL_SECONDS = 0.002  # how often a port's reader drains rtmidi's queue: the most a note waits there
QUEUE_MESSAGES = 4096  # rtmidi's ring buffer per port: 8 s of a dense controller stream at POLL_SECONDS


class MidiReader:
    """Reads an open rtmidi input port on a thread of ours, and owns the port; a context manager.

    No Python runs in the MIDI system's own thread. With a callback, python-rtmidi calls Python
    from JACK's process thread, which then waits for the interpreter lock (so a busy daemon makes
    the DAW's audio late), and closing a port while that callback ran deadlocked or crashed the
    process. Without one, rtmidi queues each message in its C++ ring buffer in that thread, and
    this reader drains it every POLL_SECONDS. On close the reader stops before the port closes.

    on_message(data, driver_seconds) is called on the reader thread: the message's bytes, and its
    time as the MIDI system stamped it (rtmidi's deltas summed: seconds since the port's first
    message), which a stall on our side does not move. A message whose handler raises is logged
    and the reader goes on.
    """

    def __init__(self, rt: Any, on_message: Callable[[list[int], float], None], name: str):
        self._rt, self.on_message, self.name = rt, on_message, name
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"midi-in {name}", daemon=True)

    def __enter__(self) -> MidiReader:
        self._thread.start()
        return self

    def _read(self) -> None:
        driver_t = 0.0
        while not self._stop.is_set():
            got = self._rt.get_message()
            if got is None:
                self._stop.wait(POLL_SECONDS)
                continue
            data, delta = got
            driver_t += delta
            try:
                self.on_message(data, driver_t)
            except Exception:  # noqa: BLE001 - one bad message must not silence the port
                log.exception("MIDI input %s: a message could not be handled", self.name)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._rt.close_port()
        self._rt.delete()


def open_input_port(api: str | None, port: str | None, virtual_name: str = "musicbridge-in") -> Any:
    """An rtmidi input on `api` (an rtmidi API name such as "UNIX_JACK", or None for rtmidi's
    default): the existing port named exactly `port`, or a new virtual port `virtual_name`."""

    rt = rtmidi.MidiIn(rtmidi_api(api), name="musicbridge", queue_size_limit=QUEUE_MESSAGES)
    try:
        rt.ignore_types(sysex=False, timing=False, active_sense=True)
        if port is None:
            rt.open_virtual_port(virtual_name)
        else:
            names = rt.get_ports()
            if port not in names:
                raise ValueError(f"MIDI input {port!r} is gone; ports: {', '.join(names) or 'none'}")
            rt.open_port(names.index(port))
    except BaseException:
        rt.delete()
        raise
    return rt


def as_mido(handler: Callable[[Any], None]) -> Callable[[list[int], float], None]:
    """A reader's raw messages as mido messages to `handler` (a malformed one is skipped, as mido does)."""

    def on_message(data: list[int], _driver_t: float) -> None:
        try:
            msg = mido.Message.from_bytes(data)
        except ValueError:
            return
        handler(msg)

    return on_message


def rtmidi_api(name: str | None) -> int:
    if name is None:
        return rtmidi.API_UNSPECIFIED
    api = getattr(rtmidi, f"API_{name}", None)
    if api is None or api not in rtmidi.get_compiled_api():
        raise ValueError(f"MIDI API {name!r} is not available here; it has "
                         f"{', '.join(rtmidi.get_api_name(a) for a in rtmidi.get_compiled_api())}")
    return api


