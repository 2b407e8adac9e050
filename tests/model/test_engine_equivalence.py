"""Our decode loop against the reference peer, `transformers`' own MusicGen.

Text checkpoints load through our own reader (model/load/checkpoint.py: our T5, our codec, the
decoder laid out from the file's tensors), so these tests hold that whole path to
`transformers`' model loaded from the same folder; melody checkpoints load through
`transformers` itself.

Greedy tokens must be identical, and teacher-forced logits must agree to float32 rounding:
the bound below is max |ours - theirs| / max |theirs| <= 1e-5 (float32 has a 6e-8 unit
roundoff; reordered sums over a few hundred terms stay well inside 1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.load.checkpoint import Checkpoint
from model.engine import Engine
from model.load.resolve import load_hf_model
from model.bench.reference import reference_generate_tokens
from model.types import GenerationRequest, SamplingParams

LOGIT_BOUND = 1e-5


def _melody(frames: int, shift: int) -> np.ndarray:
    m = np.zeros((frames, 12), np.float32)
    m[np.arange(frames), (np.arange(frames) + shift) % 12] = 1.0
    return m


@pytest.fixture(scope="module", params=["mono", "stereo", "melody"])
def engine(request, tiny_model_dir, tiny_stereo_dir, tiny_melody_dir):
    path = {"mono": tiny_model_dir, "stereo": tiny_stereo_dir, "melody": tiny_melody_dir}[request.param]
    eng = Engine.load(str(path), device="cpu", dtype="float32")
    assert isinstance(eng.hf, Checkpoint) == (request.param != "melody")
    return eng


def reference(eng: Engine):
    """`transformers`' model and tokenizer for the engine's checkpoint."""
    return (eng.hf, eng.tokenizer) if not isinstance(eng.hf, Checkpoint) else load_hf_model(eng.resolved)


@pytest.mark.parametrize("guidance", [3.0, 1.0])
@pytest.mark.parametrize("prompts", [["lofi beat with warm piano", "techno"], ["dark ambient pad"]])
def test_greedy_tokens_equal_transformers(engine, guidance, prompts):
    reqs = [GenerationRequest(p, 0.6, SamplingParams(greedy=True, guidance=guidance)) for p in prompts]
    if engine.is_melody:
        for i, r in enumerate(reqs):
            r.melody = _melody(5, i)
    ref, _ = reference_generate_tokens(*reference(engine), reqs)
    ours = engine.generate_tokens(reqs)
    for i in range(len(reqs)):
        assert ours[i].shape == ref[i].shape == (engine.num_codebooks, 30)
        np.testing.assert_array_equal(ours[i], ref[i])
    # The tiny weights must make decoding non-trivial, or equality would prove little.
    assert len(np.unique(ours[0])) > 4


def test_greedy_equal_across_seeds_of_tiny_weights(tmp_path):
    """Another checkpoint (different random weights) still matches token for token."""
    from model.load.tiny import build_tiny_model

    torch.manual_seed(7)
    model = build_tiny_model()
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    from model.load.tiny import _build_tokenizer

    model.save_pretrained(tmp_path)
    _build_tokenizer(tmp_path)
    eng = Engine.load(str(tmp_path), device="cpu", dtype="float32")
    for seed_prompt in ["acoustic guitar", "a b c d e f g h i j k l m n o p"]:
        reqs = [GenerationRequest(seed_prompt, 0.5, SamplingParams(greedy=True))]
        ref, _ = reference_generate_tokens(*reference(eng), reqs)
        np.testing.assert_array_equal(eng.generate_tokens(reqs)[0], ref[0])


@torch.inference_mode()
def test_teacher_forced_logits_match(engine):
    from model.conditioning.prepare import build_conditioning
    from model.decode.decoder import KVCache

    hf, tok = reference(engine)
    k = engine.num_codebooks
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, engine.lm.spec.vocab, (2, k, 12), generator=g)
    prompts = ["warm lofi piano", "techno"]
    melodies = [_melody(4, 0), _melody(6, 3)] if engine.is_melody else None
    cond = build_conditioning(hf, tok, prompts, melodies, False, "cpu", torch.float32)
    cache = KVCache(engine.lm.spec, 2, cond.states.shape[1] + 12 if cond.is_prefix else 12, "cpu",
                    torch.float32)
    x = engine.lm.embed_tokens(tokens)
    if cond.is_prefix:
        x = torch.cat([cond.states, x], dim=1)
        ours = engine.lm.forward_embeds(x, 0, cache, None)[:, :, -12:]
        theirs = hf.decoder(input_ids=tokens.reshape(2 * k, 12), encoder_hidden_states=cond.states,
                            use_cache=False).logits
        theirs = theirs.reshape(2, k, -1, theirs.shape[-1])[:, :, -12:]
    else:
        cross = engine.lm.cross_kv(cond.states, cond.mask)
        ours = engine.lm.forward_embeds(x, 0, cache, cross)
        theirs = hf.decoder(input_ids=tokens.reshape(2 * k, 12), encoder_hidden_states=cond.states,
                            encoder_attention_mask=cond.mask, use_cache=False).logits
        theirs = theirs.reshape(2, k, 12, -1)
    err = (ours - theirs).abs().max() / theirs.abs().max()
    assert err <= LOGIT_BOUND, f"relative logit error {err:.2e}"


@torch.inference_mode()
def test_incremental_decode_matches_full_forward(tiny_engine):
    """The static KV cache, step by step, gives the logits of one full causal pass."""
    from model.conditioning.prepare import build_conditioning
    from model.decode.decoder import KVCache

    lm = tiny_engine.lm
    cond = build_conditioning(tiny_engine.hf, tiny_engine.tokenizer, ["pad"], None, True, "cpu",
                              torch.float32)
    cross = lm.cross_kv(cond.states, cond.mask)
    tokens = torch.randint(0, lm.spec.vocab, (2, 4, 10), generator=torch.Generator().manual_seed(1))
    full = lm(tokens, 0, KVCache(lm.spec, 2, 10, "cpu", torch.float32), cross)
    cache = KVCache(lm.spec, 2, 10, "cpu", torch.float32)
    first = lm(tokens[:, :, :3], 0, cache, cross)
    steps = [lm(tokens[:, :, t : t + 1], t, cache, cross) for t in range(3, 10)]
    inc = torch.cat([first] + steps, dim=2)
    assert (inc - full).abs().max() / full.abs().max() <= LOGIT_BOUND


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_static_shape_step_greedy_tokens_equal_transformers(engine, guidance):
    """The fixed-shape step (whole cache under a mask, position as a tensor: what CUDA graphs
    capture on a GPU) runs here on the CPU and must give transformers' tokens exactly."""
    reqs = [GenerationRequest(p, 0.6, SamplingParams(greedy=True, guidance=guidance))
            for p in ["lofi beat with warm piano", "techno"]]
    if engine.is_melody:
        for i, r in enumerate(reqs):
            r.melody = _melody(5, i)
    ref, _ = reference_generate_tokens(*reference(engine), reqs)
    engine.static_step = True
    try:
        ours = engine.generate_tokens(reqs)
    finally:
        engine.static_step = False
    for i in range(len(reqs)):
        np.testing.assert_array_equal(ours[i], ref[i])


