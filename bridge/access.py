"""Who may talk to the daemon, and whose jobs a sender may manage.

Three gates, cheapest first:
- `admits(sender)`: only hosts inside an --allow-from network are read at all (default:
  loopback only); anything else is dropped before decoding, without a reply, so a scan or a
  flood from outside costs one comparison per datagram.
- `/hello s:key`: with --key, a sender other than 127.0.0.1 / ::1 must introduce itself with
  the key before anything else it sends is acted on.
- job ownership: a job belongs to the host that queued it; another host asking to cancel it
  is `forbidden`. 127.0.0.1 and ::1 (the machine's own user) may manage every job.
"""

from __future__ import annotations

import hmac
import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Iterable

Address = tuple[str, int]
LOOPBACK = ("127.0.0.0/8", "::1/128")
MAX_INTRODUCED = 1024
MAX_OWNED = 4096
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AccessError(ValueError):
    """A bad --allow-from / --key setting; the message says what is expected."""


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

    def __init__(self, allow_from: Iterable[str | Network] = (), key: str | None = None):
        nets = [n if not isinstance(n, str) else parse_network(n) for n in allow_from]
        self.networks: tuple[Network, ...] = tuple(nets) or tuple(ipaddress.ip_network(n) for n in LOOPBACK)
        if key is not None and not (8 <= len(key) <= 256):
            raise AccessError("--key must be 8 to 256 characters")
        self.key = key
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

    def hello(self, sender: Address, key: str) -> bool:
        """Introduce a sender's host; False when the key is wrong (or none is configured and one is given)."""
        if self.key is None:
            return True
        if not hmac.compare_digest(key.encode("utf-8", "replace"), self.key.encode("utf-8")):
            return False
        with self._lock:
            self._introduced[sender[0]] = None
            self._introduced.move_to_end(sender[0])
            while len(self._introduced) > MAX_INTRODUCED:
                self._introduced.popitem(last=False)
        return True

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
