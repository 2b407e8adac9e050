"""model/decode/step_graph.py on the CPU: the runner the fixed-shape decode loop uses, and the switch.

The CUDA graph itself is tested where a GPU exists (test_cuda_step.py)."""

from __future__ import annotations

import os

import numpy as np
import torch

from model.decode.step_graph import StaticStep, graphs, graphs_enabled, static_step
from model.types import GenerationRequest, SamplingParams


def test_the_runner_is_eager_on_the_cpu_and_gives_step_statics_logits(tiny_engine):
    from model.conditioning.prepare import build_conditioning

    lm = tiny_engine.lm
    with torch.inference_mode():
        cond = build_conditioning(tiny_engine.hf, tiny_engine.tokenizer, ["lofi", "techno"], None, False, "cpu",
                                  torch.float32)
        cross = lm.cross_kv(cond.states, cond.mask)
        runner = static_step(lm, lm.new_cache(2, 12, "cpu", torch.float32), cross, 2, "cpu")
        assert type(runner) is StaticStep
        direct = lm.new_cache(2, 12, "cpu", torch.float32)
        tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 8), generator=torch.Generator().manual_seed(5))
        for t in range(8):
            a = runner(tokens[:, :, t : t + 1], t)
            b = lm.step_static(tokens[:, :, t : t + 1], torch.tensor([t]), direct, cross)
            assert torch.equal(a, b)


def test_a_decode_state_keeps_one_runner(tiny_engine, monkeypatch):
    """The fixed-shape loop makes its runner at the first step and reuses it (one graph per batch
    on a GPU), and its greedy tokens equal the eager loop's."""
    import model.decode.loop as generate

    made = []
    real = generate.static_step

    def counting(*a, **k):
        made.append(1)
        return real(*a, **k)

    monkeypatch.setattr(generate, "static_step", counting)
    req = [GenerationRequest("lofi", 0.4, SamplingParams(greedy=True))]
    tiny_engine.static_step = True
    try:
        fixed = tiny_engine.generate_tokens(req)[0]
    finally:
        tiny_engine.static_step = False
    assert made == [1]
    np.testing.assert_array_equal(fixed, tiny_engine.generate_tokens(req)[0])


def test_graphs_switch_restores_the_environment(monkeypatch):
    monkeypatch.delenv("MUSICBRIDGE_CUDA_GRAPHS", raising=False)
    assert graphs_enabled()
    with graphs(False):
        assert not graphs_enabled()
    assert "MUSICBRIDGE_CUDA_GRAPHS" not in os.environ
    monkeypatch.setenv("MUSICBRIDGE_CUDA_GRAPHS", "0")
    with graphs(True):
        assert graphs_enabled()
    assert os.environ["MUSICBRIDGE_CUDA_GRAPHS"] == "0"
