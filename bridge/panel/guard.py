"""Which requests the panel answers: a per-run token, the Host header, the Origin header, the peer.

Why each check: the token keeps out whoever does not have the URL the daemon printed; the Host
check refuses DNS rebinding (a foreign name that resolves to 127.0.0.1 reaches the port, but its
requests carry that name as Host); the Origin check refuses requests a foreign page makes from the
same browser (browsers always send Origin on WebSocket handshakes and cross-site fetches). Off
loopback the daemon's --key is needed too, and only hosts --allow-from admits are answered.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


class PanelError(ValueError):
    """A panel setting that cannot be served (a bad --panel value, a non-loopback panel without --key)."""


@dataclass(frozen=True)
class Refusal:
    """Why a request was refused: an HTTP status and a sentence naming the problem."""

    status: int
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"status": self.status, "reason": self.reason}


def new_token() -> str:
    return secrets.token_urlsafe(24)


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", "[::1]"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_panel(text: str, osc_port: int) -> tuple[str, int] | None:
    """`--panel`: off, HOST:PORT, or auto (127.0.0.1 on the TCP port after the OSC one; 0 with --port 0).
    None: no panel. PanelError naming what is expected otherwise."""
    t = text.strip()
    if t.lower() in ("off", "none", "no"):
        return None
    if t.lower() in ("auto", "on", ""):
        return "127.0.0.1", (osc_port + 1 if 0 < osc_port < 65535 else 0)
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PanelError(f"--panel expects off, auto or HOST:PORT such as 127.0.0.1:9011 (port 0: any free one), "
                         f"got {text!r}")
    return host.strip("[]"), int(port)


class Guard:
    """The checks every request to one panel goes through; `check` returns None (answer it) or a Refusal."""

    def __init__(self, host: str, port: int, token: str, key: str | None = None,
                 admits: Callable[[tuple[str, int]], bool] | None = None):
        if not is_loopback_host(host) and not key:
            raise PanelError(f"--panel {host}:{port} is reachable from other machines; it needs the daemon's "
                             "--key (16-256 characters) so that only who has the key can drive the daemon, or "
                             "serve it on loopback (--panel 127.0.0.1:PORT)")
        self.host, self.port, self.token, self.key = host, port, token, key
        self.admits = admits
        self.hosts: set[str] = set()
        self.set_port(port)

    def set_port(self, port: int) -> None:
        """The port is known once bound (--panel HOST:0): the Host values accepted follow it."""
        self.port = port
        names: Iterable[str] = LOOPBACK_NAMES
        if not is_loopback_host(self.host) and self.host not in ("0.0.0.0", "::"):
            names = (*LOOPBACK_NAMES, f"[{self.host}]" if ":" in self.host else self.host)
        self.hosts = {f"{n}:{port}" for n in names}

    @property
    def origins(self) -> set[str]:
        return {f"http://{h}" for h in self.hosts}

    def check(self, target: str, headers: Callable[[str], str | None], peer: tuple[str, int] | None) -> Refusal | None:
        """One request: `target` its path and query, `headers(name)` a header's value or None, `peer` the
        address it came from."""
        if peer is not None and not is_loopback_host(peer[0]):
            if self.admits is not None and not self.admits(peer):
                return Refusal(403, f"{peer[0]} is not in the daemon's --allow-from networks")
        host = headers("Host")
        if host is None or host.lower() not in self.hosts:
            return Refusal(421, f"Host {host!r} is not this panel's address (expected one of "
                                f"{', '.join(sorted(self.hosts))}); a page under another name cannot reach it")
        origin = headers("Origin")
        if origin is not None and origin.lower() not in self.origins:
            return Refusal(403, f"Origin {origin!r} is a foreign page; the panel answers its own page only")
        query = parse_qs(urlsplit(target).query)
        token = (query.get("token") or [""])[0]
        if not hmac.compare_digest(token.encode("utf-8", "replace"), self.token.encode("utf-8")):
            return Refusal(403, "missing or wrong token: open the URL the daemon printed at start "
                                "(http://HOST:PORT/?token=...)")
        if self.key and peer is not None and not is_loopback_host(peer[0]):
            key = (query.get("key") or [""])[0]
            if not hmac.compare_digest(key.encode("utf-8", "replace"), self.key.encode("utf-8")):
                return Refusal(403, "from another machine the panel also needs the daemon's key: add &key=KEY "
                                    "to the URL")
        return None
