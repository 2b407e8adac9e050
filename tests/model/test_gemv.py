"""The C decode kernels (model/kernels/gemv.py, model/decode/layer_step.py): built here, exact against their own
arithmetic, the same logits step by step (kernels, one-call layer step) as in one pass (PyTorch
matmul over the same weights), and the C layer step equal to the eager one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from model.kernels import gemv
from model.decode.quant import Bf16Linear, Int8Linear, quantize_int8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_kernels_build_and_load_on_this_machine():
    assert gemv.available(), "the C kernels did not build: the decode step would fall back to PyTorch's"
    assert gemv.build() == gemv.library_path()  # a second build is the cached one
    # The default: integer dot products where the CPU has them, else widening to float32.
    assert gemv.int8_arithmetic() == ("vnni" if gemv.has_vnni() else "float")


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [64, 67, 200])
def test_bf16_kernel_equals_float32_matmul_over_the_widened_weights(rows, n):
    torch.manual_seed(rows * 100 + n)
    w = (torch.randn(n, 192) * 0.05).to(torch.bfloat16)
    x, bias = torch.randn(rows, 192), torch.randn(n)
    assert _rel(gemv.linear_bf16(x, w, bias), x @ w.float().T + bias) < 1e-5


@pytest.mark.parametrize("rows", [1, 2, 5, 8])
@pytest.mark.parametrize("n", [64, 131])
def test_int8_float_kernel_equals_the_dequantised_matmul(rows, n):
    torch.manual_seed(rows + n)
    q, scale = quantize_int8(torch.randn(n, 256) * 0.05)
    x, bias = torch.randn(rows, 256), torch.randn(n)
    ref = x @ (q.float() * scale[:, None]).T + bias
    assert _rel(gemv.linear_i8(x, q, scale, bias), ref) < 1e-5


def test_c_quantiser_equals_pytorchs_arithmetic_bit_for_bit(monkeypatch):
    """model.decode.quant.quantize_int8 in C (one pass per row) against the same arithmetic in PyTorch:
    random rows, a zero row, ties at .5 (round half to even), huge and tiny magnitudes."""
    torch.manual_seed(4)
    w = torch.randn(70, 320) * 0.05
    w[3] = 0.0
    w[4, :] = torch.arange(320) * 0.5 - 80  # max 79.5: many exact .5 steps after scaling
    w[5] *= 1e6
    w[6] *= 1e-20
    w[7, :] = -torch.linspace(0, 3, 320)  # all negative: the scale comes from the minimum
    lo, hi = torch.aminmax(w, dim=1)
    scale = (torch.maximum(hi, -lo) / 127.0).clamp_(min=1e-12)
    q = (w * (1.0 / scale)[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    cq, cscale = gemv.quantize_i8(w)
    assert torch.equal(cscale, scale)
    assert torch.equal(cq, q)
    assert torch.equal(quantize_int8(w)[0], q)  # and the loader uses it
    bq, bscale = gemv.quantize_i8(w, biased=True)  # the VNNI layout, q + 128, in the same pass
    assert bq.dtype == torch.uint8 and torch.equal(bscale, scale)
    assert torch.equal(bq, (q.to(torch.int16) + 128).to(torch.uint8))
    w[8, 0] = 0.123  # a row that ends off the vector width (the scalar tail)
    tail = w[:, :317].contiguous()
    tq, _ = gemv.quantize_i8(tail, biased=True)
    assert torch.equal(tq, (quantize_int8(tail)[0].to(torch.int16) + 128).to(torch.uint8))
    c_biased = quantize_int8(w, biased=True)
    monkeypatch.setattr(gemv, "available", lambda: False)  # the PyTorch path (no kernels, a GPU)
    t_biased = quantize_int8(w, biased=True)
    assert torch.equal(t_biased[0], c_biased[0]) and torch.equal(t_biased[1], c_biased[1])


def _block_quantised(x: torch.Tensor, block: int = 64, terms: int = 2) -> torch.Tensor:
    """The integer kernels' view of the activations: per block, s = max|x| / 127 and int8 terms,
    x ~ s * (hi + lo / 256), hi = round(x / s), lo = round((x / s - hi) * 256); the int8 (VNNI)
    kernel keeps both terms per block of 64, the int4 kernel hi alone per block of 128."""
    xb = x.view(x.shape[0], -1, block)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    t = torch.where(amax > 0, xb * (127 / torch.where(amax > 0, amax, 1)), 0)
    hi = torch.round(t)
    lo = torch.round((t - hi) * 256).clamp(-127, 127) if terms == 2 else torch.zeros_like(hi)
    return ((hi + lo / 256) * (amax / 127)).view_as(x)


@pytest.mark.skipif(not gemv.has_vnni(), reason="this CPU has no integer kernels (an x86-64 CPU without AVX2, or ARM64 without the dot-product extension), so int8 runs the float kernel")
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
def test_int8_vnni_kernel_equals_its_block_quantised_arithmetic(rows):
    torch.manual_seed(rows)
    q, scale = quantize_int8(torch.randn(96, 512) * 0.05)
    x = torch.randn(rows, 512)
    x[:, 7] = 40.0  # an outlier: only its own block of 64 loses resolution
    biased = (q.to(torch.int16) + 128).to(torch.uint8)
    got = gemv.linear_i8(x, biased, scale, None)
    exact = _block_quantised(x) @ (q.float() * scale[:, None]).T
    assert _rel(got, exact) < 1e-5
    # Two terms keep about 15 bits: within 1e-4 of float32 activations (one term was 1e-2 off).
    assert _rel(got, x @ (q.float() * scale[:, None]).T) < 1e-4


@pytest.mark.parametrize("kind", ["bf16", "int8-float", "int8-vnni"])
@pytest.mark.parametrize("n", [8, 101])
def test_a_row_comes_out_the_same_alone_guided_and_among_variations(kind, n):
    """One or two activation rows sweep the weights row after row, more take tiles of rows (gemv.c):
    a row's output must not depend on which path its batch took, bit for bit (a take's audio would
    otherwise change with --variations). n = 101 ends in a partial tile with an odd last row."""
    if kind == "int8-vnni" and not gemv.has_vnni():
        pytest.skip("this CPU has no integer kernels (an x86-64 CPU without AVX2, or ARM64 without the dot-product extension), so int8 runs the float kernel")
    torch.manual_seed(n)
    w, x, bias = torch.randn(n, 320) * 0.05, torch.randn(8, 320), torch.randn(n)
    if kind == "bf16":
        wb = w.to(torch.bfloat16)
        run = lambda xs: gemv.linear_bf16(xs, wb, bias)  # noqa: E731
    else:
        q, scale = quantize_int8(w)
        q = (q.to(torch.int16) + 128).to(torch.uint8) if kind == "int8-vnni" else q
        run = lambda xs: gemv.linear_i8(xs, q, scale, bias)  # noqa: E731
    alone = torch.cat([run(x[i : i + 1]) for i in range(8)])
    for rows in (2, 3, 4, 8):
        got = torch.cat([run(x[lo : lo + rows]) for lo in range(0, 8, rows)])
        assert torch.equal(got, alone), f"{rows} rows at a time differ from one at a time"


@pytest.mark.skipif(not gemv.has_vnni(), reason="this CPU has no integer kernels (an x86-64 CPU without AVX2, or ARM64 without the dot-product extension), so int4 runs PyTorch's packed kernel")
def test_the_c_int4_quantiser_is_quantize_int4_packed_in_the_kernels_layout():
    """Same q, d and z as model.decode.quant.quantize_int4 (the packed fallback's), bit for bit,
    including an all-zero block, an all-positive one (z = 0) and an all-negative one (z = 15)."""
    from model.decode.quant import Int4Linear, quantize_int4

    torch.manual_seed(3)
    lin = nn.Linear(384, 40, bias=False).requires_grad_(False)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        lin.weight[1, :128] = 0
        lin.weight[2, 128:256] = lin.weight[2, 128:256].abs()
        lin.weight[3, 256:] = -lin.weight[3, 256:].abs()
    mod = Int4Linear(lin, torch.bfloat16)
    assert mod.kernel and mod.weight.shape == gemv.i4_shape(40, 384) == (3, 3 * gemv.I4_TILE_BLOCK)
    got, ref = mod.codes(), quantize_int4(lin.weight)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    q, d, z = got
    assert d[1, 0] == 0 and torch.all(q[1, :128] == z[1, 0]) and z[2, 1] == 0 and z[3, 2] == 15
    # The C dequantiser (a prefill's matmul weights) is d (q - z) of those codes, exactly.
    by_hand = ((q - z.repeat_interleave(128, dim=1)).float().view(40, 3, 128) * d[..., None]).view(40, 384)
    assert torch.equal(mod.dequantized(), by_hand)


@pytest.mark.skipif(not gemv.has_vnni(), reason="this CPU has no integer kernels (an x86-64 CPU without AVX2, or ARM64 without the dot-product extension), so int4 runs PyTorch's packed kernel")
@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("outputs", [96, 41])  # 41: the last tile of sixteen rows is padded
def test_int4_kernel_equals_its_block_quantised_arithmetic(rows, outputs):
    """The kernel computes d (q - z) . x with x rounded to one int8 term per block of 128: equal
    to that arithmetic in float32 to 1e-5, and each row the same alone as batched."""
    from model.decode.quant import Int4Linear

    torch.manual_seed(rows)
    lin = nn.Linear(512, outputs, bias=True).requires_grad_(False)
    mod = Int4Linear(lin, torch.bfloat16)
    x = torch.randn(rows, 512)
    # One term rounds x to 1/127 of its block's largest value: well under int4's own rounding.
    assert _rel(mod(x), x @ mod.dequantized().T + lin.bias) < 1e-2
    x[:, 7] = 40.0  # an outlier: its own block of 128 loses resolution, the others keep theirs
    got = mod(x)
    exact = _block_quantised(x, block=128, terms=1) @ mod.dequantized().T + lin.bias
    assert _rel(got, exact) < 1e-5
    assert torch.equal(torch.cat([mod(x[i : i + 1]) for i in range(rows)]), got)


@pytest.mark.skipif(not gemv.has_vnni(), reason="this CPU has no integer kernels (an x86-64 CPU without AVX2, or ARM64 without the dot-product extension), so int4 runs PyTorch's packed kernel")
def test_int4_runs_many_rows_as_one_matmul_over_its_dequantised_weights():
    """Past FEW_ROWS (a long prefill) int4 is one float32 matmul over d (q - z), the C
    dequantiser's weights; up to it, kernel calls of MAX_ROWS rows, row for row the same."""
    from model.decode.quant import Int4Linear

    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True).requires_grad_(False)
    mod = Int4Linear(lin, torch.bfloat16)
    x = torch.randn(2, 40, 256)  # 80 rows: over FEW_ROWS
    assert gemv.rows_of(x) > gemv.FEW_ROWS >= gemv.rows_of(x[:, :20])
    by_hand = x @ mod.dequantized().T + lin.bias
    assert _rel(mod(x), by_hand) < 1e-6
    few = torch.cat([mod(x[:, i : i + 1]) for i in range(40)], dim=1)
    assert torch.equal(mod(x[:, :20]), few[:, :20])
    assert 0 < _rel(few, by_hand) < 1e-2  # the kernel's one activation term per block


