"""Follow Ableton Link (through the `linkpython-extern` wheel): tempo, beat and phase, start/stop.

A follower must never move the leader's tempo, and in Link the session that has existed longer
wins when two meet (Link's Sessions.hpp: the session whose ghost time is ahead by more than
0.5 s; closer than that, the smaller session id). A daemon that enabled Link first and waited
would own the oldest session, and a DAW enabling Link later would be pulled to the daemon's
tempo. So the daemon does not enable Link until it has heard another peer: it listens to Link's
discovery multicast itself (a plain UDP socket in the group, which announces nothing), and only
JOIN_AFTER seconds after it first heard a peer does it enable Link, founding a session younger
than that peer's by more than Link's 0.5 s, which therefore loses: the daemon joins the existing
session and takes its tempo, beat and phase. When the last peer has gone it disables Link again
and goes back to listening, so a DAW that enables Link later is not pulled to a stale session.
Until a peer is heard, the daemon has no Link grid: `/transport/state` shows the typed
transport under the name `link` with age -1, and nothing is proposed to anyone.

The bar is the quantum, so the beat read here has the same phase against the bar line as every
other peer's: bar lines fall where the session's bar lines fall. Start/stop sync is on, so a
peer pressing play starts us too. Link's clock (CLOCK_MONOTONIC_RAW microseconds on Linux) is
not time.monotonic: every poll reads both clocks together and maps Link time onto ours.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from bridge.clock.follower import ClockError, Follower, PollThread, log
from bridge.clock.grid import MAX_BPM, MIN_BPM, Grid, Timeline

POLL_SECONDS = 0.02
LINK_GROUP, LINK_PORT = "224.76.78.75", 20808  # Link's discovery multicast (IPv4)
JOIN_AFTER = 1.0    # > Link's 0.5 s session tie window: the peer's session is older than ours by this much
LEAVE_AFTER = 1.0   # no peer this long (after joining had time to find them): disable Link, listen again
FIND_PEERS = 3.0    # after enabling, Link's own discovery has this long to count the peer we heard
_HEADER = b"_asdp_v\x01"
_ALIVE, _RESPONSE, _BYEBYE = 1, 2, 3


@dataclass(frozen=True)
class HeardPeer:
    """A Link node heard on the discovery multicast: its id, its session's tempo, and when."""

    node: bytes
    tempo: float | None
    first: float   # time.monotonic() it was first heard (since it was last gone)
    last: float    # ... and last heard
    ttl: float     # seconds its announcement stays valid


def parse_discovery(data: bytes) -> tuple[int, bytes, int, float | None] | None:
    """(message type, node id, ttl seconds, session tempo or None) of one Link discovery datagram,
    or None when it is not one. Layout (Link's discovery v1): "_asdp_v\\x01", type (1 byte),
    ttl (1), group (2), node id (8), then entries of key (4), size (4, big-endian), data; the
    timeline entry 'tmln' starts with the tempo as microseconds per beat (int64)."""
    if len(data) < 20 or not data.startswith(_HEADER):
        return None
    kind, ttl = data[8], data[9]
    node = data[12:20]
    tempo, i = None, 20
    while i + 8 <= len(data):
        key, size = data[i:i + 4], struct.unpack(">I", data[i + 4:i + 8])[0]
        if key == b"tmln" and size >= 8 and i + 16 <= len(data):
            micros = struct.unpack(">q", data[i + 8:i + 16])[0]
            tempo = 60e6 / micros if micros > 0 else None
        i += 8 + size
    return kind, node, ttl, tempo


