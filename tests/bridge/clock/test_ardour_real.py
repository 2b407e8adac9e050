"""`serve --follow osc --ardour` against the real Ardour (Debian's `ardour` package), headless: a fresh
session in `ardour7-lua` on Ardour's JACK backend and a private real-time JACK dummy server, its OSC
control surface switched on and otherwise as Ardour ships it (Port Mode: Manual, Reply Manual Port
8000). The transport is driven from Lua (roll, a new tempo in the tempo map, locate and roll, a
locate that stops, stop, a locate while stopped) and the daemon must follow each: play state,
position, tempo and stop. tests/bridge/clock/test_osc_dialects.py checks the same addressing rules
against a stand-in; this test checks that the real Ardour behaves so.

JACK and not Ardour's own "None (Dummy)" backend: the dummy backend sleeps for what is left of each
cycle and starts the next after it wakes, so on a busy machine its playhead falls behind the wall
clock (118.2 bpm in wall-clock time for 120, 96.2 for 97, here). The daemon derives the tempo from
the wall-clock rate of Ardour's reports, so it measured exactly that. jackd's dummy driver keeps its
cycles on a fixed schedule, and at real-time priority it keeps it under load, as a studio's does."""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bridge.clock.helpers import following_daemon, transport_state
from tests.jack_server import JackServer, jack_server_process

RATE = 48000
TICKS_PER_BEAT = 1920      # Ardour's Temporal::ticks_per_beat
# Ardour's OSC feedback arrives about every 100 ms; the daemon carries the last report forward with the
# derived tempo, so its answer may trail or lead Ardour's playhead by a report's rounding and the fit's
# slack (as the stand-in test allows).
SLACK = 0.15
ASKED = "asked Ardour at"  # the daemon's log line for each handshake it sends


def _ardour_lua() -> tuple[str, str] | None:
    """(the ardourN-lua program, its config folder name) for the newest Ardour installed (checked with
    Debian's Ardour 7.3)."""
    for major in (9, 8, 7):
        program = shutil.which(f"ardour{major}-lua")
        if program is not None:
            return program, f"ardour{major}"
    return None


ARDOUR = _ardour_lua()


@pytest.fixture(autouse=True)
def _ardour_installed() -> None:
    """scripts/setup.sh installs Ardour: its absence is a broken setup, reported as a failure, not skipped."""
    if ARDOUR is None:
        raise AssertionError("Ardour is not installed (no ardour7-lua or later; Debian package ardour, "
                             "which scripts/setup.sh installs)")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _udp_port_bound(port: int) -> bool:
    """Whether some socket on this machine is bound to UDP `port` (Linux's /proc/net/udp)."""
    want = f":{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
            if line.split()[1].endswith(want):
                return True
    return False


