"""OSC over UDP: bytes in, (address, args, sender) out, and replies back. No protocol logic here.

python-osc only encodes and decodes packets; the receive loop is ours so that every datagram,
however malformed, is answered or dropped on the receive thread and never raises out of it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_packet import OscPacket

log = logging.getLogger("musicbridge.osc")

Address = tuple[str, int]
MAX_DATAGRAM = 65535
INT32 = (-(2**31), 2**31 - 1)


class OscEncodeError(ValueError):
    """An argument that has no OSC type."""


def encode(address: str, args: Sequence[Any] = ()) -> bytes:
    """One OSC message; ints are i (or h beyond 32 bits), floats f, str s, bytes b, bool T/F, None N."""
    b = OscMessageBuilder(address)
    for a in args:
        if a is True:
            b.add_arg(True, "T")
        elif a is False:
            b.add_arg(False, "F")
        elif a is None:
            b.add_arg(None, "N")
        elif isinstance(a, int):
            b.add_arg(a, "i" if INT32[0] <= a <= INT32[1] else "h")
        elif isinstance(a, float):
            b.add_arg(a, "f")
        elif isinstance(a, str):
            b.add_arg(a, "s")
        elif isinstance(a, (bytes, bytearray)):
            b.add_arg(bytes(a), "b")
        else:
            raise OscEncodeError(f"cannot send {type(a).__name__} {a!r} over OSC")
    return b.build().dgram


SUPPORTED_TAGS = frozenset("ihfdsbTFNm")


class OscDecodeError(ValueError):
    """A datagram that is not an OSC message or bundle we can read."""


def check_type_tags(data: bytes) -> None:
    """Refuse type tags python-osc would silently drop (S, c, arrays...), so arity checks stay honest."""
    end = data.find(b"\0")
    if end < 0:
        raise OscDecodeError("address is not terminated")
    start = (end // 4 + 1) * 4
    if start >= len(data):
        return  # no type tag string: a message without arguments
    stop = data.find(b"\0", start)
    tags = data[start:stop if stop >= 0 else len(data)]
    if not tags.startswith(b","):
        raise OscDecodeError("type tag string does not start with ','")
    bad = sorted({chr(t) for t in tags[1:]} - SUPPORTED_TAGS)
    if bad:
        raise OscDecodeError(f"unsupported OSC type tag(s) {''.join(bad)!r}; use i h f d s b T F N m")


def decode(data: bytes) -> list[tuple[str, list[Any]]]:
    """Every message in a datagram (bundles flattened, timetags ignored: we act on arrival)."""
    if OscBundle.dgram_is_bundle(data):
        messages = [m.message for m in OscPacket(data).messages]
        for m in messages:
            check_type_tags(m.dgram)
        return [(m.address, list(m.params)) for m in messages]
    check_type_tags(data)
    msg = OscMessage(data)
    return [(msg.address, list(msg.params))]


Handler = Callable[[str, list[Any], Address], None]
BadPacket = Callable[[str, Address], None]


class OscServer:
    """A UDP socket with a receive thread; `handler` runs on that thread for every message.

    Use as a context manager: the socket is bound on enter and closed (thread joined) on exit.
    """

    def __init__(self, host: str, port: int, handler: Handler, on_bad_packet: BadPacket):
        self.host, self.port = host, port
        self.handler, self.on_bad_packet = handler, on_bad_packet
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._send_lock = threading.Lock()

    def __enter__(self) -> OscServer:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self._sock.bind((self.host, self.port))
        except OSError:
            self._sock.close()
            raise
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._loop, name="osc-receive", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2.0)
        if self._sock:
            self._sock.close()

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except (TimeoutError, socket.timeout):
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("receiving failed (%s); still listening", e)
                continue
            sender = (sender[0], sender[1])
            try:
                messages = decode(data)
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad packet, never fatal
                self.on_bad_packet(f"not a valid OSC packet ({type(e).__name__}: {str(e)[:100]})", sender)
                continue
            for address, args in messages:
                try:
                    self.handler(address, args, sender)
                except Exception:  # noqa: BLE001 - a handler bug must not stop the daemon listening
                    log.exception("internal error while handling %s from %s:%d", address[:80], *sender)

    def send(self, to: Address, address: str, args: Sequence[Any] = ()) -> None:
        """Send one message; a failure to send (peer gone, buffer full) is logged, never raised."""
        if self._sock is None:
            return
        try:
            data = encode(address, args)
            with self._send_lock:
                self._sock.sendto(data, to)
        except (OSError, OscEncodeError) as e:
            log.debug("could not send %s to %s:%d (%s)", address, to[0], to[1], e)


class OscClient:
    """A UDP socket for sending messages and reading replies (the `send` command and the tests)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 9010, listen_port: int = 0,
                 listen_host: str = "127.0.0.1"):
        self.target = (host, port)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((listen_host if family == socket.AF_INET else "::1", listen_port))
        except OSError:
            self.sock.close()
            raise
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def __enter__(self) -> OscClient:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def send(self, address: str, *args: Any) -> None:
        self.sock.sendto(encode(address, args), self.target)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendto(data, self.target)

    def receive(self, timeout: float) -> tuple[str, list[Any]] | None:
        """The next reply message, or None when none arrives within `timeout` seconds."""
        self.sock.settimeout(max(timeout, 1e-3))
        try:
            data = self.sock.recv(MAX_DATAGRAM)
        except (TimeoutError, socket.timeout):
            return None
        try:
            return decode(data)[0]
        except Exception:  # noqa: BLE001
            return ("/invalid-reply", [data[:64]])

    def replies(self, timeout: float) -> Iterator[tuple[str, list[Any]]]:
        """Replies until none arrives for `timeout` seconds."""
        while (r := self.receive(timeout)) is not None:
            yield r

    def wait_for(self, predicate: Callable[[str, list[Any]], bool], timeout: float,
                 seen: list | None = None) -> tuple[str, list[Any]] | None:
        """The first reply matching `predicate` within `timeout` seconds (others go to `seen`)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            r = self.receive(left)
            if r is None:
                return None
            if predicate(*r):
                return r
            if seen is not None:
                seen.append(r)
        return None