@pytest.fixture
def prefill_in(monkeypatch):
    """Pin the prefill products' dtype (model.decode.quant.prefill_dtype, measured per process otherwise)."""
    from model.decode import quant

    def pin(name: str) -> None:
        monkeypatch.setenv("MUSICBRIDGE_PREFILL", name)
        quant.prefill_dtype.cache_clear()
        assert quant.prefill_dtype() == getattr(torch, name)

    yield pin
    quant.prefill_dtype.cache_clear()


@pytest.mark.parametrize("prefill", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", ["bf16", "int8"])
def test_linears_route_few_rows_to_the_kernel_and_many_rows_to_one_matmul(cls, prefill, prefill_in):
    """Up to FEW_ROWS rows run the C kernel (MAX_ROWS per call), more one matmul: in float32 the
    same arithmetic (to 1e-5; 1e-4 where int8 rounds activations to two int8 terms); inside a
    prefill in bfloat16 (fast-bf16 CPUs), anything over MAX_ROWS is PyTorch's bfloat16 matmul
    of the activations and the exact weights (its output is bfloat16 too: 2^-9 of each value),
    the int8 scale and the bias after, in float32."""
    prefill_in(prefill)
    torch.manual_seed(0)
    lin = nn.Linear(128, 96, bias=True).requires_grad_(False)
    mod = Bf16Linear(lin) if cls == "bf16" else Int8Linear(lin, torch.bfloat16)
    from model.decode.quant import prefilling

    x = torch.randn(2, 40, 128)  # 80 rows: over FEW_ROWS, the matmul path
    assert gemv.rows_of(x) > gemv.FEW_ROWS >= gemv.rows_of(x[:, :20]) > gemv.MAX_ROWS
    outside = mod(x)  # many rows outside a prefill: float32 always
    with prefilling():
        many = mod(x)
    few = torch.cat([mod(x[:, i : i + 1]) for i in range(40)], dim=1)  # 2 rows at a time: the kernel
    # 40 rows (a prompt's cross-attention keys): kernel calls of MAX_ROWS rows, row for row the
    # same arithmetic as one or two rows at a time.
    assert torch.equal(mod(x[:, :20]), few[:, :20])
    vnni = cls == "int8" and mod.arithmetic == "vnni"
    assert _rel(few, outside) < (1e-4 if vnni else 1e-5)
    if prefill == "float32":
        assert _rel(few, many) < (1e-4 if vnni else 1e-5)
        with prefilling():
            assert torch.equal(mod(x[:, :20]), few[:, :20])
        return
    if cls == "int8":
        w, scale, bias = mod._signed().float(), mod.scale, mod.bias
    else:
        w, scale, bias = mod.weight.float(), torch.ones(96), mod._bias32  # bfloat16's own bias
    by_hand = torch.nn.functional.linear(x.bfloat16(), w.bfloat16()).float() * scale + bias
    assert _rel(many, by_hand) < 1e-6
    assert 0 < _rel(few, many) < 1e-2
    with prefilling():
        assert _rel(mod(x[:, :20]), by_hand[:, :20]) < 1e-6


def test_float_arithmetic_is_asked_for_by_name_and_vnni_runs_only_where_the_cpu_has_it():
    code = "from model.kernels import gemv; print(gemv.int8_arithmetic(), gemv.has_vnni())"
    run = lambda env: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,  # noqa: E731
                                     env={**os.environ, **env}, cwd=os.getcwd()).stdout.split()
    assert run({"MUSICBRIDGE_KERNELS": "float"})[0] == "float"
    assert run({"MUSICBRIDGE_KERNELS": "1"}) == (["vnni", "True"] if gemv.has_vnni() else ["float", "False"])


