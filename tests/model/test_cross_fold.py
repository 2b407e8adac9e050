"""Cross-attention with its projections folded into the text's keys and values (model/decode/cross_fold.py)."""

from __future__ import annotations

import pytest
import torch

from model.kernels import gemv
from model.decode.cross_fold import fold, folded
from model.decode.precision import QUALITY_BOUND
from tests.model.test_gemv import _rel, _teacher_forced, _wide_decoder

# A guided batch as the engine makes it (model/conditioning/prepare.py): a prompt whose last key is
# padding, and the unconditional row (all-zero states and mask).
MASK = torch.tensor([[1, 1, 0], [0, 0, 0]])


def _states(d: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 3, d, generator=torch.Generator().manual_seed(seed)) * MASK[..., None]


def _logits(lm, fold_dtype, seed: int = 3) -> torch.Tensor:
    cross = lm.cross_kv(_states(lm.spec.d_model, seed), MASK)
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 10), generator=torch.Generator().manual_seed(seed))
    lm.stack.fold_dtype = fold_dtype
    out = _teacher_forced(lm, tokens, cross, one_pass=False, kv=torch.float32)
    made = cross.derived.get(("folded", fold_dtype))
    assert (made is not None) is (fold_dtype is not None)  # the steps read it (or had none to read)
    return out


@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_folded_float32_keys_and_values_give_the_projections_logits(dtype):
    """The same arithmetic reassociated: float32 M and U give the one-call step's logits without
    folding to float32 rounding (int8 on VNNI rounds the unfolded path's activations to two int8
    terms, 1e-4 as in test_gemv; int4 to one term, which test_gemv holds to 1e-2 of float32
    activations for one product: the folded step skips that rounding for the two it replaces)."""
    if dtype == "int4" and not gemv.has_vnni():
        pytest.skip("on a CPU without integer kernels (x86-64 without AVX2, ARM64 without the dot-product extension) int4 runs PyTorch's packed kernel, eagerly: no C step to fold into")
    lm = _wide_decoder(dtype, width=128)
    lm.fuse()
    assert lm.stack is not None
    plain = _logits(lm, None)
    got = _logits(lm, torch.float32)
    bound = {"int8": 1e-4 if gemv.int8_arithmetic() == "vnni" else 1e-5,
             "int4": 1e-2 if gemv.has_vnni() else 1e-5}.get(dtype, 1e-5)
    assert _rel(got, plain) < bound


@torch.inference_mode()
@pytest.mark.parametrize("fold_dtype", [torch.bfloat16, torch.int8])
def test_folded_keys_and_values_kept_narrow_stay_within_the_quality_bound(fold_dtype):
    """bfloat16 and int8 (one scale a vector) M and U change the logits by their rounding only:
    far inside the quality bound, where a misapplied scale or a wrong vector is of the logits'
    own size. (The trained proxy's figures are in BENCHMARKS.md.)"""
    lm = _wide_decoder("int8", width=128)
    lm.fuse()
    exact = _logits(lm, torch.float32)
    narrow = _logits(lm, fold_dtype)
    err = _rel(narrow, exact)
    assert 0 < err < QUALITY_BOUND / 4, err


@torch.inference_mode()
def test_the_unconditional_row_reads_nothing_and_the_folding_is_made_once():
    lm = _wide_decoder("int8", width=128)
    lm.fuse()
    cross = lm.cross_kv(_states(128), MASK)
    f = folded(lm.layers, cross, torch.int8)
    assert f is not None and f.slot.tolist() == [0, -1]
    assert f.m.shape == (lm.spec.n_layers, 1, lm.spec.n_heads, 3, 128) and f.m.dtype == torch.int8
    assert f.m_scale.shape == f.m.shape[:-1]
    assert folded(lm.layers, cross, torch.int8) is f  # kept on the CrossKV
    heads = lm.spec.n_heads
    hd = 128 // heads
    # M is W_q's head block applied to the key, U W_o's to the value (float32, to rounding)
    exact = fold(lm.layers, cross, torch.float32)
    layer = lm.layers[1]
    wq, wo = layer.cross_q.dequantized(), layer.cross_out.dequantized()
    for h in range(heads):
        k, v = cross.k[1, 0, h, 0], cross.v[1, 0, h, 0]
        torch.testing.assert_close(exact.m[1, 0, h, 0], wq[h * hd:(h + 1) * hd].T @ k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exact.u[1, 0, h, 0], wo[:, h * hd:(h + 1) * hd] @ v, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_a_long_text_keeps_the_projections_where_they_are_less_to_read():
    """Folding reads 2 x heads x tokens x d values a conditional row: past d / heads tokens
    (float32 M and U against float32 projections) it would read more, and is not made."""
    lm = _wide_decoder("float32", width=128, heads=4)
    lm.fuse()
    short = lm.cross_kv(torch.randn(1, 31, 128), torch.ones(1, 31))
    long = lm.cross_kv(torch.randn(1, 32, 128), torch.ones(1, 32))
    assert fold(lm.layers, short, torch.float32) is not None
    assert fold(lm.layers, long, torch.float32) is None
    # the step runs either way
    tokens = torch.zeros(1, lm.spec.n_codebooks, 2, dtype=torch.long)
    assert _teacher_forced(lm, tokens, long, one_pass=False).isfinite().all()


def test_the_c_quantiser_for_folded_vectors_is_quantize_kv_byte_for_byte():
    from model.decode.decoder import quantize_kv

    x = torch.randn(3, 5, 256) * 40
    x[0, 1] = 0.0  # scale 0, zeros
    x[2, 3, 7] = float("nan")  # scale NaN, zeros
    q, s = gemv.quantize_kv(x)
    want_q, want_s = quantize_kv(x)
    assert torch.equal(q, want_q)
    torch.testing.assert_close(s, want_s, rtol=0, atol=0, equal_nan=True)
    assert s[2, 3].isnan() and not q[2, 3].any() and s[0, 1] == 0


@torch.inference_mode()
def test_variations_of_one_prompt_share_their_folded_keys_and_values():
    """Four takes of one prompt (the engine's variations) plus another prompt, guided: the four
    read one slot, the other prompt its own, the unconditional rows none; the logits equal the
    projections' (float32 M and U)."""
    lm = _wide_decoder("float32", width=128)
    lm.fuse()
    text = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(7))
    states = torch.cat([text[[0, 0, 0, 0, 1]], torch.zeros(5, 3, 128)])
    mask = torch.cat([torch.ones(5, 3), torch.zeros(5, 3)])
    cross = lm.cross_kv(states, mask)
    f = fold(lm.layers, cross, torch.float32)
    assert f.slot.tolist() == [0, 0, 0, 0, 1, -1, -1, -1, -1, -1] and f.m.shape[1] == 2
    tokens = torch.randint(0, lm.spec.vocab, (10, lm.spec.n_codebooks, 6), generator=torch.Generator().manual_seed(8))
    folded_logits = _teacher_forced(lm, tokens, cross, one_pass=False)
    lm.stack.fold_dtype = None
    plain = lm.cross_kv(states, mask)
    assert _rel(folded_logits, _teacher_forced(lm, tokens, plain, one_pass=False)) < 1e-5


