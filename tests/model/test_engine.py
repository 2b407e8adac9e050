"""Engine behaviour beyond equivalence: seeds, batching, cancel, long form, bad requests."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from model.kernels import gemv
from model.engine import Cancelled, Engine
from model.decode.sampling import Sampler, filter_top_k_top_p
from model.types import GenerationRequest, RequestError, SamplingParams


def _req(prompt="lofi beat", seconds=0.5, **kw) -> GenerationRequest:
    return GenerationRequest(prompt, seconds, SamplingParams(**kw))


def test_same_seed_same_tokens_other_seed_differs(tiny_engine):
    a = tiny_engine.generate_tokens([_req(seed=11, top_k=0)])[0]
    b = tiny_engine.generate_tokens([_req(seed=11, top_k=0)])[0]
    c = tiny_engine.generate_tokens([_req(seed=12, top_k=0)])[0]
    np.testing.assert_array_equal(a, b)
    assert (a != c).mean() > 0.3


def test_batched_greedy_equals_one_at_a_time(tiny_engine):
    reqs = [_req("lofi beat", 0.5, greedy=True), _req("dark techno lead", 0.3, greedy=True),
            _req("ambient pad", 0.4, greedy=True, guidance=1.5)]
    batched = tiny_engine.generate_tokens(reqs)
    for r, got in zip(reqs, batched):
        alone = tiny_engine.generate_tokens([_req(r.prompt, r.seconds, greedy=True,
                                                  guidance=r.params.guidance)])[0]
        assert got.shape == (4, tiny_engine.frames_for(r.seconds))
        np.testing.assert_array_equal(got, alone)


def test_cancel_stops_within_a_step(tiny_engine):
    req = _req(seconds=4.0, seed=1)
    calls_after_cancel = []

    def progress(i, frac):
        if req.cancel.is_set():
            calls_after_cancel.append(frac)
        elif frac >= 0.2:
            req.cancel.set()

    with pytest.raises(Cancelled):
        tiny_engine.generate([req], progress=progress)
    assert len(calls_after_cancel) <= 1


def test_cancel_one_of_a_batch_keeps_the_others(tiny_engine):
    keep, drop = _req("techno", 1.0, greedy=True), _req("pad", 1.0, greedy=True)

    def progress(i, frac):
        if i == 1 and frac > 0.1:
            drop.cancel.set()

    out = tiny_engine.generate_tokens([keep, drop], progress=progress)
    assert out[1] is None
    np.testing.assert_array_equal(out[0], tiny_engine.generate_tokens([_req("techno", 1.0, greedy=True)])[0])


def test_progress_reaches_one(tiny_engine):
    seen = []
    tiny_engine.generate_tokens([_req(seconds=0.5, seed=3)], progress=lambda i, f: seen.append(f))
    assert seen == sorted(seen) and seen[-1] == pytest.approx(1.0)


def test_long_form_continues_in_windows(tiny_model_dir):
    eng = Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")
    short = Engine(eng.hf, eng.tokenizer, eng.resolved, "cpu", "float32",
                   window_seconds=1.0, context_seconds=0.4)
    codes = short.generate_tokens([_req(seconds=2.5, greedy=True)])[0]
    assert codes.shape == (4, 125)
    first = short.generate_tokens([_req(seconds=1.0, greedy=True)])[0]
    np.testing.assert_array_equal(codes[:, :50], first)
    audio = short.decode(codes)
    assert audio.shape == (1, 125 * 640) and np.isfinite(audio).all()


def test_melody_on_text_model_is_refused(tiny_engine):
    r = _req()
    r.melody = np.eye(12, dtype=np.float32)
    with pytest.raises(RequestError, match="text-only"):
        tiny_engine.generate_tokens([r])


@pytest.mark.parametrize("bad", [dict(guidance=0.0), dict(temperature=-1.0), dict(top_p=2.0),
                                 dict(top_k=-3), dict(guidance=float("nan"))])
def test_bad_params_are_refused(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    greedy = logits.argmax(-1)
    for params in (SamplingParams(top_k=1, seed=5), SamplingParams(top_k=0, top_p=1e-6, seed=5)):
        s = Sampler.for_params([params] * 3, "cpu")
        assert torch.equal(s(logits), greedy)


def test_sampler_draws_from_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4).expand(1, 2000, 4).contiguous()
    s = Sampler.for_params([SamplingParams(top_k=0, seed=9)], "cpu")
    draws = torch.cat([s(logits).flatten() for _ in range(10)])
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    # 20000 draws: the standard error of each frequency is below 0.004.
    assert torch.allclose(freq, probs, atol=0.015), freq


def _frequencies(params: SamplingParams, logits: torch.Tensor, draws: int = 20) -> torch.Tensor:
    s = Sampler.for_params([params], "cpu")
    out = torch.cat([s(logits).flatten() for _ in range(draws)])
    return torch.bincount(out, minlength=logits.shape[-1]).float() / out.numel()


def test_top_k_sampling_races_only_the_candidates_and_keeps_the_distribution():
    """With top-k the race draws only for the k candidates (the rest have p = 0): the tokens
    follow the renormalised top k, top-p still cuts inside it, and a seed repeats its tokens."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05, 1e-4, 1e-4]).log().view(1, 1, 6).expand(1, 1000, 6).contiguous()
    freq = _frequencies(SamplingParams(top_k=3, seed=4), logits)
    want = torch.tensor([0.5, 0.3, 0.15, 0, 0, 0]) / 0.95
    assert torch.allclose(freq, want, atol=0.015), freq  # 20000 draws: standard error < 0.004
    freq = _frequencies(SamplingParams(top_k=4, top_p=0.7, seed=4), logits)  # nucleus .5 + .3 of the four
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0, 0, 0]), atol=0.015), freq
    a, b = (Sampler.for_params([SamplingParams(top_k=3, seed=11)], "cpu")(logits) for _ in range(2))
    assert torch.equal(a, b)


