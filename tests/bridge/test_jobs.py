"""Job planning and the job queue on the real tiny engine: batching, priorities, cancel, stems, shutdown."""

from __future__ import annotations

import threading

import pytest
import soundfile as sf

from bridge.osc import protocol as P
from bridge.stems.jobs import JobQueue, plan_job
from bridge.osc.protocol import Limits, ProtocolError
from bridge.state.session import TrackSettings, Transport
from bridge.stems.plan import plan_stem
from bridge.stems.request import resample_chroma
from model.types import SamplingParams
from plugin_host.tempo import TimeSignature
from presets import load_preset


class RecordingEngine:
    """The real engine, with the size of each generate() batch written down."""

    def __init__(self, engine):
        self._engine, self.batches = engine, []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, requests, progress=None):
        self.batches.append([r.prompt for r in requests])
        return self._engine.generate(requests, progress)


class Events:
    def __init__(self):
        self.items, self.cond = [], threading.Condition()

    def __call__(self, job, kind, payload):
        with self.cond:
            self.items.append((job.id, kind, payload))
            self.cond.notify_all()

    def wait_final(self, ids, timeout=60.0):
        with self.cond:
            ok = self.cond.wait_for(lambda: set(ids) <= {i for i, k, _ in self.items
                                                         if k in ("done", "cancelled", "failed")}, timeout)
        assert ok, self.items
        return {i: (k, p) for i, k, p in self.items if k in ("done", "cancelled", "failed")}


def spec(track, seconds, prompt=None, continuation=None):
    return plan_stem(track, prompt=prompt or track, params=SamplingParams(seed=1, top_k=20), tempo=120.0,
                     signature=TimeSignature(), bars=None, seconds=seconds, model_rate=32000, target_rate=48000,
                     continuation=continuation)


def ids():
    n = iter(range(1, 1000))
    return lambda: next(n)


def test_plan_job_bars_bpm_and_params(tiny_engine):
    gen = P.Generate("/track/d/generate", "d", None, 4, 0)
    t = Transport(tempo=120.0)
    s = plan_job(gen, TrackSettings(prompt="dusty drums", params=(("seed", 7),)), None, t, tiny_engine, Limits())
    assert s.seconds == 8.0 and s.request["prompt"] == "dusty drums, 120 bpm" and s.request["params"]["seed"] == 7
    assert s.render["samples"] == 8 * 48000 and s.render["stretch_to_grid"]  # bars: fitted to the grid
    assert s.request["seconds"] > 8.0  # with room for the stretch
    preset = load_preset("lofi_drums")
    s = plan_job(gen, TrackSettings(preset="lofi_drums", params=(("top_k", 10),)), preset, Transport(tempo=97.5),
                 tiny_engine, Limits())
    assert s.request["prompt"] == f"{preset.prompt}, 97.5 bpm"
    assert s.request["params"]["top_k"] == 10 and s.request["params"]["guidance"] == preset.params["guidance"]
    assert s.request["params"]["seed"] is not None  # drawn, so the stem can be made again
    assert s.render["chain"] and s.render["bars"] == 4 and "97.5 bpm" in s.length_text
    no_bpm = preset.__class__(name="x", prompt="pad", add_bpm=False)
    assert plan_job(gen, TrackSettings(), no_bpm, t, tiny_engine, Limits()).request["prompt"] == "pad"
    located = plan_job(gen, TrackSettings(prompt="x"), None, Transport(tempo=120.0, position=8.0), tiny_engine,
                       Limits())
    assert located.start_seconds == 4.0  # 8 quarter notes at 120 bpm: the stem's BWF time reference
    with pytest.raises(ProtocolError) as e:
        plan_job(gen, TrackSettings(), None, t, tiny_engine, Limits())
    assert e.value.code == "bad_args"
    with pytest.raises(ProtocolError) as e:
        plan_job(P.Generate("/g", "d", None, 64, 0), TrackSettings(prompt="x"), None, t, tiny_engine, Limits())
    assert e.value.code == "limit"
    with pytest.raises(ProtocolError) as e:
        plan_job(gen, TrackSettings(prompt="x", melody=(("kind", "midi"), ("path", "/x.mid"))), None, t, tiny_engine,
                 Limits())
    assert e.value.code == "model"


def test_equal_lengths_share_one_engine_call_and_priority_goes_first(tiny_engine, tmp_path):
    eng = RecordingEngine(tiny_engine)
    ev = Events()
    q = JobQueue(eng, tmp_path, ev, max_queued=8)
    new_id = ids()
    a = q.submit(spec("a", 1.0), ("127.0.0.1", 1), 0, new_id)
    b = q.submit(spec("b", 1.0), ("127.0.0.1", 1), 0, new_id)
    c = q.submit(spec("c", 0.5), ("127.0.0.1", 1), 5, new_id)
    d = q.submit(spec("d", 1.0), ("127.0.0.1", 1), 0, new_id)
    with q:  # the worker starts only now, so all four are waiting
        final = ev.wait_final([a.id, b.id, c.id, d.id])
    assert eng.batches == [["c"], ["a", "b", "d"]]
    for job in (a, b, c, d):
        kind, (path,) = final[job.id]
        assert kind == "done" and job.path is not None and str(job.path) == path
        info = sf.info(path)
        assert info.samplerate == 48000 and info.frames == round(job.plan.seconds * 48000)
    progress = [p for i, k, p in ev.items if k == "progress" and i == a.id]
    assert progress and all(0.0 <= f <= 1.0 for (f,) in progress)


