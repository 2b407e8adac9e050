"""AudioOutputProcess on JACK: the callback in a child process, rings in shared memory, same results."""

from __future__ import annotations

import time

import numpy as np
import pytest

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
    from plugin_host.output_process import AudioOutputProcess

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
    from plugin_host.output_process import AudioOutputProcess

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
    from plugin_host.output import OutputError
    from plugin_host.output_process import AudioOutputProcess

    with pytest.raises(OutputError, match="not found"):
        with AudioOutputProcess(device="no such device"):
            pass


def test_a_jam_runs_on_the_audio_process(jack, tiny_engine):
    from bridge.live.jam import Jam
    from plugin_host.output_process import AudioOutputProcess

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
