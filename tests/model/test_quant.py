"""Weight-only int8/int4 linears: exact against their own dequantised weights, close to float."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from model.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8, quantize_linears


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


def test_int4_quantiser_bounds_the_error():
    """w ~ d (q - 8) per block of 128: half a step of error, a whole one only where the side of
    zero opposite the block's largest magnitude reaches past 7.5 steps; that largest magnitude
    is -8 d, exact up to d's float16 rounding; an all-zero block stays zero."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[3, :128] = 0
    q, d = quantize_int4(w)
    assert q.dtype == torch.int32 and q.min() >= 0 and q.max() <= 15 and d.shape == (64, 2)
    step = d.abs().repeat_interleave(128, dim=1)
    deq = ((q.float() - 8).view(64, 2, 128) * d[..., None]).view(64, 256)
    err = (deq - w).abs()
    inside = (w / d.repeat_interleave(128, dim=1)) <= 7.5
    assert (err[inside] <= step[inside] / 2 + 1e-6).all() and (err <= step + 1e-6).all()
    big = w.view(64, 2, 128).abs().argmax(dim=-1)
    assert (q.view(64, 2, 128).gather(-1, big[..., None]) == 0)[d != 0].all()
    assert torch.equal(deq[3, :128], torch.zeros(128))


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_kernel_matches_dequantised_reference(cls, bias, monkeypatch):
    """PyTorch's packed kernels (CPUs without the C kernels' integer dot products run int4 on
    them; model/gemv.py's own are tested in tests/model/test_gemv.py)."""
    from model import gemv

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
