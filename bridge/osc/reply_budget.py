"""No amplification: what the daemon sends a host in reply is paid for by what that host sent.

UDP source addresses can be forged, so an answer bigger than its question turns the daemon
into a reflector: a forged 16 KB bundle of queries once brought 506 KB down on the forged
address. Each sender host therefore has a byte credit:

- every datagram received from the host earns its size in credit (bundles included), banked
  up to BANK bytes;
- a reply to that host is sent only if the credit covers its size, and is then paid from it;
- whatever the credit, a host gets at most RATE_CAP reply bytes a second.

So the bytes sent to a host that has not proved its address never exceed the bytes received
from it. Events the daemon sends later (a job's progress and end, a jam's chunks) are paid from
the same credit; a progress event takes only credit above EVENT_RESERVE, so what a host paid
for stays for the events that end its jobs. Whatever does not fit is dropped and counted; a
job's final state stays queryable. A client whose question is smaller than its answer (a 16-byte
`/status`) pads it (`/pad`, or trailing arguments the message ignores), proves its address, or
has the daemon answer an address the operator chose (`serve --reply-to`).

A client proves its address (IP and port) as DTLS and QUIC clients do, with a cookie round
trip: `/cookie` is answered (from credit, like any reply) with a cookie only that address
receives, an HMAC of its IP, port and the current minute under a secret made at start; `/prove
<cookie>` sent back from the same address in that minute or the next marks the address proven
for PROVEN_SECONDS. A forged source address cannot see its cookie, so cannot prove it. Replies
and events to a proven address need no credit (they go where they were asked for); the rate cap
still holds, so a forger who knows a proven address and port reflects at most RATE_CAP bytes a
second onto it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

Address = tuple[str, int]

BANK = 65536
RATE_CAP = 65536
MAX_HOSTS = 4096
EVENT_RESERVE = 2048     # credit a progress event leaves for the events that end a host's jobs
COOKIE_WINDOW = 60       # seconds: a cookie is good in its minute and the next
PROVEN_SECONDS = 86400   # how long a proof lasts; a client proves again at start or once a day
COOKIE_CHARS = 32        # hex characters of the HMAC a cookie carries


@dataclass
class _Host:
    credit: float = 0.0
    second: int = -1
    sent_this_second: int = 0


class ReplyBudget:
    """Per-host byte credit; thread-safe. `received` before handling a packet, `spend` per reply."""

    def __init__(self, clock=time.monotonic, secret: bytes | None = None):
        self._clock = clock
        self._secret = secret if secret is not None else os.urandom(32)
        self._hosts: OrderedDict[str, _Host] = OrderedDict()
        # proven addresses -> until when; a table of its own, so a flood of forged sources (which
        # fills the credit table) cannot push a proven address out: only real proofs enter it
        self._proven: OrderedDict[Address, float] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0
        self.dropped_bytes = 0

    def _host(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host()
            if len(self._hosts) > MAX_HOSTS:
                self._hosts.popitem(last=False)
        else:
            self._hosts.move_to_end(host)
        return h

    def received(self, host: str, nbytes: int) -> None:
        """A datagram of `nbytes` arrived from `host`: its size is the host's to spend on replies."""
        with self._lock:
            h = self._host(host)
            h.credit = min(float(BANK), h.credit + nbytes)

    def cookie(self, to: Address) -> str:
        """The cookie address `to` (IP and port) must send back with /prove: bound to it and to this minute."""
        return self._cookie(to, int(self._clock() // COOKIE_WINDOW))

    def _cookie(self, to: Address, window: int) -> str:
        mac = hmac.new(self._secret, f"{to[0]}|{to[1]}|{window}".encode(), hashlib.sha256)
        return mac.hexdigest()[:COOKIE_CHARS]

    def prove(self, to: Address, cookie: str) -> bool:
        """True, and `to` is proven, when `cookie` is one this budget gave `to` in this minute or the last."""
        window = int(self._clock() // COOKIE_WINDOW)
        if not any(hmac.compare_digest(cookie.encode(), self._cookie(to, w).encode())
                   for w in (window, window - 1)):
            return False
        self.trust(to)
        return True

    def trust(self, to: Address) -> None:
        """Mark address `to` proven now (a proof, or one recorded with a job the last run accepted)."""
        with self._lock:
            self._proven[to] = self._clock() + PROVEN_SECONDS
            self._proven.move_to_end(to)
            if len(self._proven) > MAX_HOSTS:
                self._proven.popitem(last=False)

    def proven(self, to: Address) -> bool:
        with self._lock:
            return self._proven_locked(to)

    def _proven_locked(self, to: Address) -> bool:
        until = self._proven.get(to)
        if until is not None and until <= self._clock():
            del self._proven[to]
            until = None
        return until is not None

    def spend(self, to: Address, nbytes: int, keep: int = 0) -> bool:
        """True (and paid) when a reply of `nbytes` to address `to` fits its host's budget; False: do not send it.

        keep: credit the reply must leave unspent (EVENT_RESERVE for progress events). A proven
        address needs no credit; the rate cap holds for it too.
        """
        with self._lock:
            proven = self._proven_locked((to[0], to[1]))
            h = self._host(to[0])
            sec = int(self._clock())
            if sec != h.second:
                h.second, h.sent_this_second = sec, 0
            ok = h.sent_this_second + nbytes <= RATE_CAP
            if ok and not proven:
                ok = h.credit >= nbytes + keep
                if ok:
                    h.credit -= nbytes
            if ok:
                h.sent_this_second += nbytes
            else:
                self.dropped += 1
                self.dropped_bytes += nbytes
            return ok