@pytest.mark.skipif(not gemv.available(), reason="needs the C kernels (a C compiler)")
def test_the_c_top_k_support_is_torchs_top_k_in_token_order():
    """model/top_k.c finds each row's k largest in token order, the values copied bit for bit;
    a tie at the k-th value (-0 and +0 included), a NaN or a width that is not whole vectors
    gives None (the sampler's full path)."""
    x = torch.randn(4, 2048, generator=torch.Generator().manual_seed(8)) * 4
    index, values = gemv.top_k_support(x, 250)
    assert torch.equal(index, torch.topk(x, 250).indices.sort().values)
    assert torch.equal(values, x.gather(1, index))
    assert torch.equal(gemv.top_k_support(x, 1)[0], x.argmax(-1, keepdim=True))
    row = torch.cat([torch.tensor([1.0, 0.0, -0.0]), torch.full((13,), -5.0)]).view(1, 16)
    assert gemv.top_k_support(row, 2) is None and gemv.top_k_support(row, 3)[0].tolist() == [[0, 1, 2]]
    assert gemv.top_k_support(torch.tensor([[1.0, float("nan")] * 8]), 1) is None
    assert gemv.top_k_support(torch.randn(2, 2047), 250) is None


def test_a_tie_at_the_kth_value_keeps_every_tied_token_in_the_draw():
    logits = torch.tensor([3.0, 2.0, 2.0, 2.0, -9.0]).view(1, 1, 5).expand(1, 1000, 5).contiguous()
    freq = _frequencies(SamplingParams(top_k=2, seed=6), logits)
    assert (freq[1:4] > 0.05).all() and freq[4] == 0, freq


def test_top_k_keeps_the_k_largest_values_ties_included():
    """The threshold is the k-th largest value (ties counted, as the sorted top k's last): on
    musicgen's 4 x 2048 logits exactly k survive per codebook, and with a tie at the threshold
    every tied value survives."""
    logits = torch.randn(4, 2048, generator=torch.Generator().manual_seed(4))
    out = filter_top_k_top_p(logits, 250, 0.0)
    assert torch.isfinite(out).sum(-1).tolist() == [250] * 4
    kth = torch.topk(logits, 250, dim=-1).values[:, -1:]
    assert torch.equal(torch.isfinite(out), logits >= kth) and torch.equal(out[torch.isfinite(out)], logits[logits >= kth])
    tied = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0]])
    assert torch.isfinite(filter_top_k_top_p(tied, 2, 0.0)).tolist() == [[True, True, True, True, False]]


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = filter_top_k_top_p(logits, 0, 0.7)  # p = .64 .24 .09 .03: keep the first two
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]


def test_cancel_from_another_thread(tiny_engine):
    req = _req(seconds=20.0, seed=2)
    started = threading.Event()
    canceller = threading.Thread(target=lambda: started.wait(30) and req.cancel.set())
    canceller.start()
    seen = []

    def progress(i, frac):
        seen.append(frac)
        started.set()
        canceller.join()  # the other thread has set cancel when this returns

    with pytest.raises(Cancelled):
        tiny_engine.generate([req], progress=progress)
    assert len(seen) == 1 and seen[0] < 0.05