@torch.inference_mode()
@pytest.mark.parametrize("fold_dtype", [torch.float32, torch.int8])
def test_the_threaded_fold_gives_the_same_logits_on_one_thread_and_on_all(fold_dtype):
    """musicgen-small's sizes take the threaded path (heads x tokens x d >= 65536): 8 heads,
    16 tokens, 512 wide here. Its logits equal the projections' (float32 M and U), and every
    thread count gives the same bits (each output column is summed in one order)."""
    lm = _wide_decoder("float32", width=512, heads=8)
    lm.fuse()
    states = torch.randn(2, 16, 512, generator=torch.Generator().manual_seed(9))
    mask = torch.ones(2, 16)
    mask[0, 12:] = 0
    states[1] = 0
    mask[1] = 0
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 4), generator=torch.Generator().manual_seed(9))
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in sorted({1, 2, threads}):
            torch.set_num_threads(n)
            lm.stack.fold_dtype = fold_dtype
            runs.append(_teacher_forced(lm, tokens, lm.cross_kv(states, mask), one_pass=False))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, runs[0]) for r in runs[1:])
    if fold_dtype == torch.float32:
        lm.stack.fold_dtype = None
        assert _rel(runs[0], _teacher_forced(lm, tokens, lm.cross_kv(states, mask), one_pass=False)) < 1e-5


@torch.inference_mode()
def test_a_texts_folding_is_the_same_alone_and_batched_with_other_prompts():
    """Whether a text is folded, and its M and U, depend on that text (and the batch's text
    length), not on how many other prompts share the batch: six prompts still fold, and the
    first prompt's vectors are bit for bit those it gets alone."""
    lm = _wide_decoder("int8", width=128)
    lm.fuse()
    texts = torch.randn(6, 3, 128, generator=torch.Generator().manual_seed(11))
    mask = torch.ones(6, 3)
    many = fold(lm.layers, lm.cross_kv(texts, mask), torch.int8)
    alone = fold(lm.layers, lm.cross_kv(texts[:1], mask[:1]), torch.int8)
    assert many is not None and many.slot.tolist() == list(range(6))
    assert torch.equal(many.m[:, 0], alone.m[:, 0]) and torch.equal(many.u[:, 0], alone.u[:, 0])
    assert torch.equal(many.m_scale[:, 0], alone.m_scale[:, 0]) and torch.equal(many.u_scale[:, 0], alone.u_scale[:, 0])


def _generate(model_dir, out, fold: str, *flags: str) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "MUSICBRIDGE_CROSS_FOLD": fold, "MUSICBRIDGE_WEIGHT_CACHE": "0"}
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "-v", "generate", "--model", str(model_dir),
                        "--prompt", "warm rhodes chords", "--seconds", "1", "--out", str(out.with_suffix(".wav")),
                        "--save-tokens", str(out.with_suffix(".npy")), *flags],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_generate_runs_the_folded_step_and_greedy_tokens_match_the_projections(tiny_wide_model_dir, tmp_path):
    """Through `musicbridge generate`: float32 greedy decoding gives the same tokens folded
    (the log says so) and with MUSICBRIDGE_CROSS_FOLD=0; the default precision folds too."""
    import numpy as np

    folded_log = _generate(tiny_wide_model_dir, tmp_path / "folded", "1", "--dtype", "float32", "--greedy")
    plain_log = _generate(tiny_wide_model_dir, tmp_path / "plain", "0", "--dtype", "float32", "--greedy")
    assert "2 of 2 layers take their decode step in one C call" in folded_log
    assert "cross-attention folded: 1 text(s)" in folded_log and "float32" in folded_log
    assert "cross-attention folded" not in plain_log
    a, b = np.load(tmp_path / "folded.npy"), np.load(tmp_path / "plain.npy")
    assert a.shape == b.shape and a.size > 0 and np.array_equal(a, b)
    default_log = _generate(tiny_wide_model_dir, tmp_path / "default", "1", "--seed", "3")
    assert "cross-attention folded: 1 text(s)" in default_log
    assert np.load(tmp_path / "default.npy").shape == a.shape
