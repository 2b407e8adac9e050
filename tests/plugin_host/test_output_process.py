"""AudioOutputProcess on JACK: the callback in a child process, rings in shared memory, same results."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from bridge.live.jam import Jam
from plugin_host.output import OutputError
from plugin_host.output_process import STALL_SECONDS, AudioOutputProcess
from tests.jack_server import jack_server
from tests.plugin_host.jack_capture import align, assert_exact_unless_xrun, capture

SR = 48000


@pytest.fixture(scope="module")
def jack():
    with jack_server(rate=SR, period=256) as name:
        yield name


def _until(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_track_from_this_process_plays_bit_exact_from_the_audio_process(jack):
    x = (np.random.default_rng(5).standard_normal((SR, 2)) * 0.1).astype(np.float32)
    with capture(4.0) as cap, AudioOutputProcess(samplerate=SR) as out:
        cap.connect()
        t = out.add_track("st", channels=2, start_frame=out.position + out.seconds_to_frames(0.2))
        assert t.push(x, timeout=5) == len(x)
        t.finish()
        x0 = out.xruns
        _until(lambda: t.done)
        stats = out.stats()
        assert out.position > 0 and out.active
    rec = cap.audio
    off = align(rec[0], x[:, 0])
    assert_exact_unless_xrun(rec, x.T, off, stats["xruns"] - x0)
    assert stats["tracks"]["st"]["underruns"] == 0 and stats["tracks"]["st"]["state"] == "ended"
    assert stats["device_latency"] > 0


def test_gain_and_stop_reach_the_child_through_shared_state(jack):
    dc = np.full((SR * 3, 1), 0.5, np.float32)
    with capture(5.0) as cap, AudioOutputProcess(samplerate=SR) as out:
        cap.connect()
        t = out.add_track("dc", 1, gain=0.5)
        t.push(dc[: SR // 2], timeout=5)
        _until(lambda: t.start_frame is not None)
        t.stop_at(t.start_frame + SR // 4, SR // 8)  # fade over 1/8 s, silent from 1/4 s on
        _until(lambda: t.done)
        out.remove_track("dc")
        assert out.tracks == ()
    left = cap.audio[0]
    nz = np.nonzero(left)[0]
    assert left[nz[0]] == np.float32(0.25)  # gain 0.5 applied by the child
    assert nz[-1] - nz[0] + 1 <= SR // 4  # and silent from the stop frame on
    assert left[nz[-1]] < 0.25 * 8 / SR * 2  # after a linear fade, not a cut


def test_bad_device_is_reported_from_the_child(jack):
    with pytest.raises(OutputError, match="not found"):
        with AudioOutputProcess(device="no such device"):
            pass


def test_a_jam_runs_on_the_audio_process(jack, tiny_engine):
    with AudioOutputProcess(samplerate=SR) as out:
        with Jam(tiny_engine, out, "keys", "piano", tempo=240.0, chunk_bars=1, context_seconds=1.0) as jam:
            jam.start()
            _until(lambda: len(jam.history) >= 3)
            end = jam.stop()
            assert jam.wait(10)
            status = jam.status()
    starts = [h["start_frame"] for h in jam.history]
    assert [s - starts[0] for s in starts] == [k * SR for k in range(len(starts))]
    assert (starts[0] - jam.origin_frame) % SR == 0 and (end - jam.origin_frame) % SR == 0
    assert status["state"] == "stopped" and status["underruns"] == 0 and status["error"] is None


def test_tracks_added_and_removed_from_many_threads_at_once_keep_the_pipe_whole(jack):
    """Control calls from several threads at once (a jam, live plays, their release threads):
    every add and remove gets its own answer; the child never reads two messages spliced together."""
    errors: list[BaseException] = []
    events: list[tuple[str, str]] = []
    with AudioOutputProcess(samplerate=SR, on_event=lambda k, m: events.append((k, m))) as out:
        proc = out._proc

        def churn(i: int) -> None:
            try:
                for k in range(25):
                    out.add_track(f"t{i}-{k}", 2, buffer_seconds=0.5)
                    out.remove_track(f"t{i}-{k}")
            except BaseException as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

        threads = [threading.Thread(target=churn, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads)
        assert out.tracks == () and out._proc is proc and out.active  # the same child, never replaced
    assert errors == [] and events == [], (errors, events)


def _shm_names() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def test_a_killed_audio_process_is_reported_and_reopened_and_the_track_plays_on(jack):
    """kill -9 of the child while a track plays: on_event says it was lost, then reopened; the new
    child plays on from the same ring where the clock stopped, so what was queued is heard."""
    import jack as jackmod  # JACK-Client, the test extra: only where a test probes the server

    events: list[tuple[str, str]] = []
    x = (np.random.default_rng(7).standard_normal((SR * 7 // 2, 2)) * 0.1).astype(np.float32)
    tail = x[-SR:]  # the last second: queued before the kill, played by the new child
    before = _shm_names()
    with capture(10.0) as cap, AudioOutputProcess(samplerate=SR, on_event=lambda k, m: events.append((k, m))) as out:
        cap.connect()
        t = out.add_track("st", channels=2, buffer_seconds=4.0)
        assert t.push(x, timeout=5) == len(x)
        t.finish()
        _until(lambda: t.played_frames >= SR // 4)
        old = out._proc
        mine = _shm_names() - before
        assert len(mine) >= 2  # the clock and the track
        os.kill(old.pid, signal.SIGKILL)
        _until(lambda: [k for k, _ in events] == ["lost", "reopened"])
        assert out._proc is not old and out.active and out.restarts == 1
        assert "killed by a signal" in events[0][1] and "reopened" in events[1][1]
        cap.connect()  # the new child is a new JACK client
        with jackmod.Client("mb-clock", no_start_server=True) as probe:
            reconnected_at = probe.frame_time
        x0 = out.xruns
        assert t.played_frames < len(x) - len(tail)  # the tail is still to come
        _until(lambda: t.done)
        # every frame queued was played but the one period the killed child was rendering; none ran dry
        assert len(x) - 256 <= t.played_frames <= len(x) and t.underruns == 0, (t.played_frames, t.underruns)
        xruns = out.xruns - x0
        out.remove_track("st")
    assert not (mine & _shm_names())  # nothing the output made is left in /dev/shm
    rec = cap.audio
    after = int(np.searchsorted(cap.block_frames, reconnected_at))
    first = int(cap.block_starts[min(after, len(cap.block_starts) - 1)])
    off = first + align(rec[0, first:], tail[:, 0])
    assert_exact_unless_xrun(rec, tail.T, off, xruns)  # the tail arrived whole, from the new child


def test_a_stopped_audio_process_is_killed_and_reopened_when_its_clock_stands_still(jack):
    """SIGSTOP: the child lives but plays nothing; once its clock has stood still for STALL_SECONDS
    the watchdog kills it and reopens, and the track goes on playing."""
    events: list[tuple[str, str]] = []
    x = np.full((SR * 3, 1), 0.25, np.float32)
    with AudioOutputProcess(samplerate=SR, on_event=lambda k, m: events.append((k, m))) as out:
        t = out.add_track("dc", 1, buffer_seconds=4.0)
        assert t.push(x, timeout=5) == len(x)
        t.finish()
        _until(lambda: t.played_frames >= SR // 4)
        old = out._proc
        os.kill(old.pid, signal.SIGSTOP)
        stopped_at = out.position
        _until(lambda: [k for k, _ in events] == ["lost", "reopened"], timeout=4 * STALL_SECONDS)
        assert "stood still" in events[0][1] and out._proc is not old and out.restarts == 1
        assert not old.is_alive()  # the stopped child was killed, not left behind
        _until(lambda: t.done)
        assert out.position > stopped_at
        assert len(x) - 256 <= t.played_frames <= len(x) and t.underruns == 0, (t.played_frames, t.underruns)


def test_a_reopen_that_fails_is_reported_and_retried_until_the_server_is_back(jack, monkeypatch):
    """The child dies while its audio server cannot be reached (here: the JACK server name it
    would start with names no server): the watchdog reports `lost`, then `reopen_failed` with the
    reason for each attempt that cannot open the device, and keeps trying; once the server is
    reachable again the next attempt reopens and the track plays on."""
    import sounddevice as sd  # PortAudio scans the host APIs when imported: after the server is up

    device = next(d["name"] for d in sd.query_devices()
                  if d["max_output_channels"] > 0 and sd.query_hostapis(d["hostapi"])["name"] == "JACK Audio Connection Kit")
    events: list[tuple[str, str]] = []
    x = np.full((SR * 4, 1), 0.25, np.float32)
    with AudioOutputProcess(device=device, samplerate=SR, on_event=lambda k, m: events.append((k, m))) as out:
        t = out.add_track("dc", 1, buffer_seconds=5.0)
        assert t.push(x, timeout=5) == len(x)
        t.finish()
        _until(lambda: t.played_frames >= SR // 4)
        monkeypatch.setenv("JACK_DEFAULT_SERVER", "mbtest-no-such-server")  # what a new child starts with
        os.kill(out._proc.pid, signal.SIGKILL)
        _until(lambda: [k for k, _ in events][:2] == ["lost", "reopen_failed"], timeout=60)
        assert not out.active and out.restarts == 0
        assert f"'{device}' not found" in events[1][1], events[1][1]  # the reason: the device is gone
        monkeypatch.setenv("JACK_DEFAULT_SERVER", jack)
        _until(lambda: events[-1][0] == "reopened", timeout=60)
        kinds = [k for k, _ in events]
        # lost once, then only failed attempts, then one reopen
        assert kinds[0] == "lost" and kinds[-1] == "reopened" and set(kinds[1:-1]) == {"reopen_failed"}
        assert out.active and out.restarts == 1
        played = t.played_frames
        _until(lambda: t.played_frames > played)  # the new child plays the track on