def test_continuation_follows_the_take(tiny_engine):
    t = np.arange(16000, dtype=np.float32) / 32000
    take = (0.5 * np.sin(2 * np.pi * 220 * t))[None].astype(np.float32)
    other = np.random.default_rng(0).normal(0, 0.3, (1, 16000)).astype(np.float32)
    assert (tiny_engine.encode(take) != tiny_engine.encode(other)).mean() > 0.5
    cont = GenerationRequest("lofi beat", 0.6, SamplingParams(greedy=True), audio_prompt=take)
    codes = tiny_engine.generate_tokens([cont])[0]
    assert codes.shape == (4, 30)  # the prompt is not repeated
    with_prompt = GenerationRequest("lofi beat", 0.6, SamplingParams(greedy=True), audio_prompt=take,
                                    return_prompt=True)
    full = tiny_engine.generate_tokens([with_prompt])[0]
    prompt_codes = tiny_engine.encode(take)
    assert full.shape == (4, prompt_codes.shape[1] + 30)
    np.testing.assert_array_equal(full[:, : prompt_codes.shape[1]], prompt_codes)
    np.testing.assert_array_equal(full[:, prompt_codes.shape[1]:], codes)
    elsewhere = tiny_engine.generate_tokens(
        [GenerationRequest("lofi beat", 0.6, SamplingParams(greedy=True), audio_prompt=other)])[0]
    assert (elsewhere != codes).any()


def test_stream_equals_batch_generation(tiny_engine):
    req = _req("ambient pad", 2.0, seed=4)
    chunks = list(tiny_engine.stream(req, chunk_seconds=0.5))
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    starts = [c.start for c in chunks]
    assert starts == sorted(starts) and starts[0] == 0
    for a, b in zip(chunks, chunks[1:]):
        assert b.start == a.start + a.frames
    streamed = np.concatenate([c.audio for c in chunks], axis=1)
    whole = tiny_engine.generate([_req("ambient pad", 2.0, seed=4)])[0]
    assert streamed.shape == whole.shape == (1, 64000)
    assert np.abs(streamed - whole).max() / np.abs(whole).max() < 1e-3
    # Chunks arrive while generating: more than one before the end, the first one short so
    # that first audio comes early.
    assert len(chunks) >= 4
    assert 0 < chunks[0].frames < chunks[1].frames


def test_stream_batch_tags_requests(tiny_engine):
    reqs = [_req("drums", 1.0, seed=1), _req("bass", 0.6, seed=2)]
    got = {0: [], 1: []}
    for c in tiny_engine.stream_batch(reqs, chunk_seconds=0.2):
        got[c.request_index].append(c.audio)
    assert sum(a.shape[1] for a in got[0]) == 32000
    assert sum(a.shape[1] for a in got[1]) == int(0.6 * 32000)


def test_later_windows_read_the_melody_from_their_own_start(tiny_melody_engine):
    melody = np.zeros((40, 12), np.float32)
    melody[np.arange(40), np.arange(40) % 12] = 1.0
    req = GenerationRequest("lead", 5.0, SamplingParams(greedy=True), melody=melody)
    assert tiny_melody_engine._window_request(req, 0) is req
    later = tiny_melody_engine._window_request(req, 100)  # frame 100 = 2.0 s = chroma frame 15
    np.testing.assert_array_equal(later.melody, melody[15:])
    assert later.cancel is req.cancel
    eng = Engine(tiny_melody_engine.hf, tiny_melody_engine.tokenizer, tiny_melody_engine.resolved, "cpu",
                 "float32", window_seconds=1.0, context_seconds=0.4)
    codes = eng.generate_tokens([req])[0]
    assert codes.shape == (4, 250)


@pytest.mark.parametrize("dtype,device,expect", [
    ("int8", "cuda", "int8 runs the CPU's C kernels; on a GPU use float16"),
    ("int4", "cuda:1", "int4 runs the CPU's C kernels; on a GPU use float16"),
    ("float16", "cpu", "float16 is for GPUs"),
])
def test_a_precision_the_device_cannot_run_is_refused_with_the_alternatives(dtype, device, expect):
    from model.engine import pick_dtype

    with pytest.raises(RequestError, match=expect):
        pick_dtype(dtype, device)


def test_auto_is_float16_on_a_gpu():
    from model.engine import pick_dtype

    assert pick_dtype("auto", "cuda") == "float16"