def _rounding_flips(a, b, t: int) -> int:
    """How many bfloat16 or int8 cache entries at position t differ between caches a and b; each
    difference must be one rounding step of the format (adjacent bfloat16 values; int8 codes one
    apart under scales equal to float32 rounding), what a float32-rounding difference upstream can
    cause."""
    if a.k.dtype == torch.float32:
        return 0  # no rounding of its own: float32 entries differ as the float32 keys and values do
    flips = 0
    for x, y in ((a.k, b.k), (a.v, b.v)):
        x, y = x[:, :, :, t], y[:, :, :, t]
        # adjacent bfloat16 values have bit patterns one apart (same sign); int8 codes one apart
        step = (x.view(torch.int16).int() - y.view(torch.int16).int()).abs() if x.dtype == torch.bfloat16 else \
            (x.int() - y.int()).abs()
        assert int(step.max()) <= 1, f"cache entries at position {t} differ by more than one rounding step"
        flips += int((step > 0).sum())
    if a.quantized:
        for x, y in ((a.k_scale, b.k_scale), (a.v_scale, b.v_scale)):
            x, y = x[:, :, :, t], y[:, :, :, t]
            assert ((x - y).abs() <= 1e-5 * x.abs()).all()
    return flips


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16, torch.int8])
def test_static_step_logits_equal_the_eager_step(tiny_engine, kv):
    """Teacher-forced, step by step from the same cache: the static and the eager step agree to
    float32 rounding, with the cache in each format a precision keeps it in
    (model.decode.precision.kv_dtype). Their float32 keys and values differ in the last bits (attention
    sums in another order), which now and then rounds one bfloat16 or int8 entry to its neighbour
    (one rounding step; seen once in 20 steps): such a step's logits differ by what that entry
    carries, so it is counted, checked to be exactly that, and the caches start the next step
    equal again."""
    from model.conditioning.prepare import build_conditioning
    from model.decode.decoder import KVCache

    lm = tiny_engine.lm
    cond = build_conditioning(tiny_engine.hf, tiny_engine.tokenizer, ["lofi", "techno"], None, False, "cpu",
                              torch.float32)
    cross = lm.cross_kv(cond.states, cond.mask)
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 20), generator=torch.Generator().manual_seed(3))
    eager, static = KVCache(lm.spec, 2, 24, "cpu", kv), KVCache(lm.spec, 2, 24, "cpu", kv)
    pos = torch.zeros(1, dtype=torch.long)
    flipped = 0
    for t in range(20):
        for name in ("k", "v", "k_scale", "v_scale"):
            if getattr(eager, name) is not None:
                getattr(static, name).copy_(getattr(eager, name))
        a = lm(tokens[:, :, t : t + 1], t, eager, cross)
        pos.fill_(t)
        b = lm.step_static(tokens[:, :, t : t + 1], pos, static, cross)
        if _rounding_flips(eager, static, t):
            flipped += 1
            continue
        assert (a - b).abs().max() / a.abs().max() <= LOGIT_BOUND, f"step {t}"
    assert flipped <= 2 and (kv != torch.float32 or flipped == 0)
