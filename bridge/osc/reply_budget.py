"""No amplification: what the daemon sends a host in reply is paid for by what that host sent.

UDP source addresses can be forged, so an answer bigger than its question turns the daemon
into a reflector: a forged 16 KB bundle of queries once brought 506 KB down on the forged
address. Each sender host therefore has a byte credit:

- every datagram received from the host earns its size in credit (bundles included), banked
  up to BANK bytes;
- a reply to that host is sent only if the credit covers its size, and is then paid from it;
- a packet holding one message (not a bundle), or a malformed packet (one /error), may also
  draw on a small allowance that refills
  at ALLOWANCE_RATE bytes a second (burst ALLOWANCE_BURST), so a client polling /status, whose
  answer is bigger than the 12-byte question, is still answered;
- whatever the credit, a host gets at most RATE_CAP reply bytes a second.

So over any time t, the reply bytes sent to one host are at most the bytes received from it plus
ALLOWANCE_BURST + ALLOWANCE_RATE * t, and for bundles the allowance is never used. Replies that
do not fit are dropped and counted. Job events (progress, done) are not replies to a packet and
are not paid from the budget: they are bounded by the job queue (see docs/security.md).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

BANK = 65536
RATE_CAP = 65536
ALLOWANCE_BURST = 2048
ALLOWANCE_RATE = 1024
MAX_HOSTS = 4096


@dataclass
class _Host:
    credit: float = 0.0
    allowance: float = float(ALLOWANCE_BURST)
    refilled: float = 0.0
    second: int = -1
    sent_this_second: int = 0


class ReplyBudget:
    """Per-host byte credit; thread-safe. `received` before handling a packet, `spend` per reply."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._hosts: OrderedDict[str, _Host] = OrderedDict()
        self._lock = threading.Lock()
        self._lone = threading.local()  # on the receive thread: is the packet being handled a lone message?
        self.dropped = 0
        self.dropped_bytes = 0

    def _host(self, host: str) -> _Host:
        h = self._hosts.get(host)
        if h is None:
            h = self._hosts[host] = _Host(refilled=self._clock())
            if len(self._hosts) > MAX_HOSTS:
                self._hosts.popitem(last=False)
        else:
            self._hosts.move_to_end(host)
        return h

    def received(self, host: str, nbytes: int, bundle: bool) -> None:
        """A datagram of `nbytes` arrived from `host`; replies sent on this thread until the next call draw on it."""
        with self._lock:
            h = self._host(host)
            h.credit = min(float(BANK), h.credit + nbytes)
        self._lone.value = not bundle

    def spend(self, host: str, nbytes: int) -> bool:
        """True (and paid) when a reply of `nbytes` to `host` fits the budget; False: do not send it."""
        lone = getattr(self._lone, "value", False)
        with self._lock:
            h = self._host(host)
            now = self._clock()
            h.allowance = min(float(ALLOWANCE_BURST), h.allowance + (now - h.refilled) * ALLOWANCE_RATE)
            h.refilled = now
            sec = int(now)
            if sec != h.second:
                h.second, h.sent_this_second = sec, 0
            ok = h.sent_this_second + nbytes <= RATE_CAP
            if ok:
                if h.credit >= nbytes:
                    h.credit -= nbytes
                elif lone and h.credit + h.allowance >= nbytes:
                    h.allowance -= nbytes - h.credit
                    h.credit = 0.0
                else:
                    ok = False
            if ok:
                h.sent_this_second += nbytes
            else:
                self.dropped += 1
                self.dropped_bytes += nbytes
            return ok
