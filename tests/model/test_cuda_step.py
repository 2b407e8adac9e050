"""The GPU path: the fixed-shape decode step captured as a CUDA graph (model/decode/step_graph.py).

These run only where torch sees a CUDA GPU. The fixed-shape step they capture is the same code
the CPU runs in tests/model/test_engine_equivalence.py (`static_step`), held there to
`transformers`' tokens; here the graph is held to that step run eagerly on the same GPU, the GPU
to the CPU, and float16 to float32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.engine import Engine
from model.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: these capture and replay CUDA graphs (the fixed-shape step itself is "
           "tested on the CPU in test_engine_equivalence.py)")

LOGIT_BOUND = 1e-5  # as test_engine_equivalence: float32 with reordered sums


@pytest.fixture(scope="module")
def gpu_engine(tiny_model_dir):
    return Engine.load(str(tiny_model_dir), device="cuda", dtype="float32")


def _teacher_forced(eng: Engine, runner_cls, device: str) -> torch.Tensor:
    """Logits (2, K, 20, V) of 20 known steps through `runner_cls` over a fresh cache."""
    from model.conditioning.prepare import build_conditioning

    lm = eng.lm
    with torch.inference_mode():
        cond = build_conditioning(eng.hf, eng.tokenizer, ["lofi", "techno"], None, False, device, eng.compute_dtype)
        cross = lm.cross_kv(cond.states, cond.mask)
        tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 20),
                               generator=torch.Generator().manual_seed(3)).to(device)
        cache = lm.new_cache(2, 24, device, eng.compute_dtype)
        runner = runner_cls(lm, cache, cross, 2, device)
        return torch.cat([runner(tokens[:, :, t : t + 1], t).clone() for t in range(20)], dim=2).float().cpu()


def test_graph_replays_give_the_eager_steps_logits(gpu_engine):
    from model.decode.step_graph import GraphedStep, StaticStep

    eager = _teacher_forced(gpu_engine, StaticStep, "cuda")
    graphed = _teacher_forced(gpu_engine, GraphedStep, "cuda")
    err = (graphed - eager).abs().max() / eager.abs().max()
    assert err <= LOGIT_BOUND, f"relative logit error {err:.2e}"


def test_gpu_logits_equal_the_cpus(gpu_engine, tiny_engine):
    from model.decode.step_graph import GraphedStep, StaticStep

    gpu = _teacher_forced(gpu_engine, GraphedStep, "cuda")
    cpu = _teacher_forced(tiny_engine, StaticStep, "cpu")
    err = (gpu - cpu).abs().max() / cpu.abs().max()
    assert err <= LOGIT_BOUND, f"relative logit error {err:.2e}"


def test_float16_stays_within_the_quality_bound(tiny_model_dir, gpu_engine):
    from model.decode.precision import QUALITY_BOUND
    from model.decode.step_graph import GraphedStep

    half = Engine.load(str(tiny_model_dir), device="cuda", dtype="float16")
    assert half.compute_dtype == torch.float16
    ref = _teacher_forced(gpu_engine, GraphedStep, "cuda")
    out = _teacher_forced(half, GraphedStep, "cuda")
    assert torch.isfinite(out).all()
    err = (out - ref).abs().max() / ref.abs().max()
    assert err <= QUALITY_BOUND, f"relative logit error {err:.2e}"


def test_sampled_tokens_are_the_same_with_and_without_graphs(gpu_engine, monkeypatch):
    """Seeded top-k sampling with guidance: the graph changes how the step is launched, not
    what it computes, so every token is the same."""
    reqs = lambda: [GenerationRequest(p, 0.6, SamplingParams(seed=i, top_k=250, guidance=3.0))  # noqa: E731
                    for i, p in enumerate(["lofi beat with warm piano", "techno"])]
    graphed = gpu_engine.generate_tokens(reqs())
    monkeypatch.setenv("MUSICBRIDGE_CUDA_GRAPHS", "0")
    eager = gpu_engine.generate_tokens(reqs())
    for a, b in zip(graphed, eager):
        np.testing.assert_array_equal(a, b)
    assert len(np.unique(graphed[0])) > 4


def test_generate_command_runs_on_the_gpu_with_graphs(tiny_model_dir, tmp_path, caplog):
    """`musicbridge generate --device cuda`: float16 by default, steps replayed as CUDA graphs,
    and the tokens of a seeded take equal the same take run without graphs."""
    import logging

    import soundfile as sf

    from bridge.cli import main

    def run(name: str) -> np.ndarray:
        out = tmp_path / f"{name}.npy"
        assert main(["generate", "--model", str(tiny_model_dir), "--device", "cuda", "--prompt", "lofi beat",
                     "--seconds", "1", "--seed", "4", "--out", str(tmp_path / f"{name}.wav"),
                     "--save-tokens", str(out)]) == 0
        assert sf.info(str(tmp_path / f"{name}.wav")).frames > 0
        return np.load(out)

    with caplog.at_level(logging.INFO, logger="model.engine"):
        graphed = run("graphed")
    assert "in float16: fixed-shape steps, each batch's step captured once as a CUDA graph" in caplog.text
    import os

    os.environ["MUSICBRIDGE_CUDA_GRAPHS"] = "0"
    try:
        eager = run("eager")
    finally:
        del os.environ["MUSICBRIDGE_CUDA_GRAPHS"]
    np.testing.assert_array_equal(graphed, eager)