class HeadlessArdour:
    """ardour7-lua running tests/bridge/clock/ardour_repl.lua on `backend` ("JACK": the server that
    JACK_DEFAULT_SERVER names): `lua(chunk)` runs a line of Lua inside Ardour and returns what it
    returned, as text."""

    def __init__(self, base: Path, osc_port: int, backend: str):
        program, config_name = ARDOUR
        self.osc_port = osc_port
        # A private config folder: the user's own Ardour settings neither leak in nor get overwritten.
        # Its only settings: the OSC surface on (what ticking "Open Sound Control" in Preferences > Control
        # Surfaces stores) and its port (Ardour's "osc-port", 3819 unless set), a free one so that tests
        # and a running Ardour never share it. Everything else about the surface stays Ardour's default.
        config = base / "xdg-config" / config_name
        config.mkdir(parents=True)
        (config / "config").write_text(
            '<?xml version="1.0" encoding="UTF-8"?>\n<Ardour>\n'
            f'  <Config>\n    <Option name="osc-port" value="{osc_port}"/>\n  </Config>\n'
            '  <ControlProtocols>\n    <Protocol name="Open Sound Control (OSC)" active="1"/>\n'
            '  </ControlProtocols>\n</Ardour>\n')
        env = dict(os.environ, XDG_CONFIG_HOME=str(base / "xdg-config"), XDG_CACHE_HOME=str(base / "xdg-cache"),
                   XDG_DATA_HOME=str(base / "xdg-data"))
        script = Path(__file__).with_name("ardour_repl.lua")
        self.log: list[str] = []
        self.answers: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen([program, str(script), str(base / "ardour-session"), "musicbridge-test", backend],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env=env, text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="ardour-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.log.append(line)
            if line.startswith("@@ "):
                self.answers.put(line[3:])
        self.answers.put(None)

    def _answer(self, timeout: float) -> str:
        try:
            got = self.answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"Ardour did not answer in {timeout} s:\n" + "\n".join(self.log[-30:])) from None
        assert got is not None, f"Ardour exited ({self.proc.poll()}):\n" + "\n".join(self.log[-30:])
        status, _, value = got.partition(" ")
        assert status == "ok", f"Ardour's Lua failed: {value}"
        return value

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self._answer(timeout) == "ready"
        deadline = time.monotonic() + 10.0
        while not _udp_port_bound(self.osc_port):  # Ardour takes the next port if its own is taken
            assert time.monotonic() < deadline, f"Ardour's OSC surface is not on UDP {self.osc_port}"
            time.sleep(0.1)

    def lua(self, chunk: str, timeout: float = 10.0) -> str:
        self.proc.stdin.write(chunk + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    # ------------------------------------------------------------ what a user does in Ardour

    def roll(self) -> None:
        self.lua("Session:request_roll (ARDOUR.TransportRequestSource.TRS_UI)")

    def stop(self) -> None:
        self.lua("Session:request_stop (false, false, ARDOUR.TransportRequestSource.TRS_UI)")

    def locate(self, sample: int, roll: bool) -> None:
        """Move the playhead to `sample`, then roll (Ardour's "locate and roll") or stay stopped."""
        disposition = "MustRoll" if roll else "MustStop"
        self.lua(f"Session:request_locate ({sample}, false, ARDOUR.LocateTransportDisposition.{disposition}, "
                 "ARDOUR.TransportRequestSource.TRS_UI)")

    def set_tempo(self, bpm: float) -> None:
        """The session's tempo (the tempo map's first point), as editing it in the tempo ruler does."""
        self.lua("local tm = Temporal.TempoMap.write_copy (); "
                 f"tm:set_tempo (Temporal.Tempo ({bpm}, {bpm}, 4), Temporal.timepos_t (0)); "
                 "Temporal.TempoMap.update (tm)")

    def rolling(self) -> bool:
        return self.lua("return Session:transport_rolling ()") == "true"

    def sample(self) -> int:
        return int(self.lua("return Session:transport_sample ()"))

    def beat(self) -> float:
        """The playhead in quarter notes from bar 1, through Ardour's own tempo map."""
        return int(self.lua("return Temporal.timepos_t (Session:transport_sample ()):ticks ()")) / TICKS_PER_BEAT

    def tempo(self) -> float:
        return float(self.lua("return Temporal.TempoMap.read ():tempo_at (Temporal.timepos_t "
                              "(Session:transport_sample ())):quarter_notes_per_minute ()"))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(5)


@contextlib.contextmanager
def ardour_on_jack(base: Path) -> Iterator[tuple[JackServer, HeadlessArdour]]:
    """A private real-time JACK server with a headless Ardour on it, Ardour's engine running.

    Ardour 7.3 on jack2 1.9.21 sometimes garbles its requests to jackd while it sets up the new
    session's ports: jackd logs "Unknown request" for the bytes of a port's metadata key
    ("http://jackaudio.org/metadata/pretty-name") and drops the client, and Ardour prints "JACK
    HALTED" (2 runs in 8 on a busy 2-core machine). That happens before Ardour is asked anything,
    so a fresh server and Ardour are started instead, up to 3 times in all."""
    halted = []
    for attempt in range(3):
        with jack_server_process(realtime=True) as server:
            ardour = HeadlessArdour(base / f"ardour-{attempt}", _free_udp_port(), "JACK")
            try:
                try:
                    ardour.wait_ready()
                    running = ardour.lua("return AudioEngine:running ()") == "true"
                except AssertionError:
                    if not any("JACK HALTED" in line for line in ardour.log):
                        raise
                    running = False
                if running:
                    yield server, ardour
                    return
                halted.append("\n".join(ardour.log[-12:]) + "\n" + server.log_text()[-600:])
            finally:
                ardour.close()
    raise AssertionError("Ardour's engine stopped at start in 3 tries:\n" + "\n---\n".join(halted))


def _until(c, want, timeout: float, what: str) -> dict:
    """The daemon's /transport/state once `want` holds, asking until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not want(st := transport_state(c)):
        assert time.monotonic() < deadline, f"{what}: {st}"
        time.sleep(0.1)
    return st


def _until_ardour(want, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not want():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _bounded(ardour: HeadlessArdour, c) -> tuple[float, dict, float]:
    """Ardour's playhead just before the question, the daemon's answer, Ardour's playhead just after."""
    before = ardour.beat()
    st = transport_state(c)
    after = ardour.beat()
    return before, st, after


def test_ardour_with_its_default_osc_settings_is_followed(tmp_path, tiny_model_dir):
    with ardour_on_jack(tmp_path) as (server, ardour), \
            following_daemon(tiny_model_dir, tmp_path, "--follow", "osc",
                             "--ardour", f"127.0.0.1:{ardour.osc_port}") as (d, c):
        try:
            _follow(ardour, d, c)
        except AssertionError as e:
            ardour_log = "\n".join(line for line in ardour.log[-40:] if "call slot" not in line)
            raise AssertionError(f"{e}\n--- Ardour:\n{ardour_log}\n--- jackd:\n{server.log_text()[-2000:]}\n"
                                 f"--- daemon:\n{d.log_text()[-2000:]}") from e


def _follow(ardour: HeadlessArdour, d, c) -> None:
    # Ardour answers the handshake: feedback reaches the daemon's own port, although Ardour's
    # Port Mode is Manual (which would send it to port 8000).
    st = _until(c, lambda s: s["age"] >= 0, 20.0, "no feedback from Ardour")
    assert st["source"] == "osc" and st["playing"] == 0
    assert ardour.tempo() == pytest.approx(120.0)  # a new session's tempo

    # Play: followed, with the tempo derived from how Ardour's bar/beat position advances.
    ardour.roll()
    st = _until(c, lambda s: s["playing"] == 1 and abs(s["tempo"] - 120.0) < 0.5, 15.0, "roll at 120")
    assert ardour.rolling()
    before, st, after = _bounded(ardour, c)
    assert st["playing"] == 1 and 0 <= st["age"] < 1.0
    assert st["tempo"] == pytest.approx(120.0, abs=0.5)
    assert before - SLACK <= st["beat"] <= after + SLACK, (before, st["beat"], after)

    # A new tempo in Ardour's tempo map while it rolls (the bar/beat position jumps with it).
    ardour.set_tempo(97.0)
    assert ardour.tempo() == pytest.approx(97.0)
    st = _until(c, lambda s: abs(s["tempo"] - 97.0) < 0.5, 15.0, "tempo 97")
    before, st, after = _bounded(ardour, c)
    assert st["playing"] == 1 and st["tempo"] == pytest.approx(97.0, abs=0.5)
    assert before - SLACK <= st["beat"] <= after + SLACK, (before, st["beat"], after)

    # Locate and roll, while rolling: to bar 9 (32 quarters at 97 bpm). Ardour holds the playhead
    # there while its disk reader refills, and reports it, without saying it stopped; the daemon
    # carries the position on meanwhile and takes Ardour's reports again once it rolls. So the
    # comparison waits until Ardour has rolled half a beat on from the bar line (several reports).
    ardour.locate(round(32 * 60.0 / 97.0 * RATE), roll=True)
    _until_ardour(lambda: ardour.beat() >= 32.5, 15.0, "Ardour rolling on from bar 9")
    before, st, after = _bounded(ardour, c)
    assert st["playing"] == 1 and 32.5 <= before < 40.0
    assert before - SLACK <= st["beat"] <= after + SLACK, (before, st["beat"], after)

    # Locate while rolling, and stop there (Ardour sends the new bar/beat but no /transport_stop): the
    # daemon stops when Ardour's playhead stands still, at bar 6, and rolls again when Ardour does.
    # It must not wait for its next handshake (after 5 s of silence), which Ardour answers with its
    # whole state, /transport_stop included.
    handshakes = d.log_text().count(ASKED)
    ardour.locate(round(20 * 60.0 / 97.0 * RATE), roll=False)
    _until_ardour(lambda: not ardour.rolling(), 15.0, "Ardour stopped at bar 6")
    st = _until(c, lambda s: s["playing"] == 0, 15.0, "stopped at bar 6 by a locate")
    assert d.log_text().count(ASKED) == handshakes >= 1
    assert ardour.beat() == pytest.approx(20.0, abs=1 / TICKS_PER_BEAT)
    assert st["beat"] == pytest.approx(20.0, abs=1 / TICKS_PER_BEAT)
    ardour.roll()
    _until_ardour(lambda: ardour.beat() >= 20.5, 15.0, "Ardour rolling on from bar 6")
    st = _until(c, lambda s: s["playing"] == 1, 15.0, "rolling again from bar 6")
    before, st, after = _bounded(ardour, c)
    assert st["playing"] == 1 and 20.5 <= before < 28.0
    assert before - SLACK <= st["beat"] <= after + SLACK, (before, st["beat"], after)

    # Stop: the daemon stops where Ardour stopped.
    ardour.stop()
    st = _until(c, lambda s: s["playing"] == 0, 15.0, "stop")
    assert not ardour.rolling()
    stopped = ardour.beat()
    st = transport_state(c)
    assert st["playing"] == 0 and st["beat"] == pytest.approx(stopped, abs=SLACK)

    # Locate while stopped: Ardour reports the new bar/beat, which the daemon takes exactly.
    ardour.locate(round(8 * 60.0 / 97.0 * RATE), roll=False)  # bar 3
    st = _until(c, lambda s: s["beat"] < 16.0, 15.0, "locate to bar 3 while stopped")
    assert st["playing"] == 0 and ardour.beat() == pytest.approx(8.0, abs=1 / TICKS_PER_BEAT)
    assert st["beat"] == pytest.approx(8.0, abs=1 / TICKS_PER_BEAT)