def test_kernels_off_falls_back_to_pytorch_with_the_same_results_within_rounding(tmp_path):
    code = ("import torch; from model.kernels import gemv; from model.decode.quant import Int8Linear; "
            "torch.manual_seed(0); lin = torch.nn.Linear(128, 64, bias=False); m = Int8Linear(lin, torch.bfloat16); "
            "x = torch.randn(2, 128); torch.save((gemv.available(), m.arithmetic, x, m(x), m.dequantized()), "
            f"{str(tmp_path / 'out.pt')!r})")
    env = {**os.environ, "MUSICBRIDGE_KERNELS": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=os.getcwd())
    available, arithmetic, x, y, w = torch.load(tmp_path / "out.pt")
    assert available is False and arithmetic is None
    assert _rel(y.float(), x @ w.T) < 2e-2  # PyTorch's packed kernel: bfloat16 activations


def _wide_decoder(dtype: str, width: int = 64, heads: int = 4):
    """A tiny decoder `width` wide (whole 64-blocks, so the kernels apply) in `dtype`."""
    from transformers import MusicgenDecoderConfig, MusicgenForCausalLM

    from model.decode.decoder import MusicgenDecoderLM
    from model.decode.precision import apply_precision
    from model.load.tiny import tiny_configs

    _, _, kw = tiny_configs()
    kw.update(hidden_size=width, ffn_dim=2 * width, num_attention_heads=heads)
    torch.manual_seed(5)

    class Wrap:  # DecoderSpec.of_hf / from_hf read `model.decoder`
        decoder = MusicgenForCausalLM(MusicgenDecoderConfig(**kw)).eval()

    lm = MusicgenDecoderLM.from_hf(Wrap)
    apply_precision(lm, dtype)
    return lm