def test_cancel_queued_full_queue_and_shutdown(tiny_engine, tmp_path):
    ev = Events()
    q = JobQueue(tiny_engine, tmp_path, ev, max_queued=2)
    new_id = ids()
    a = q.submit(spec("a", 1.0), ("127.0.0.1", 1), 0, new_id)
    b = q.submit(spec("b", 2.0), ("127.0.0.1", 1), 0, new_id)
    with pytest.raises(ProtocolError) as e:
        q.submit(spec("c", 1.0), ("127.0.0.1", 1), 0, new_id)
    assert e.value.code == "busy"
    assert new_id() == 3  # a refused job used no id
    q.cancel(b.id)
    assert b.state == "cancelled" and ev.items[-1] == (b.id, "cancelled", ())
    with pytest.raises(ProtocolError) as e:
        q.cancel(b.id)
    assert e.value.code == "bad_args"
    with pytest.raises(ProtocolError) as e:
        q.cancel(99)
    assert e.value.code == "not_found"
    q.shutdown(grace=0.0)  # never started: the queued job is cancelled, nothing runs
    assert a.state == "cancelled" and not list(tmp_path.glob("*.wav"))
    with pytest.raises(ProtocolError) as e:
        q.submit(spec("d", 1.0), ("127.0.0.1", 1), 0, new_id)
    assert e.value.code == "busy"


def test_a_failing_job_does_not_stop_the_queue(tiny_engine, tmp_path):
    ev = Events()
    q = JobQueue(tiny_engine, tmp_path, ev)
    new_id = ids()
    bad = q.submit(spec("x", 1.0, continuation={"path": str(tmp_path / "missing.wav"), "seconds": 1.0}),
                   ("127.0.0.1", 1), 0, new_id)
    good = q.submit(spec("y", 0.5), ("127.0.0.1", 1), 0, new_id)
    with q:
        final = ev.wait_final([bad.id, good.id])
    assert final[bad.id][0] == "failed" and final[bad.id][1][0] == "failed"
    assert "missing.wav" in final[bad.id][1][1]
    assert final[good.id][0] == "done"


def test_resample_chroma_onto_the_model_grid():
    import numpy as np

    src = np.eye(12, dtype=np.float32)[[0, 1, 2, 3]]  # 4 frames at 2 fps = 2 s
    out = resample_chroma(src, 2.0, 4.0, 3.0)  # 12 frames at 4 fps; the last second is past the end
    assert out.shape == (12, 12)
    assert [int(r.argmax()) for r in out[:8]] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert not out[8:].any()


def test_a_track_melody_loops_under_a_jam():
    import numpy as np

    from bridge.live.melody_source import LoopedMelody, whole_melody_chroma

    notes = {"kind": "notes", "notes": [[60, 0.0, 1.0], [62, 1.0, 1.0]]}  # 2 beats at 120 bpm = 1 s
    src = LoopedMelody(np.eye(12, dtype=np.float32)[[0, 0, 1, 1]], 4.0)  # 1 s at 4 fps
    assert src.live is False  # a jam asks it for the stretch a chunk will play over
    out = src.chroma(0.0, 2.0, 4.0)  # time 0 = the jam's first bar line = the melody's start
    assert [int(r.argmax()) for r in out] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert [int(r.argmax()) for r in src.chroma(100.5, 0.5, 4.0)] == [1, 1]
    assert [int(r.argmax()) for r in whole_melody_chroma(notes, 4.0, 120.0)] == [0, 0, 2, 2]  # C then D
    chroma = {"kind": "chroma", "data": __import__("bridge.state.session_check", fromlist=["x"]).chroma_to_text(
        np.eye(12, dtype="<f4")[[3, 4]].tobytes()), "frame_rate": 2.0}
    assert [int(r.argmax()) for r in whole_melody_chroma(chroma, 4.0, 120.0)] == [3, 3, 4, 4]


