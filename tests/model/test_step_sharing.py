"""Several decode states in one decoder pass (the C step over groups) and the live streams that
step together through it (model/decode/step_sharing.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.decode.decoder import DecoderSpec, KVCache, MusicgenDecoderLM, TokenStep
from model.decode.live_stream import LiveStream
from model.decode.precision import apply_precision
from model.decode.scheduler import StepGate
from model.decode.step_sharing import SharedSteps
from model.kernels import gemv
from model.types import SamplingParams
from tests.model.test_gemv import _wide_decoder

pytestmark = pytest.mark.skipif(not gemv.available(), reason="the C kernels did not build here "
                                "(test_gemv.py's first test fails for that)")


def _clone(cache: KVCache) -> KVCache:
    c = KVCache.__new__(KVCache)
    c.k, c.v, c.max_len = cache.k.clone(), cache.v.clone(), cache.max_len
    c.k_scale = None if cache.k_scale is None else cache.k_scale.clone()
    c.v_scale = None if cache.v_scale is None else cache.v_scale.clone()
    return c


def _filled(lm, rows: int, start: int, kv, seed: int, cross) -> tuple[KVCache, torch.Tensor]:
    """A cache with `start` positions filled by a prefill of random tokens, and the next token."""
    g = torch.Generator().manual_seed(seed)
    cache = lm.new_cache(rows, 24, "cpu", torch.float32) if kv is None else KVCache(lm.spec, rows, 24, "cpu", kv)
    tokens = torch.randint(0, lm.spec.vocab, (rows, lm.spec.n_codebooks, start + 1), generator=g)
    lm(tokens[:, :, :start], 0, cache, cross)
    return cache, tokens[:, :, start:]


def _as_alone(lm, parts, passes: int) -> list[KVCache]:
    """Each part (tokens, start, cache, cross) stepped alone on a copy of its cache, and all together
    in `passes` decoder passes: each part's logits are the same bits both ways. Returns the caches
    the shared step wrote."""
    alone = [lm(t, s, _clone(c), x) for t, s, c, x in parts]
    copies = [_clone(c) for _, _, c, _ in parts]
    together, made = lm.forward_together([TokenStep(t, s, c2, x) for (t, s, _, x), c2 in zip(parts, copies)])
    assert made == passes
    for want, got in zip(alone, together):
        assert torch.equal(got, want)
    return copies


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_states_stepped_together_get_their_logits_alone_bit_for_bit(dtype, kv):
    """Three states of one text decoder at different positions, with different row counts (a
    guided pair, one row, a pair of variations) and different texts: one long enough to keep the
    cross projections, two short ones folded. One pass gives each exactly its logits and cache
    writes alone (every product's row is its own; attention reads each state's own cache)."""
    if dtype == "int4" and not gemv.has_vnni():
        pytest.skip("int4 without integer dot products runs PyTorch's packed kernel eagerly: no C step "
                    "(test_the_parts_step_one_after_another_where_the_c_step_does_not_run covers that path)")
    width = 128 if dtype == "int4" else 64
    lm = _wide_decoder(dtype, width=width)
    assert lm.fuse() == lm.spec.n_layers and lm.stack is not None
    unguided = torch.ones(2, 3)
    unguided[1] = 0  # the unconditional half of a guided pair attends to nothing
    crosses = [lm.cross_kv(torch.randn(2, 3, width), unguided), lm.cross_kv(torch.randn(1, 40, width), torch.ones(1, 40)),
               lm.cross_kv(torch.randn(2, 2, width), torch.ones(2, 2))]
    folded = [lm.stack._folded(c) is not None for c in crosses]
    assert folded == [True, False, True], folded  # both ways of cross-attention in one pass
    parts = []
    for i, (cross, start) in enumerate(zip(crosses, (3, 11, 7))):
        cache, tok = _filled(lm, cross.k.shape[1], start, kv, seed=10 + i, cross=cross)
        parts.append((tok, start, cache, cross))
    caches = _as_alone(lm, parts, passes=1)
    # and the cache columns written are the ones a step alone writes
    for (tok, start, cache, cross), after in zip(parts, caches):
        solo = _clone(cache)
        lm(tok, start, solo, cross)
        assert torch.equal(after.k, solo.k) and torch.equal(after.v, solo.v)


@torch.inference_mode()
def test_a_melody_decoder_steps_its_states_together_too():
    """Melody models read the conditioning as a prefix: no cross-attention in the pass."""
    torch.manual_seed(3)
    spec = DecoderSpec(d_model=64, n_layers=2, n_heads=4, ffn=128, n_codebooks=4, vocab=64, max_positions=64,
                       cross_attention=False)
    lm = MusicgenDecoderLM(spec).eval().requires_grad_(False)
    apply_precision(lm, "int8")
    assert lm.fuse() == 2 and lm.stack is not None
    parts = []
    for i, (rows, start) in enumerate(((2, 4), (2, 15), (1, 9))):
        cache, tok = _filled(lm, rows, start, None, seed=i, cross=None)
        parts.append((tok, start, cache, None))
    _as_alone(lm, parts, passes=1)


@torch.inference_mode()
def test_the_parts_step_one_after_another_where_the_c_step_does_not_run():
    lm = _wide_decoder("float32")
    lm.fuse()
    lm.stack = None  # as on a GPU, or with a layer on its eager code
    cross = lm.cross_kv(torch.randn(1, 5, 64), torch.ones(1, 5))
    parts = []
    for start in (2, 6):
        cache, tok = _filled(lm, 1, start, None, seed=start, cross=cross)
        parts.append((tok, start, cache, cross))
    _as_alone(lm, parts, passes=2)  # the same logits, one state after another


@torch.inference_mode()
def test_a_pass_needs_one_cache_format():
    lm = _wide_decoder("int8")
    lm.fuse()
    cross = lm.cross_kv(torch.randn(1, 5, 64), torch.ones(1, 5))
    a, ta = _filled(lm, 1, 2, torch.float32, 0, cross)
    b, tb = _filled(lm, 1, 2, torch.int8, 1, cross)
    with pytest.raises(ValueError, match="one cache format"):
        lm.forward_together([TokenStep(ta, 2, a, cross), TokenStep(tb, 2, b, cross)])


# ---------------------------------------------------------------- live streams stepping together


def _jam(engine, prompt: str, seed: int, stops: list[int], out: list, go: threading.Barrier | None = None):
    s = LiveStream(engine, prompt, SamplingParams(seed=seed), context_seconds=0.5, window_seconds=1.0)
    if go is not None:
        go.wait()
    parts, shared = [], 0
    for stop in stops:
        parts += list(s.advance(stop, piece_frames=6, first_piece_frames=2))
        shared += s.shared_steps
    out += [np.concatenate(parts, axis=1), s.prefills, shared]


@pytest.fixture(scope="module")
def wide_engine(tiny_wide_model_dir):
    from model.engine import Engine

    eng = Engine.load(str(tiny_wide_model_dir), device="cpu", dtype="int8")
    assert eng.lm.stack is not None, "the 128-wide tiny decoder takes the one-call C step"
    return eng


def test_jams_on_one_engine_share_decode_passes_and_each_makes_its_own_codes(wide_engine):
    """Three jams on one engine, each in its own thread with its own chunks (and windows sliding at
    different frames): each makes exactly the codes it makes alone, and most of their steps were
    made in passes shared with another jam."""
    eng = wide_engine
    plans = [("drums", 1, [20, 70, 130]), ("bass", 2, [45, 90, 110]), ("keys", 3, [30, 125])]
    alone = []
    for prompt, seed, stops in plans:
        out: list = []
        _jam(eng, prompt, seed, stops, out)
        alone.append(out)
    before = eng.live_steps.stats.shared_passes
    steps_before, passes_before = eng.live_steps.stats.steps, eng.live_steps.stats.passes
    go = threading.Barrier(len(plans))
    outs: list[list] = [[] for _ in plans]
    threads = [threading.Thread(target=_jam, args=(eng, p, s, st, o, go)) for (p, s, st), o in zip(plans, outs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for (codes, prefills, shared_alone), got in zip(alone, outs):
        assert len(got) == 3, "a jam's thread failed"
        assert np.array_equal(got[0], codes) and got[1] == prefills
        assert shared_alone == 0 and got[2] > 0  # each stream counts its steps made with another's
    st = eng.live_steps.stats
    steps, passes = st.steps - steps_before, st.passes - passes_before
    assert st.shared_passes > before and st.most_together >= 2
    assert passes < steps  # fewer decoder passes than steps: the weights were read once for several


def test_a_leader_does_not_wait_for_a_member_that_is_away():
    """A member between two chunks (or with its consumer) holds nobody up; one that is stepping
    has its state taken into the pass that is being made."""
    ran: list[list[str]] = []
    steps = SharedSteps(StepGate(), lambda states: ran.append(list(states)) or 1, gather_s=60.0)
    a, b = object(), object()
    with steps.stepping(a), steps.stepping(b):
        with steps.away(b):
            steps.step(a, "a1")  # b is away: a steps alone at once (a 60 s gather would hang the test)
        done = threading.Event()
        t = threading.Thread(target=lambda: (steps.step(b, "b1"), done.set()))
        t.start()
        steps.step(a, "a2")  # b is stepping: one of the two leads and takes both
        t.join(60)
        assert done.is_set()
    assert ran[0] == ["a1"]
    assert sorted(ran[1]) == ["a2", "b1"] and len(ran) == 2
    assert steps.stats.shared_passes == 1 and steps.stats.most_together == 2


def test_an_error_in_a_shared_pass_reaches_every_jam_in_it():
    def fail(states):
        raise RuntimeError("boom")

    steps = SharedSteps(StepGate(), fail, gather_s=60.0)
    a, b = object(), object()
    errors: list[str] = []

    def one(member, state):
        try:
            steps.step(member, state)
        except RuntimeError as e:
            errors.append(f"{state}: {e}")

    with steps.stepping(a), steps.stepping(b):
        t = threading.Thread(target=one, args=(b, "b"))
        t.start()
        one(a, "a")
        t.join(60)
    assert sorted(errors) == ["a: boom", "b: boom"]