# int4's C step against another path over the same weights: one activation moved by one int8
# step (1/127 of its block's largest value) by a float32 rounding difference upstream moves the
# logits by about 1/127 / sqrt(width) of their largest value, a few 1e-4 at these widths.
INT4_STEPS = 2e-3


def _step_bound(dtype: str) -> float:
    """How close two paths over the same weights agree (see the layer-step test's docstring)."""
    if dtype == "int4" and gemv.has_vnni():
        return INT4_STEPS
    return 1e-4 if dtype == "int8" and gemv.int8_arithmetic() == "vnni" else 1e-5


def _teacher_forced(lm, tokens, cross, one_pass: bool, kv=torch.float32) -> torch.Tensor:
    from model.decode.decoder import KVCache

    cache = KVCache(lm.spec, tokens.shape[0], 16, "cpu", kv)
    if one_pass:
        return lm(tokens, 0, cache, cross)
    return torch.cat([lm(tokens[:, :, t : t + 1], t, cache, cross) for t in range(tokens.shape[2])], dim=2)


@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_rows_cross_keys_do_not_depend_on_its_batch(dtype):
    """A prompt's cross-attention keys and values are the same alone and batched with others
    (variations, the daemon's batches): each row's products run the same way whatever the
    batch's size (40 text tokens: 40 rows alone, kernel calls; 240 batched, past FEW_ROWS)."""
    lm = _wide_decoder(dtype)
    states, mask = torch.randn(6, 40, 64), torch.ones(6, 40)
    batched = lm.cross_kv(states, mask)
    for i in range(6):
        alone = lm.cross_kv(states[i : i + 1], mask[i : i + 1])
        assert torch.equal(batched.k[:, i : i + 1], alone.k) and torch.equal(batched.v[:, i : i + 1], alone.v)


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_decoder_logits_step_by_step_equal_one_pass(dtype, kv, prefill_in):
    """Teacher-forced: every step's logits from the kernels (and the one-call C layer step)
    equal the same positions' logits from one prefill pass over the same weights, with the
    cache in float32, bfloat16 or int8 (model.decode.precision.kv_dtype), the prefill in float32. A pass
    of up to gemv.FEW_ROWS rows runs the kernels too, so int4's pass and steps round activations
    alike and differ by upstream float32 rounding: INT4_STEPS, as in the layer step's test."""
    if dtype == "int4" and not gemv.has_vnni():
        pytest.skip("on a CPU without integer kernels (x86-64 without AVX2, ARM64 without the dot-product extension) int4 runs PyTorch's packed kernel, eagerly: no C step")
    prefill_in("float32")
    width = 128 if dtype == "int4" else 64  # int4 blocks are 128 inputs: every linear int4
    lm = _wide_decoder(dtype, width=width)
    assert lm.fuse() == lm.spec.n_layers
    cross = lm.cross_kv(torch.randn(2, 5, width), torch.ones(2, 5))
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 12), generator=torch.Generator().manual_seed(1))
    whole = _teacher_forced(lm, tokens, cross, one_pass=True, kv=kv)
    steps = _teacher_forced(lm, tokens, cross, one_pass=False, kv=kv)
    assert _rel(steps, whole) < (INT4_STEPS if dtype == "int4" else 1e-4)


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int8-float", "int4"])
def test_the_c_layer_step_equals_the_eager_layer_step(dtype, kv, monkeypatch):
    """Same weights, same tokens, a cross-attention mask with a fully masked (unconditional) row:
    the C layer step writes the same cache (float32, or bfloat16 rounded as PyTorch rounds) and
    gives the same logits as the eager step (int4 where the CPU has integer dot products; else
    PyTorch's int4 kernel keeps the eager step).

    int8 on integer dot products (the default where the CPU has VNNI) rounds its activations to
    two int8 terms, a step of 1/32512 of a block's largest value: a float32 rounding difference
    upstream (the C layer norm against PyTorch's) can move one element by that step, so those
    agree to 1e-4; the widening arithmetic ("int8-float") is held to 1e-5. int4 rounds them to
    one term, a step of 1/127 of a block's largest value, so the same one-element move is 256
    times larger: INT4_STEPS."""
    if dtype == "int8-float":
        monkeypatch.setenv("MUSICBRIDGE_KERNELS", "float")
    lm = _wide_decoder(dtype.split("-")[0], width=128)
    steps = _step_bound(dtype)
    cross = lm.cross_kv(torch.randn(2, 5, 128), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 12), generator=torch.Generator().manual_seed(2))
    eager = _teacher_forced(lm, tokens, cross, one_pass=False, kv=kv)
    fused = lm.fuse()
    assert fused == (0 if dtype == "int4" and not gemv.has_vnni() else lm.spec.n_layers)
    assert _rel(_teacher_forced(lm, tokens, cross, one_pass=False, kv=kv), eager) < steps


