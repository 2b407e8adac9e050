"""Weight-only int8/int4 linears: exact against their own dequantised weights, close to float."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.decode.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_linears


def _linear(n=256, k=512, seed=0, bias=False) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    nn.init.normal_(lin.weight, 0, 0.05)
    return lin.requires_grad_(False)


def test_int8_quantiser_bounds_the_error():
    w = torch.randn(64, 256)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


def _blocks_at_full_range(w: torch.Tensor):
    """The plain int4 quantiser, per block of 128: the whole range [min(w, 0), max(w, 0)] in 15
    steps (what `quantize_int4` tries first) -> its dequantised weights."""
    g = w.view(w.shape[0], -1, 128)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    d = ((hi - lo) / 15).half().float()
    z = (-lo / d).round().clamp(0, 15)
    q = (g / d[..., None]).round().add(z[..., None]).clamp(0, 15)
    return ((q - z[..., None]) * d[..., None]).view_as(w)


def _dequantised(q, d, z):
    n, k = q.shape
    return ((q - z.repeat_interleave(128, dim=1)).float().view(n, -1, 128) * d[..., None]).view(n, k)


def test_int4_quantiser_bounds_the_error():
    """w ~ d (q - z) per block of 128 over a range [s lo, s hi] (lo = min(w, 0), hi = max(w, 0),
    s = 1 - j / 40 for j < 13): half a step of error inside the range, the range's end outside it;
    zero stays exact, and an all-zero block stays zero."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[3, :128] = 0
    w[4, 128:] = w[4, 128:].abs()  # all positive: the zero point is 0
    q, d, z = quantize_int4(w)
    assert q.dtype == z.dtype == torch.int32 and d.shape == z.shape == (64, 2)
    assert q.min() >= 0 and q.max() <= 15 and z.min() >= 0 and z.max() <= 15 and z[4, 1] == 0
    deq = _dequantised(q, d, z)
    step = d.repeat_interleave(128, dim=1)
    zr = z.repeat_interleave(128, dim=1)
    lo_end, hi_end = -zr * step, (15 - zr) * step
    inside = (w >= lo_end - step / 2) & (w <= hi_end + step / 2)
    assert ((deq - w).abs() <= 0.51 * step)[inside].all()
    assert torch.equal(deq[~inside], torch.where(w < lo_end, lo_end, hi_end)[~inside])
    assert torch.equal(deq[3, :128], torch.zeros(128)) and d[3, 0] == 0
    spread = (w.view(64, 2, 128).amax(-1).clamp(min=0) - w.view(64, 2, 128).amin(-1).clamp(max=0)) / 15
    shrink = (d / torch.where(spread > 0, spread, 1.0))[spread > 0]
    grid = torch.tensor([1 - j / 40 for j in range(13)])
    assert ((shrink[:, None] - grid).abs() <= 2**-10 * grid).any(dim=1).all()


@pytest.mark.parametrize("tail", ["gaussian", "student-t 3"])
def test_int4_range_search_beats_the_full_range_on_every_block(tail):
    """Each block's squared error is at most the full range's (the search starts there), and the
    whole matrix's falls by at least 3%: clipping a block's largest weights lets the step shrink
    for all the others, most where the tails are heavy (trained weights)."""
    torch.manual_seed(1)
    shape = (256, 1024)
    w = torch.randn(shape) if tail == "gaussian" else torch.distributions.StudentT(3.0).sample(shape)
    w = w * 0.02
    ours = (_dequantised(*quantize_int4(w)) - w).double().pow(2).view(256, -1, 128).sum(-1)
    full = (_blocks_at_full_range(w) - w).double().pow(2).view(256, -1, 128).sum(-1)
    assert (ours <= full).all()
    assert ours.sum() < 0.97 * full.sum()


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_kernel_matches_dequantised_reference(cls, bias, monkeypatch):
    """PyTorch's packed kernels (CPUs without the C kernels' integer dot products run int4 on
    them; model/kernels/gemv.py's own are tested in tests/model/test_gemv.py)."""
    from model.kernels import gemv

    monkeypatch.setattr(gemv, "takes_i4", lambda in_features: False)
    lin = _linear(bias=bias)
    q = cls(lin, torch.bfloat16)
    x = torch.randn(3, 512).bfloat16()
    ref = x.float() @ q.dequantized().T + (0 if lin.bias is None else lin.bias.bfloat16().float())
    got = q(x).float()
    # bfloat16 output rounding (8-bit mantissa) is the only difference from the reference.
    assert (got - ref).abs().max() / ref.abs().max() < 1e-2


@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.2)])
def test_quantised_linear_close_to_float(mode, bound):
    lin = _linear()
    x = torch.randn(4, 512)
    ref = lin(x)
    m = quantize_linears(nn.Sequential(copy.deepcopy(lin)), mode)
    err = (m(x) - ref).abs().max() / ref.abs().max()
    assert err < bound, f"{mode}: {err:.3e}"


def test_quantize_linears_replaces_and_skips():
    model = nn.Sequential(_linear(), nn.ReLU(), _linear(n=128, k=256, seed=1))
    model.add_module("heads", _linear(n=64, k=128, seed=2))
    quantize_linears(model, "int4", int8_names=("heads",), skip=("0",))
    assert isinstance(model[0], nn.Linear)
    assert isinstance(model[2], Int4Linear)
    assert isinstance(model.heads, Int8Linear)
    with pytest.raises(ValueError, match="expected one of"):
        quantize_linears(model, "int3")


@pytest.mark.parametrize("dtype", ["int8", "int4", "bfloat16"])
def test_engine_low_precision_generates_valid_codes(tiny_model_dir, tiny_engine, dtype):
    from model.engine import Engine
    from model.types import GenerationRequest, SamplingParams

    eng = Engine.load(str(tiny_model_dir), device="cpu", dtype=dtype)
    assert eng.dtype == dtype
    req = [GenerationRequest("lofi beat", 0.4, SamplingParams(greedy=True))]
    codes = eng.generate_tokens(req)[0]
    ref = tiny_engine.generate_tokens(req)[0]
    assert codes.shape == ref.shape
    assert codes.min() >= 0 and codes.max() < 64