def test_a_looped_melody_reads_the_same_from_any_start_at_a_loop_boundary():
    """A frame centre exactly on a loop boundary (24 s: the 8th repeat of a 3 s loop, at 7.8125
    chroma frames a second) reached from two starts, one with a float sum's rounding noise (as
    the jam's clock gives): the same chroma, so a jam does not re-prefill for nothing."""
    import numpy as np

    from bridge.live.melody_source import LoopedMelody

    rate = 7.8125
    src = LoopedMelody(np.eye(12, dtype=np.float32)[[0] * 8 + [4] * 8 + [7] * 7], rate, bar_seconds=1.0)
    assert src.seconds == 3.0
    clock = 1000.123  # an output time: start = (clock + 1.92) - clock is 1.92 give or take a few ulps
    noisy = (clock + 1.92) - clock
    assert noisy != 1.92  # the case that used to flip
    a = src.chroma(0.0, 30.0, rate)
    b = src.chroma(noisy, 28.0, rate)
    assert np.array_equal(a[15 : 15 + len(b)], b)  # 1.92 s = 15 frames later
    assert int(a[187].argmax()) == 0  # the centre at 24.0 s is the loop's start (C)


def test_a_chroma_melody_job_on_a_melody_model(tiny_melody_engine, tmp_path):
    import json

    import numpy as np

    from bridge.state.session_check import chroma_to_text

    chroma = np.eye(12, dtype="<f4")[[0, 4, 7, 4] * 4]  # 16 frames at 8 fps = 2 s
    melody = {"kind": "chroma", "data": chroma_to_text(chroma.tobytes()), "frame_rate": 8.0}
    gen = P.Generate("/track/m/generate", "m", 1.5, None, 0)
    track = TrackSettings(prompt="piano", melody=tuple(sorted(melody.items())))
    no_bpm = load_preset("lofi_drums").__class__(name="x", prompt="unused", add_bpm=False)  # see test_osc_daemon
    s = plan_job(gen, track, no_bpm, Transport(), tiny_melody_engine, Limits())
    assert s.request["melody"]["frames"] == 16 and len(s.request["melody"]["sha256"]) == 64
    ev = Events()
    q = JobQueue(tiny_melody_engine, tmp_path, ev)
    with q:
        job = q.submit(s, ("127.0.0.1", 1), 0, ids())
        final = ev.wait_final([job.id])
    kind, (path,) = final[job.id]
    assert kind == "done" and sf.info(path).frames == 72000
    side = json.loads(open(path[:-4] + ".json").read())
    assert side["melody"]["kind"] == "chroma" and side["prompt"] == "piano"


def test_live_plays_take_places_under_max_queued(tiny_engine, tmp_path):
    """A burst of live plays is capped by the same limit as queued jobs, and queued jobs see them."""
    ev = Events()
    q = JobQueue(tiny_engine, tmp_path, ev, max_queued=3)
    release = threading.Event()

    def play(job, request, progress):  # stands for playing while generating: holds its place until released
        release.wait(60)
        return None  # as a cancelled play: no stem

    new_id = ids()
    live = [q.run_live(spec(f"l{i}", 1.0), ("127.0.0.1", 1), new_id, play) for i in range(2)]
    queued = q.submit(spec("a", 1.0), ("127.0.0.1", 1), 0, new_id)
    for attempt in (lambda: q.run_live(spec("l9", 1.0), ("127.0.0.1", 1), new_id, play),
                    lambda: q.submit(spec("b", 1.0), ("127.0.0.1", 1), 0, new_id),
                    lambda: q.submit_all([spec("c", 1.0)] * 2, ("127.0.0.1", 1), 0, new_id)):
        with pytest.raises(ProtocolError) as e:
            attempt()
        assert e.value.code == "busy" and "2 playing live" in e.value.message, e.value.message
    assert new_id() == 4  # refused plays and jobs used no id
    q.cancel(queued.id)
    release.set()
    ev.wait_final([j.id for j in live])
    after = q.run_live(spec("l3", 1.0), ("127.0.0.1", 1), new_id, play)  # the places are free again
    ev.wait_final([after.id])
    q.shutdown(grace=0.0)


def test_a_job_whose_acceptance_fails_is_not_kept_and_variations_are_all_or_none(tiny_engine, tmp_path):
    """`accepted` stands for the daemon's journal write: when it raises, the job never existed, and
    the takes of a variations request announced before the failing one are withdrawn."""
    ev = Events()
    q = JobQueue(tiny_engine, tmp_path, ev, max_queued=8)
    new_id = ids()
    calls = []

    def accepted(job):
        calls.append(job.id)
        if len(calls) in (1, 3):
            raise ProtocolError("failed", "could not write the job journal")

    with pytest.raises(ProtocolError, match="journal"):
        q.submit(spec("a", 1.0), ("127.0.0.1", 1), 0, new_id, accepted)
    assert 1 not in q.jobs
    with pytest.raises(ProtocolError, match="journal"):
        q.submit_all([spec("v", 1.0)] * 3, ("127.0.0.1", 1), 0, new_id, accepted)
    assert calls == [1, 2, 3]
    assert q.jobs[2].state == "cancelled" and 3 not in q.jobs  # take 2 was announced, take 3 was not
    assert ev.items == [(2, "cancelled", ())]
    assert q.submit(spec("b", 1.0), ("127.0.0.1", 1), 0, new_id, accepted).id == 4  # the queue is empty again
    q.shutdown(grace=0.0)