@torch.inference_mode()
def test_the_c_layer_step_rounds_the_bfloat16_cache_as_pytorch_does():
    """The same C step into a float32 and a bfloat16 cache: the bfloat16 columns are exactly the
    float32 ones converted by PyTorch (round to nearest even)."""
    from model.decode.decoder import KVCache

    lm = _wide_decoder("int8", width=128)
    lm.fuse()
    layer = lm.layers[0]
    x = torch.randn(2, 1, 128) * 30  # wide values: many roundings go up, many down
    caches = {kv: KVCache(lm.spec, 2, 4, "cpu", kv) for kv in (torch.float32, torch.bfloat16)}
    for cache in caches.values():
        layer.fused(x, 0, 2, cache, None)
    wide, narrow = caches[torch.float32], caches[torch.bfloat16]
    assert torch.equal(narrow.k[0, :, :, 2].view(torch.int16), wide.k[0, :, :, 2].bfloat16().view(torch.int16))
    assert torch.equal(narrow.v[0, :, :, 2].view(torch.int16), wide.v[0, :, :, 2].bfloat16().view(torch.int16))
    assert wide.k[0, :, :, 2].abs().sum() > 0


@torch.inference_mode()
@pytest.mark.parametrize("width,heads", [(128, 4), (320, 16)])  # head width 32 (vectors), 20 (scalar loop)
def test_the_c_layer_step_quantizes_the_int8_cache_as_the_eager_path_does(width, heads):
    """The C step's int8 keys/values and scales are byte for byte `quantize_kv` of the keys and
    values it wrote into a float32 cache (the eager path's quantisation): ordinary vectors, a
    zero vector (head 0's key and value projections zeroed: scale 0), and NaN (scale NaN and
    zeros, as PyTorch's max propagates it)."""
    from model.decode.decoder import KVCache, quantize_kv

    lm = _wide_decoder("float32", width=width, heads=heads)
    hd = width // heads
    layer = lm.layers[0]
    with torch.no_grad():
        for part in (1, 2):  # key, value rows of head 0
            layer.qkv.weight[part * width : part * width + hd] = 0
    lm.fuse()
    assert layer.fused is not None
    for x in (torch.randn(2, 1, width) * 30, torch.full((2, 1, width), float("nan"))):
        caches = {kv: KVCache(lm.spec, 2, 4, "cpu", kv) for kv in (torch.float32, torch.int8)}
        for cache in caches.values():
            layer.fused(x, 0, 2, cache, None)
        wide, narrow = caches[torch.float32], caches[torch.int8]
        for data, scale, want in ((narrow.k, narrow.k_scale, wide.k), (narrow.v, narrow.v_scale, wide.v)):
            q, s = quantize_kv(want[0, :, :, 2])
            assert torch.equal(data[0, :, :, 2], q)
            torch.testing.assert_close(scale[0, :, :, 2], s, rtol=0, atol=0, equal_nan=True)
            if x.isnan().any():
                assert s.isnan().all() and not q.any()
            else:
                assert not q[:, 0].any() and not s[:, 0].any()  # the zeroed head
                assert q[:, 1:].abs().amax() == 127 and (s[:, 1:] > 0).all()
        assert not narrow.k[0, :, :, 3].any()  # a column nobody wrote
    tiny = torch.tensor([[2.4e-43, -2.4e-43, 1e-43, 0.0]])  # the scale rounds down to a denormal:
    assert (tiny / (tiny.abs().amax() / 127)).abs().max() > 127  # unclamped, 171 would wrap
    assert quantize_kv(tiny)[0].tolist() == [[127, -127, 71, 0]]


