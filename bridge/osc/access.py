"""Who may talk to the daemon, and whose jobs a sender may manage.

Three gates, cheapest first:
- `admits(sender)`: only hosts inside an --allow-from network are read at all (default:
  loopback only); anything else is dropped before decoding, without a reply, so a scan or a
  flood from outside costs one comparison per datagram.
- `/hello s:key`: with --key, a sender other than 127.0.0.1 / ::1 must introduce itself with
  the key before anything else it sends is acted on. A host's wrong keys slow it down: after
  FREE_TRIES wrong ones, each further /hello is refused unread for a delay that doubles with
  every wrong key (up to MAX_DELAY_S), so guessing a 16-character key is hopeless. Nothing
  waits: a refused /hello is answered at once.
- job ownership: a job belongs to the host that queued it; another host asking to cancel it
  is `forbidden`. 127.0.0.1 and ::1 (the machine's own user) may manage every job.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Address = tuple[str, int]
LOOPBACK = ("127.0.0.0/8", "::1/128")
MAX_INTRODUCED = 1024
MAX_OWNED = 4096
MIN_KEY, MAX_KEY = 16, 256  # characters; 16 random ones are beyond guessing at MAX_DELAY_S per try
FREE_TRIES = 3  # wrong keys a host may send before it is slowed down (typos)
FIRST_DELAY_S, MAX_DELAY_S = 1.0, 300.0
MAX_FAILING = 1024  # hosts whose wrong keys are remembered, the oldest forgotten first
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessError(ValueError):
    """A bad --allow-from / --key setting; the message says what is expected."""


def check_key(key: str | None) -> str | None:
    """The --key rule: None (no key) or MIN_KEY to MAX_KEY characters; AccessError with a hint otherwise."""
    if key is not None and not (MIN_KEY <= len(key) <= MAX_KEY):
        raise AccessError(f"--key must be {MIN_KEY} to {MAX_KEY} characters, got {len(key)}; a random one: "
                          f"--key {secrets.token_urlsafe(18)}")
    return key


@dataclass(frozen=True)
class HelloRefused:
    """Why a /hello was refused: a wrong key, or too many of them (retry after `wait_s`)."""

    wait_s: float = 0.0

    @property
    def message(self) -> str:
        if self.wait_s > 0:
            return f"/hello: too many wrong keys from this host; try again in {math.ceil(self.wait_s)} s"
        return "/hello: wrong key"


def parse_network(text: str) -> Network:
    """'192.168.1.0/24', '10.0.0.5' (one host) or '::1' -> a network; AccessError otherwise."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise AccessError(f"--allow-from {text!r} is not an address or CIDR network such as "
                          "192.168.1.0/24 or 10.0.0.5") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return _ip(host).is_loopback
    except ValueError:
        return False


def is_local_user(host: str) -> bool:
    """127.0.0.1 or ::1: the machine's own user, who needs no key and may manage every job.

    Other loopback addresses (127.0.0.2 ...) are only used by programs that bind them on
    purpose; they are treated like any other host, which is also how the tests stand in for a
    second machine.
    """
    try:
        ip = _ip(host)
    except ValueError:
        return False
    return ip == ipaddress.ip_address("127.0.0.1") or ip == ipaddress.ip_address("::1")


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class Access:
    """The allow-list, the key and job owners of one daemon; thread-safe."""

    def __init__(self, allow_from: Iterable[str | Network] = (), key: str | None = None,
                 clock: Callable[[], float] = time.monotonic):
        nets = [n if not isinstance(n, str) else parse_network(n) for n in allow_from]
        self.networks: tuple[Network, ...] = tuple(nets) or tuple(ipaddress.ip_network(n) for n in LOOPBACK)
        self.key = check_key(key)
        self._clock = clock
        self._failing: OrderedDict[str, tuple[int, float]] = OrderedDict()  # host -> (wrong keys, locked until)
        self._introduced: OrderedDict[str, None] = OrderedDict()
        self._owners: OrderedDict[int, str] = OrderedDict()
        self._lock = threading.Lock()

    def admits(self, sender: Address) -> bool:
        """May this sender's packets be read at all?"""
        try:
            ip = _ip(sender[0])
        except ValueError:
            return False
        return any(ip in n for n in self.networks if n.version == ip.version)

    # ------------------------------------------------------------ the key

    def needs_hello(self, sender: Address) -> bool:
        """True when this sender must still send /hello with the key."""
        if self.key is None or is_local_user(sender[0]):
            return False
        with self._lock:
            return sender[0] not in self._introduced

    def hello(self, sender: Address, key: str) -> HelloRefused | None:
        """Introduce a sender's host: None when it is introduced, else why not. A host still locked
        out by its wrong keys is refused without the key being compared."""
        if self.key is None:
            return None
        host, now = sender[0], self._clock()
        with self._lock:
            wrong, until = self._failing.get(host, (0, 0.0))
            if now < until:
                return HelloRefused(until - now)
        if not hmac.compare_digest(key.encode("utf-8", "replace"), self.key.encode("utf-8")):
            with self._lock:
                wrong += 1
                delay = 0.0 if wrong < FREE_TRIES else min(MAX_DELAY_S, FIRST_DELAY_S * 2.0 ** (wrong - FREE_TRIES))
                self._failing[host] = (wrong, now + delay)
                self._failing.move_to_end(host)
                while len(self._failing) > MAX_FAILING:
                    self._failing.popitem(last=False)
            return HelloRefused()
        with self._lock:
            self._failing.pop(host, None)
            self._introduced[sender[0]] = None
            self._introduced.move_to_end(sender[0])
            while len(self._introduced) > MAX_INTRODUCED:
                self._introduced.popitem(last=False)
        return None

    # ------------------------------------------------------------ job owners

    def own(self, job_id: int, sender: Address) -> None:
        with self._lock:
            self._owners[job_id] = sender[0]
            while len(self._owners) > MAX_OWNED:
                self._owners.popitem(last=False)

    def may_manage(self, job_id: int, sender: Address) -> bool:
        """127.0.0.1 / ::1 manage every job; other hosts only the jobs they queued."""
        if is_local_user(sender[0]):
            return True
        with self._lock:
            return self._owners.get(job_id) == sender[0]
