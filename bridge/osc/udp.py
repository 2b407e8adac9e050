"""OSC over UDP: bytes in, (address, args, sender) out, and replies back. No protocol logic here.

python-osc only encodes packets. Decoding is ours and bounds-checked (`decode`): a datagram
comes from anyone, so no size in it is trusted, bundles have a depth and element limit, and
arguments must fit their type tags exactly. The receive loop is ours too, so that every
datagram, however malformed, is answered or dropped on the receive thread and never raises out
of it; replies to a packet are paid from the sender's byte budget (bridge.osc.reply_budget).
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from pythonosc.osc_message_builder import OscMessageBuilder

if TYPE_CHECKING:
    from bridge.osc.reply_budget import ReplyBudget

log = logging.getLogger("musicbridge.osc")

Address = tuple[str, int]
MAX_DATAGRAM = 65535
INT32 = (-(2**31), 2**31 - 1)
TRACEBACK_EVERY = 10.0  # seconds between two tracebacks of one kind of unexpected failure


class TracebackLog:
    """Tracebacks of unexpected exceptions, at most one per `every` seconds per code.

    A bug that a message can reach is reached by every copy of that message: one traceback per
    message let 20 bundles of 1024 bad job ids write 5.5 MB of log. The first one of a code is
    logged whole; those within `every` seconds after it are counted, and the count is logged
    with the next traceback of that code. Codes are few and fixed by the callers (`internal`,
    `feedback`), so the table stays small.
    """

    def __init__(self, logger: logging.Logger, every: float = TRACEBACK_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.every, self._clock = logger, every, clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self.suppressed: dict[str, int] = {}

    def exception(self, code: str, fmt: str, *args: Any) -> bool:
        """Log the exception being handled (call from an `except` block) unless one of `code` was
        logged less than `every` seconds ago; True when it was logged."""
        with self._lock:
            now = self._clock()
            last = self._last.get(code)
            if last is not None and now - last < self.every:
                self.suppressed[code] = self.suppressed.get(code, 0) + 1
                return False
            self._last[code] = now
            held_back = self.suppressed.pop(code, 0)
        if held_back:
            fmt += " (and %d more like it in the last %.0f s, not logged)"
            args = (*args, held_back, now - last)
        self.logger.error(fmt, *args, exc_info=True)
        return True


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
MAX_BUNDLE_DEPTH = 4         # bundles inside bundles inside ... : deeper is refused
MAX_BUNDLE_ELEMENTS = 1024   # elements in one bundle
MAX_PACKET_MESSAGES = 1024   # messages in one datagram, all bundles together
MAX_GROUP = 64               # datagrams waiting at once that are handled as one group (one session save)
GROUP_SECONDS = 0.02         # ... or as many as arrive within this time of handling
BUNDLE_TAG = b"#bundle\0"
COOKIE_PAD = 64              # bytes of padding a client's /cookie carries: more than the 48-byte answer


class OscDecodeError(ValueError):
    """A datagram that is not an OSC message or bundle we can read; the message says where and why."""


def _string(data: bytes, at: int, end: int, what: str) -> tuple[str, int]:
    """An OSC-string at `at`: UTF-8, NUL-terminated, zero-padded to 4 bytes, all inside [at, end)."""
    nul = data.find(b"\0", at, end)
    if nul < 0:
        raise OscDecodeError(f"{what} at byte {at} is not NUL-terminated inside the packet")
    stop = at + ((nul - at) // 4 + 1) * 4
    if stop > end:
        raise OscDecodeError(f"{what} at byte {at} is not padded to a multiple of 4 bytes")
    if data[nul:stop].count(0) != stop - nul:
        raise OscDecodeError(f"{what} at byte {at} has non-zero padding")
    try:
        return data[at:nul].decode("utf-8"), stop
    except UnicodeDecodeError:
        raise OscDecodeError(f"{what} at byte {at} is not UTF-8 text") from None


_FIXED = {"i": (">i", 4), "h": (">q", 8), "f": (">f", 4), "d": (">d", 8)}


def _message(data: bytes, at: int, end: int) -> tuple[str, list[Any]]:
    """One message occupying exactly data[at:end]; every argument must fit its tag, nothing may be left over."""
    address, pos = _string(data, at, end, "address")
    if not address.startswith("/"):
        raise OscDecodeError(f"address {address[:40]!r} does not start with '/'")
    if pos == end:
        return address, []  # no type tag string: a message without arguments (OSC 1.0 allows it)
    tags, pos = _string(data, pos, end, "type tag string")
    if not tags.startswith(","):
        raise OscDecodeError("type tag string does not start with ','")
    bad = sorted({t for t in tags[1:]} - SUPPORTED_TAGS)
    if bad:
        raise OscDecodeError(f"unsupported OSC type tag(s) {''.join(bad)!r}; use i h f d s b T F N m")
    args: list[Any] = []
    for n, t in enumerate(tags[1:], 1):
        if t in _FIXED:
            fmt, size = _FIXED[t]
            if pos + size > end:
                raise OscDecodeError(f"argument {n} ({t}) needs {size} bytes, the packet has {end - pos} left")
            args.append(struct.unpack_from(fmt, data, pos)[0])
            pos += size
        elif t == "s":
            s, pos = _string(data, pos, end, f"argument {n} (s)")
            args.append(s)
        elif t == "b":
            if pos + 4 > end:
                raise OscDecodeError(f"argument {n} (b) has no size: the packet ends")
            size = struct.unpack_from(">i", data, pos)[0]
            pos += 4
            padded = (size + 3) // 4 * 4
            if size < 0 or pos + padded > end:
                raise OscDecodeError(f"argument {n} (b) declares {size} bytes, the packet has {end - pos} left")
            args.append(bytes(data[pos:pos + size]))
            pos += padded
        elif t == "m":
            if pos + 4 > end:
                raise OscDecodeError(f"argument {n} (m) needs 4 bytes, the packet has {end - pos} left")
            args.append(tuple(data[pos:pos + 4]))
            pos += 4
        else:
            args.append({"T": True, "F": False, "N": None}[t])
    if pos != end:
        raise OscDecodeError(f"{end - pos} byte(s) after the last argument that no type tag accounts for")
    return address, args


def _bundle(data: bytes, at: int, end: int, depth: int, out: list[tuple[str, list[Any]]]) -> None:
    if depth > MAX_BUNDLE_DEPTH:
        raise OscDecodeError(f"bundles nested more than {MAX_BUNDLE_DEPTH} deep")
    if end - at < 16:
        raise OscDecodeError("bundle shorter than its 16-byte header")
    pos, elements = at + 16, 0  # '#bundle\0' and the time tag (ignored: we act on arrival)
    while pos < end:
        elements += 1
        if elements > MAX_BUNDLE_ELEMENTS:
            raise OscDecodeError(f"bundle has more than {MAX_BUNDLE_ELEMENTS} elements")
        if pos + 4 > end:
            raise OscDecodeError(f"bundle element {elements} has no size: the packet ends")
        size = struct.unpack_from(">i", data, pos)[0]
        pos += 4
        if size <= 0 or size % 4 or pos + size > end:
            raise OscDecodeError(f"bundle element {elements} declares {size} bytes; expected a positive "
                                 f"multiple of 4 of at most the {end - pos} bytes left")
        if data.startswith(BUNDLE_TAG, pos):
            _bundle(data, pos, pos + size, depth + 1, out)
        else:
            if len(out) >= MAX_PACKET_MESSAGES:
                raise OscDecodeError(f"more than {MAX_PACKET_MESSAGES} messages in one packet")
            out.append(_message(data, pos, pos + size))
        pos += size


def decode(data: bytes) -> list[tuple[str, list[Any]]]:
    """Every message in a datagram (bundles flattened, timetags ignored: we act on arrival).

    Our own parser, bounds-checked at every step: a datagram from anyone is decoded in time
    linear in its length, and anything that does not fit exactly is OscDecodeError.
    """
    data = bytes(data)
    if len(data) % 4:
        raise OscDecodeError(f"packet is {len(data)} bytes, not a multiple of 4")
    if data.startswith(BUNDLE_TAG):
        out: list[tuple[str, list[Any]]] = []
        _bundle(data, 0, len(data), 1, out)
        return out
    if not data:
        raise OscDecodeError("empty packet")
    return [_message(data, 0, len(data))]


Handler = Callable[[str, list[Any], Address], None]
BadPacket = Callable[[str, Address], None]


class OscServer:
    """A UDP socket with a receive thread; `handler` runs on that thread for every message.

    Use as a context manager: the socket is bound on enter and closed (thread joined) on exit.
    """

    def __init__(self, host: str, port: int, handler: Handler, on_bad_packet: BadPacket,
                 budget: ReplyBudget | None = None, admit: Callable[[Address], bool] | None = None,
                 group: Callable[[], contextlib.AbstractContextManager] | None = None,
                 on_group_failed: Callable[[Exception, set[Address]], None] | None = None,
                 unsaved: Callable[[], bool] | None = None):
        """budget: pays for replies (see `reply`); admit: False drops a sender's packets unread.

        group: a context the packets waiting at once are handled in (the daemon saves its session
        once per group); once unsaved() says a change is pending, replies are held until the group
        ends, and dropped if it raises, in which case on_group_failed(error, the senders) runs.
        """
        self.host, self.port = host, port
        self.handler, self.on_bad_packet = handler, on_bad_packet
        self.budget, self.admit = budget, admit
        self.group, self.on_group_failed, self.unsaved = group, on_group_failed, unsaved
        self._held: list[tuple[bytes, Address]] | None = None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self.tracebacks = TracebackLog(log)

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
                waiting = [self._sock.recvfrom(MAX_DATAGRAM)]
            except (TimeoutError, socket.timeout):
                continue
            except OSError as e:
                if self._stop.is_set():
                    return
                log.warning("receiving failed (%s); still listening", e)
                continue
            self._held = []
            try:
                with self.group() if self.group is not None else contextlib.nullcontext():
                    self._group(waiting[0])
            except Exception as e:  # noqa: BLE001 - the group's save failed: its acknowledgements are void
                held, self._held = self._held, None
                log.warning("%s; %d replies withheld", e, len(held))
                if self.on_group_failed is not None:
                    self.on_group_failed(e, {to for _, to in held})
                continue
            held, self._held = self._held, None
            for data, to in held:
                self._sendto(data, to)

    def _group(self, first: tuple[bytes, Any]) -> None:
        """Handle `first`, then whatever else is already waiting, for at most MAX_GROUP datagrams
        or GROUP_SECONDS, so that one session save covers them all and no answer waits long."""
        assert self._sock is not None
        t0, n = time.monotonic(), 1
        data, sender = first
        self._packet(data, (sender[0], sender[1]))
        while n < MAX_GROUP and time.monotonic() - t0 < GROUP_SECONDS:
            try:
                if not select.select([self._sock], [], [], 0)[0]:
                    return
                data, sender = self._sock.recvfrom(MAX_DATAGRAM)
            except (OSError, ValueError):
                return
            n += 1
            self._packet(data, (sender[0], sender[1]))

    def _packet(self, data: bytes, sender: Address) -> None:
        """One datagram: admit, pay in, decode, handle each message; nothing raises out of here."""
        if self.admit is not None and not self.admit(sender):
            return
        if self.budget is not None:
            self.budget.received(sender[0], len(data))
        try:
            messages = decode(data)
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad packet, never fatal
            self.on_bad_packet(f"not a valid OSC packet ({type(e).__name__}: {str(e)[:100]})", sender)
            return
        for address, args in messages:
            try:
                self.handler(address, args, sender)
            except Exception:  # noqa: BLE001 - a handler bug must not stop the daemon listening
                self.tracebacks.exception("internal", "internal error while handling %r from %s:%d",
                                          address[:80], *sender)

    def send(self, to: Address, address: str, args: Sequence[Any] = ()) -> None:
        """Send one message, not paid from any budget: only for addresses the operator chose (Ardour's
        `--ardour` port); a sender's answers and events go through `reply`. A failure to send (peer
        gone, buffer full) is logged, never raised."""
        self._send(to, address, args)

    def reply(self, to: Address, address: str, args: Sequence[Any] = (), hold: bool = True,
              budgeted: bool = True, keep: int = 0) -> bool:
        """Send an answer to a packet or an event, paid from `to`'s byte budget leaving `keep`
        bytes of credit; False when it did not fit (not sent).

        On the receive thread the answer is held until the packet's group has been saved
        (hold=False: now, for answers that must not wait, such as /job/accepted).
        """
        data = self._encode(to, address, args)
        if data is None:
            return False
        if budgeted and self.budget is not None and not self.budget.spend(to, len(data), keep):
            return False
        if (hold and self._held is not None and threading.current_thread() is self._thread
                and (self._held or self.unsaved is None or self.unsaved())):
            self._held.append((data, to))
            return True
        return self._sendto(data, to)

    def _send(self, to: Address, address: str, args: Sequence[Any]) -> bool:
        data = self._encode(to, address, args)
        return data is not None and self._sendto(data, to)

    def _encode(self, to: Address, address: str, args: Sequence[Any]) -> bytes | None:
        """The datagram, or None (logged) when the socket is closed or an argument has no OSC type."""
        if self._sock is None:
            return None
        try:
            return encode(address, args)
        except OscEncodeError as e:
            log.debug("could not send %s to %s:%d (%s)", address, to[0], to[1], e)
            return None

    def _sendto(self, data: bytes, to: Address) -> bool:
        if self._sock is None:
            return False
        try:
            with self._send_lock:
                self._sock.sendto(data, to)
        except OSError as e:
            log.debug("could not send %d bytes to %s:%d (%s)", len(data), to[0], to[1], e)
            return False
        return True


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

    def prove(self, timeout: float = 2.0) -> bool:
        """The cookie round trip of docs/osc.md ("Reply budget"): afterwards the daemon's answers and
        job events to this socket's address (IP and port) need no reply credit. True when it was accepted;
        False when no cookie came back (an older daemon refuses /cookie; one with --reply-to answers there).
        Replies that arrive meanwhile are read and discarded."""
        self.send("/cookie", bytes(COOKIE_PAD))  # padded: the cookie is paid from the request's bytes
        r = self.wait_for(lambda a, v: (a == "/cookie" and len(v) == 1 and isinstance(v[0], str))
                          or (a == "/error" and "/cookie" in v), timeout)  # an older daemon: bad_address
        if r is None or r[0] == "/error":
            return False
        self.send("/prove", r[1][0])
        return self.wait_for(lambda a, v: a in ("/ok", "/error") and "/prove" in v, timeout) == ("/ok", ["/prove"])

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