@torch.inference_mode()
def test_the_c_layer_step_refuses_a_position_outside_the_cache():
    from model.decode.decoder import KVCache

    lm = _wide_decoder("float32")
    lm.fuse()
    cross = lm.cross_kv(torch.randn(2, 5, 64), torch.ones(2, 5))
    tokens = torch.zeros(2, lm.spec.n_codebooks, 1, dtype=torch.long)
    cache = KVCache(lm.spec, 2, 16, "cpu", torch.float32)
    with pytest.raises(IndexError, match="position 16 of a cache of 16"):
        lm(tokens, 16, cache, cross)  # the one-call step
    with pytest.raises(IndexError, match="position 16 of a cache of 16"):
        lm.layers[0].fused(torch.zeros(2, 1, 64), 0, 16, cache, cross)  # one layer's
    with pytest.raises(IndexError, match="with 3 rows of input"):
        lm.stack(torch.zeros(3, 1, 64), 0, cache, cross)


def test_a_compiler_that_cannot_run_is_a_build_error_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICBRIDGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(gemv.KernelBuildError, match="could not run the C compiler .*no-such-cc"):
        gemv.build()
    assert not any((tmp_path / "kernels").iterdir())  # no half-written library left behind


@torch.inference_mode()
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_the_one_call_step_equals_the_layer_by_layer_c_steps(dtype, kv):
    """`FusedStack` (every layer, the final norm and the heads in one C call) runs the layers'
    same C code; the final layer norm and the heads are C's instead of PyTorch's, so the logits
    agree to float32 rounding (1e-4 where int8 rounds the heads' input to two int8 terms, as in
    test_the_c_layer_step_equals_the_eager_layer_step)."""
    if dtype == "int4" and not gemv.has_vnni():
        pytest.skip("on a CPU without integer kernels (x86-64 without AVX2, ARM64 without the dot-product extension) int4 runs PyTorch's packed kernel, eagerly: no one-call step")
    lm = _wide_decoder(dtype)
    lm.fuse()
    assert lm.stack is not None
    cross = lm.cross_kv(torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]]))
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 12), generator=torch.Generator().manual_seed(4))
    one_call = _teacher_forced(lm, tokens, cross, one_pass=False, kv=kv)
    stack, lm.stack = lm.stack, None
    per_layer = _teacher_forced(lm, tokens, cross, one_pass=False, kv=kv)
    lm.stack = stack
    assert _rel(one_call, per_layer) < _step_bound(dtype)