class DiscoveryListener:
    """Hears Link peers without being one: a UDP socket bound to Link's port (shared, as Link's own
    sockets share it) and joined to the discovery group on every interface. A context manager."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.peers: dict[bytes, HeardPeer] = {}
        self._sock: socket.socket | None = None

    def __enter__(self) -> DiscoveryListener:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(AttributeError, OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("", LINK_PORT))
            joined = []
            for index, name in socket.if_nameindex():  # Link announces itself on every interface
                mreq = struct.pack("4s4si", socket.inet_aton(LINK_GROUP), socket.inet_aton("0.0.0.0"), index)
                try:
                    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
                    joined.append(name)
                except OSError:
                    pass  # an interface without IPv4 or multicast
            if not joined:
                raise ClockError(f"cannot follow Link: no network interface could join Link's discovery group "
                                 f"{LINK_GROUP}:{LINK_PORT} (is multicast enabled on an interface, and a route for "
                                 "224.0.0.0/4?)")
            s.setblocking(False)
        except OSError as e:
            s.close()
            raise ClockError(f"cannot follow Link: cannot listen for Link peers on UDP {LINK_PORT}: {e}") from None
        except BaseException:
            s.close()
            raise
        self._sock = s
        return self

    def read(self) -> None:
        """Take every datagram waiting; forget peers that said bye or whose announcement expired."""
        now = self.clock()
        while True:
            try:
                data, _addr = self._sock.recvfrom(4096)
            except (BlockingIOError, InterruptedError):
                break
            got = parse_discovery(data)
            if got is None:
                continue
            kind, node, ttl, tempo = got
            if kind == _BYEBYE:
                self.peers.pop(node, None)
            elif kind in (_ALIVE, _RESPONSE):
                old = self.peers.get(node)
                self.peers[node] = HeardPeer(node, tempo if tempo is not None else (old.tempo if old else None),
                                             old.first if old else now, now, float(ttl))
        for node, p in list(self.peers.items()):
            if now - p.last > p.ttl:
                del self.peers[node]

    def forget(self) -> None:
        """Drop what was heard (our own Link node announced itself while it was enabled)."""
        if self._sock is not None:
            while True:
                try:
                    self._sock.recvfrom(4096)
                except (BlockingIOError, InterruptedError):
                    break
        self.peers.clear()

    def oldest(self) -> HeardPeer | None:
        return min(self.peers.values(), key=lambda p: p.first, default=None)

    def __exit__(self, *exc) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class LinkFollower(Follower):
    source = "link"

    def __init__(self, base: Grid, on_update: Callable[[Grid], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(base, on_update, clock)
        self._module = None
        self._link = None
        self._listener = DiscoveryListener()
        self._joined_at = 0.0
        self._alone_since: float | None = None
        self._poll = PollThread("link", self.poll, POLL_SECONDS)
        self.timeline = Timeline(tempo_tolerance=1e-3)  # Link has beats, not a DAW timeline: tempos summed

    def __enter__(self) -> LinkFollower:
        try:
            import link  # the Link library loads only for --follow link
        except ImportError:
            raise ClockError("--follow link needs the linkpython-extern package "
                             "(pip install linkpython-extern)") from None
        self._module = link
        self._listener.__enter__()
        log.info("Link: listening for a Link session to join (the daemon founds none of its own: it would pull "
                 "a DAW that enables Link later to the daemon's tempo)")
        self.poll()
        self._poll.start()
        return self

    @property
    def peers(self) -> int:
        return int(self._link.numPeers()) if self._link is not None else 0

    @property
    def joined(self) -> bool:
        return self._link is not None

    def poll(self) -> None:
        if self._link is None:
            self._listen()
        if self._link is not None:
            self._follow()

    def _listen(self) -> None:
        self._listener.read()
        peer = self._listener.oldest()
        if peer is None or time.monotonic() - peer.first < JOIN_AFTER:
            return
        # The constructor's tempo is only our own session's, which loses to the older one we heard;
        # the heard session's tempo keeps even that momentary session from differing.
        tempo = min(MAX_BPM, max(MIN_BPM, peer.tempo or self.base.tempo))
        lk = self._module.Link(tempo)
        lk.startStopSyncEnabled = True
        lk.enabled = True
        self._link, self._joined_at, self._alone_since = lk, time.monotonic(), None
        log.info("Link: joining the session of the peer heard at %.2f bpm", tempo)

    def _follow(self) -> None:
        lk = self._link
        now_m = time.monotonic()
        if lk.numPeers() == 0:
            if now_m - self._joined_at < FIND_PEERS:
                return  # Link's own discovery has not counted the peer yet; nothing to follow
            if self._alone_since is None:
                self._alone_since = now_m
            if now_m - self._alone_since >= LEAVE_AFTER:
                self._leave()
                return
        else:
            self._alone_since = None
        state = lk.captureAppSessionState()
        micros = lk.clock().micros()
        now = self.clock()
        num, den = self.base.numerator, self.base.denominator
        quantum = num * 4.0 / den                      # Link counts quarter notes; a bar is the quantum
        beat = state.beatAtTime(micros, quantum) * den / 4.0
        tempo = min(MAX_BPM, max(MIN_BPM, float(state.tempo())))
        if state.isPlaying():
            self.timeline.observe(beat / num, tempo, num, den)
        self.publish(tempo=tempo, playing=bool(state.isPlaying()), anchor_time=now, anchor_beat=beat)

    def _leave(self) -> None:
        """The last peer has gone: disable Link (our session would outlive theirs and pull the next
        DAW that enables Link), keep the last grid (it ages), and listen again."""
        self._link.enabled = False
        self._link = None
        self._listener.forget()
        log.info("Link: no peer left; disabled Link and listening for the next session")

    def close(self) -> None:
        self._poll.close()
        if self._link is not None:
            self._link.enabled = False
            self._link = None
        self._listener.__exit__(None, None, None)
