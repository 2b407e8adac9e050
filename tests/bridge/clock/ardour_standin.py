"""A stand-in for Ardour's OSC surface (UDP, real sockets) that decides where feedback goes as Ardour's
osc.cc does, for tests where running Ardour itself is not possible (see docs/daw.md).

From Ardour's libs/surfaces/osc/osc.cc:
- get_address: the first message from a host adds a port entry for it: in "Port Mode: Manual" (the
  default, session XML address-only="1") the "Reply Manual Port" (default 8000), in "Auto" the word
  "auto"; feedback then goes to host:that port, or with "auto" to the port the message came from.
- set_surface_port (/set_surface/port P): P = 0 makes this host's entry "auto", P > 1024 that port;
  the surface's reply address changes with it.
- /set_surface/feedback BITS: the surface at get_address gets feedback; bit 16 the transport state
  (/transport_play, /transport_stop, floats in Ardour 7), bit 32 /position/bbt "BBB|bb|tttt".
- /transport_play and /transport_stop start and stop the transport.
`honours_set_port=False` plays an Ardour that ignores /set_surface/port (before Ardour 6).
"""

from __future__ import annotations

import socket
import threading
import time

from bridge.osc.udp import decode, encode

TICKS = 1920


class ArdourStandIn:
    """A context manager: an Ardour OSC surface on a free loopback port, with a transport that rolls at
    `bpm` in 4/4 from `beat` (quarter notes from bar 1) when played."""

    def __init__(self, manual_port: int, auto: bool = False, honours_set_port: bool = True, bpm: float = 97.0,
                 beat: float = 16.0):
        self.manual_port, self.auto, self.honours_set_port = manual_port, auto, honours_set_port
        self.bpm, self.beat = bpm, beat
        self.rolling, self.since = False, time.monotonic()
        self.ports: dict[str, str] = {}              # host -> "auto" or a port (Ardour's _ports)
        self.surfaces: dict[tuple[str, int], int] = {}  # reply address -> feedback bits
        self.received: list[tuple[str, list]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.02)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ardour-standin", daemon=True)

    def __enter__(self) -> ArdourStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()

    # ------------------------------------------------------------ Ardour's transport, as a user would drive it

    def wait_for_surface(self, timeout: float = 10.0) -> None:
        """Until a client has asked for feedback (the daemon's handshake)."""
        deadline = time.monotonic() + timeout
        while not self.surfaces:
            assert time.monotonic() < deadline, self.received
            time.sleep(0.05)

    def position(self) -> float:
        with self._lock:
            return self.beat + ((time.monotonic() - self.since) * self.bpm / 60.0 if self.rolling else 0.0)

    def play(self, playing: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if self.rolling:
                self.beat += (now - self.since) * self.bpm / 60.0
            self.rolling, self.since = playing, now
        self._send_transport()

    # ------------------------------------------------------------ osc.cc's addressing

    def _reply_address(self, source: tuple[str, int]) -> tuple[str, int]:
        host = source[0]
        if host not in self.ports:
            self.ports[host] = "auto" if self.auto else str(self.manual_port)
        saved = self.ports[host]
        return source if saved == "auto" else (host, int(saved))

    def _handle(self, address: str, args: list, source: tuple[str, int]) -> None:
        self.received.append((address, args))
        reply_to = self._reply_address(source)
        if address == "/set_surface/port" and self.honours_set_port and args:
            p = int(args[0])
            if p == 0 or p > 1024:
                old = reply_to
                self.ports[source[0]] = "auto" if p == 0 else str(p)
                bits = self.surfaces.pop(old, 0)
                for other in [a for a in self.surfaces if a[0] == source[0]]:
                    del self.surfaces[other]  # "removes feedback from a device on the same host"
                if bits:
                    self.surfaces[self._reply_address(source)] = bits
        elif address == "/set_surface/feedback" and args:
            self.surfaces[reply_to] = int(args[0])
            self._send_transport()
        elif address == "/transport_play":
            self.play(True)
        elif address == "/transport_stop":
            self.play(False)

    def _send_transport(self) -> None:
        for to, bits in list(self.surfaces.items()):
            if bits & 16:
                self.sock.sendto(encode("/transport_play", [1.0 if self.rolling else 0.0]), to)
                self.sock.sendto(encode("/transport_stop", [0.0 if self.rolling else 1.0]), to)

    def _send_position(self) -> None:
        beat = self.position()
        bar, rest = divmod(beat, 4.0)
        text = f"{int(bar) + 1:03d}|{int(rest) + 1:02d}|{int(rest % 1 * TICKS):04d}"
        for to, bits in list(self.surfaces.items()):
            if bits & 32:
                self.sock.sendto(encode("/position/bbt", [text]), to)

    def _run(self) -> None:
        last = 0.0
        while not self._stop.is_set():
            try:
                data, source = self.sock.recvfrom(65536)
                for address, args in decode(data):
                    self._handle(address, args, source)
            except (TimeoutError, socket.timeout):
                pass
            except OSError:
                if self._stop.is_set():
                    return
                raise
            if time.monotonic() - last >= 0.05:  # Ardour's observers report about every 50 ms while it rolls
                last = time.monotonic()
                if self.rolling:
                    self._send_position()