def test_the_one_call_step_is_not_taken_where_a_layer_keeps_its_eager_step(monkeypatch):
    """Without integer dot products int4 runs PyTorch's packed kernel, eagerly: no one-call step."""
    monkeypatch.setattr(gemv, "takes_i4", lambda in_features: False)
    lm = _wide_decoder("int4")
    assert lm.fuse() < lm.spec.n_layers
    assert lm.stack is None


@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_bfloat16_prefill_stays_within_the_quality_bound_of_the_steps(dtype, prefill_in):
    """Where prefill products run in bfloat16 (a jam's window slide re-reads 10 s), one prefill
    pass and the decode steps part by the activations' rounding only: well inside the 2e-2
    logit bound precisions are held to (model/decode/precision.py), and never exactly equal."""
    from model.decode.precision import QUALITY_BOUND, kv_dtype

    prefill_in("bfloat16")
    lm = _wide_decoder(dtype)
    lm.fuse()
    cross = lm.cross_kv(torch.randn(2, 5, 64), torch.ones(2, 5))
    tokens = torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 12), generator=torch.Generator().manual_seed(1))
    kv = kv_dtype(dtype)  # the cache each precision keeps (bfloat16, int8)
    whole = _teacher_forced(lm, tokens, cross, one_pass=True, kv=kv)
    steps = _teacher_forced(lm, tokens, cross, one_pass=False, kv=kv)
    assert 0 < _rel(steps, whole) < QUALITY_BOUND / 2
