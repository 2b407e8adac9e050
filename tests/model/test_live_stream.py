"""LiveStream (a jam's endless token stream) and StepGate (live steps before offline ones)."""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from model.decode.live_stream import LiveStream
from model.decode.scheduler import StepGate
from model.types import GenerationRequest, SamplingParams


def _codes(stream: LiveStream, *stops: int) -> np.ndarray:
    parts = []
    for stop in stops:
        parts += list(stream.advance(stop, piece_frames=7, first_piece_frames=3))
    return np.concatenate(parts, axis=1)


def test_chunks_continue_one_decode_state_exactly(tiny_engine):
    """Pausing between chunks changes nothing: the same tokens as one uninterrupted run, one prefill."""
    whole = LiveStream(tiny_engine, "drums", SamplingParams(seed=3), context_seconds=1.0)
    chunked = LiveStream(tiny_engine, "drums", SamplingParams(seed=3), context_seconds=1.0)
    a = _codes(whole, 120)
    b = _codes(chunked, 13, 50, 51, 99, 120)
    assert a.shape == (tiny_engine.num_codebooks, 120)
    assert np.array_equal(a, b)
    assert whole.prefills == chunked.prefills == 1  # no re-prefill inside the window


def test_the_window_slides_from_the_streams_own_codes(tiny_engine):
    s = LiveStream(tiny_engine, "drums", SamplingParams(seed=1), context_seconds=0.5, window_seconds=2.0)
    codes = _codes(s, 260)  # 2 s window = 100 frames: slides at 100 and at 175 (25 frames of context)
    assert codes.shape[1] == 260 and s.frames == 260
    assert s.prefills == 4
    assert (codes >= 0).all() and (codes < 2048).all()


def test_a_stream_says_which_target_slides_its_window(tiny_engine):
    """The jam starts a chunk that slides the window without waiting (bridge/live/jam.py): the
    stream tells it exactly when a target needs the next window."""
    s = LiveStream(tiny_engine, "drums", SamplingParams(seed=1), context_seconds=0.5, window_seconds=2.0)
    assert not s.slides_before(50)  # nothing prefilled yet: the first prefill is no slide
    _codes(s, 60)
    assert s.prefills == 1 and not s.slides_before(100) and s.slides_before(101)
    _codes(s, 101)
    assert s.prefills == 2 and not s.slides_before(175) and s.slides_before(176)


def test_conditioning_re_prefills_only_when_what_is_to_come_changes(tiny_melody_engine):
    eng = tiny_melody_engine
    s = LiveStream(eng, "sax", SamplingParams(seed=2), context_seconds=1.0)
    c = np.zeros((60, 12), np.float32)
    c[:, 0] = 1.0
    assert s.condition(c, 0)
    _codes(s, 50)
    assert s.prefills == 1
    same = np.zeros((60, 12), np.float32)
    same[:, 0] = 1.0
    assert not s.condition(same, 0)  # the same melody ahead: keep the state
    assert not s.condition(same[8:], 8 * 50 / 7.8125)  # also when read from later on (frame 51.2)...
    assert s._melody_at == 51 and len(s._melody) == 52  # ... and the later, further-reaching read is kept
    _codes(s, 80)
    assert s.prefills == 1
    g = same.copy()
    g[20:] = 0.0
    g[20:, 7] = 1.0  # from chroma frame 20 (2.56 s = frame 128) on: G, still ahead of frame 80
    assert s.condition(g, 0)
    _codes(s, 100)
    assert s.prefills == 2 and s.frames == 100


def test_offline_steps_wait_while_a_live_session_is_open(tiny_engine):
    progress: list[float] = []
    gate = tiny_engine.gate
    done = threading.Event()

    def offline():
        tiny_engine.generate([GenerationRequest("pad", 3.0)], lambda i, f: progress.append(f))
        done.set()

    with gate.live_session() as share:
        t = threading.Thread(target=offline, daemon=True)
        t.start()
        time.sleep(1.0)
        assert progress == [] and not done.is_set()  # not one step while live work is due
        with gate.step(live=True) as ok:  # live steps still run
            assert ok
    assert share.offline_steps == 0
    assert done.wait(60)
    assert progress and progress[-1] == 1.0
    assert gate.offline_waits >= 1


def test_a_live_session_counts_the_offline_step_it_opened_during():
    gate = StepGate()
    with gate.step() as ok:  # an offline step is running as live work arrives
        assert ok
        cm = gate.live_session()
        share = cm.__enter__()
    ran = []

    def offline():
        with gate.step() as got:
            ran.append(got)

    t = threading.Thread(target=offline, daemon=True)
    t.start()
    time.sleep(0.3)
    assert ran == []  # the next offline step waits for the session
    cm.__exit__(None, None, None)
    t.join(5)
    assert ran == [True] and share.offline_steps == 1
    with gate.live_session() as idle:
        pass
    assert idle.offline_steps == 0  # nothing was running this time


def test_a_stream_over_the_c_step_with_folded_cross_attention_continues_exactly(tiny_wide_model_dir):
    """The jam's stream on a decoder the C step runs (128 wide, int8: folded cross-attention in
    int8), with its window sliding: chunked equals uninterrupted, and each window's fresh
    conditioning is folded again."""
    from model.engine import Engine

    eng = Engine.load(str(tiny_wide_model_dir), dtype="int8")
    assert eng.lm.stack is not None and eng.lm.stack.fold_dtype == torch.int8

    def stream() -> LiveStream:
        return LiveStream(eng, "drums", SamplingParams(seed=3), context_seconds=0.5, window_seconds=2.0)

    whole, chunked = stream(), stream()
    a = _codes(whole, 220)
    b = _codes(chunked, 13, 99, 100, 101, 180, 220)
    assert np.array_equal(a, b) and whole.prefills == chunked.prefills == 3
    assert whole._state.cross.derived[("folded", torch.int8)] is not None
