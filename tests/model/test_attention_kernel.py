"""The decode step's vector attention and GELU (model/attention.c, model/layer_step.c's mb_gelu)
against PyTorch's, at the lengths a long generation or a jam reaches."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from model.kernels import gemv
from model.decode.decoder import quantize_kv
from model.decode.layer_step import KV_FORMATS
from tests.model.test_gemv import _rel

pytestmark = pytest.mark.skipif(not gemv.available(), reason="needs the C kernels (a C compiler)")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scales: tuple[torch.Tensor, torch.Tensor] | None = None, n: int | None = None) -> torch.Tensor:
    """q (rows, heads, hd); k, v (rows, heads, stride, hd) float32, bfloat16 or int8 (with their
    `scales`, each (rows, heads, stride)), the first n (default: mask's width, or stride) used."""
    rows, heads, hd = q.shape
    stride = k.shape[2]
    if n is None:
        n = stride if mask is None else mask.shape[1]
    out = torch.full((rows, heads * hd), float("nan"))
    scores = torch.empty(gemv._lib.mb_attend_scratch(rows, heads, n))
    m = None if mask is None else mask.to(torch.uint8).contiguous()
    assert k.dtype == v.dtype
    ks, vs = (None, None) if scales is None else (scales[0].data_ptr(), scales[1].data_ptr())
    gemv._lib.mb_attend(q.contiguous().data_ptr(), heads * hd, k.data_ptr(), v.data_ptr(), ks, vs,
                        KV_FORMATS[k.dtype], stride, n,
                        None if m is None else m.data_ptr(), rows, heads, hd, out.data_ptr(), heads * hd,
                        scores.data_ptr())
    return out.view(rows, heads, hd)


@pytest.mark.parametrize("hd", [64, 32, 20])  # 20: not a whole number of vectors (8 or 16 lanes): the scalar path
@pytest.mark.parametrize("n", [1, 17, 1500])
def test_attention_over_the_cache_equals_sdpa(hd, n):
    torch.manual_seed(hd + n)
    rows, heads, stride = 2, 3, n + 5  # the cache is longer than its filled part
    q = torch.randn(rows, heads, hd) * 2
    k, v = torch.randn(rows, heads, stride, hd), torch.randn(rows, heads, stride, hd)
    k[:, :, n:] = float("nan")  # beyond the filled part: must not be read
    want = F.scaled_dot_product_attention(q[:, :, None], k[:, :, :n], v[:, :, :n])[:, :, 0]
    assert _rel(_attend(q, k, v, None if n == stride else torch.ones(rows, n, dtype=torch.bool)), want) < 1e-5


@pytest.mark.parametrize("hd", [64, 20])
def test_attention_over_a_bfloat16_cache_equals_sdpa_over_the_widened_cache(hd):
    torch.manual_seed(hd)
    rows, heads, n = 2, 3, 700
    q = torch.randn(rows, heads, hd)
    k, v = torch.randn(rows, heads, n, hd).bfloat16(), torch.randn(rows, heads, n, hd).bfloat16()
    want = F.scaled_dot_product_attention(q[:, :, None], k.float(), v.float())[:, :, 0]
    assert _rel(_attend(q, k, v, None), want) < 1e-5


@pytest.mark.parametrize("hd", [64, 20])
def test_attention_over_an_int8_cache_equals_sdpa_over_the_dequantised_cache(hd):
    """Each key's scale applied to its dot product and each value's to its softmax weight is the
    same attention as over the dequantised cache (up to float rounding); the rest of the cache,
    beyond the filled part, is never read."""
    torch.manual_seed(hd)
    rows, heads, n = 2, 3, 700
    q = torch.randn(rows, heads, hd) * 2
    (k, ks), (v, vs) = quantize_kv(torch.randn(rows, heads, n + 4, hd)), quantize_kv(torch.randn(rows, heads, n + 4, hd))
    ks[:, :, n:], vs[:, :, n:] = float("nan"), float("nan")
    want = F.scaled_dot_product_attention(q[:, :, None], (k.float() * ks[..., None])[:, :, :n],
                                          (v.float() * vs[..., None])[:, :, :n])[:, :, 0]
    got = _attend(q, k, v, torch.ones(rows, n, dtype=torch.bool), (ks, vs))
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("fmt", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("hd", [64, 32])
@pytest.mark.parametrize("n", [15, 16, 33, 700])
def test_unmasked_attention_equals_sdpa_in_whole_and_partial_blocks_of_keys(fmt, hd, n):
    """The self-attention the decode step runs has no mask: its scores go sixteen keys at a time
    where vectors are 16 wide (n = 15, 16 and 33 put keys in a tail, a whole block and both), and
    64-wide heads take the kernel compiled for that width. Nothing past the filled part is read."""
    torch.manual_seed(n + hd)
    rows, heads, stride = 2, 3, n + 4
    q = torch.randn(rows, heads, hd) * 2
    k, v = torch.randn(rows, heads, stride, hd), torch.randn(rows, heads, stride, hd)
    scales = None
    if fmt == "int8":
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        ks[:, :, n:], vs[:, :, n:] = float("nan"), float("nan")
        scales = (ks, vs)
        kf, vf = k.float() * ks[..., None], v.float() * vs[..., None]
    else:
        k[:, :, n:], v[:, :, n:] = float("nan"), float("nan")
        k, v = k.to(getattr(torch, fmt)), v.to(getattr(torch, fmt))
        kf, vf = k.float(), v.float()
    want = F.scaled_dot_product_attention(q[:, :, None], kf[:, :, :n], vf[:, :, :n])[:, :, 0]
    assert _rel(_attend(q, k, v, None, scales, n=n), want) < 1e-5


def test_masked_keys_get_no_weight_and_a_fully_masked_row_gives_zeros():
    torch.manual_seed(3)
    rows, heads, hd, n = 2, 4, 64, 40
    q, k, v = torch.randn(rows, heads, hd), torch.randn(rows, heads, n, hd), torch.randn(rows, heads, n, hd)
    mask = torch.zeros(rows, n, dtype=torch.bool)
    mask[0, :7] = True
    got = _attend(q, k, v, mask)
    want = F.scaled_dot_product_attention(q[:1, :, None], k[:1, :, :7], v[:1, :, :7])[:, :, 0]
    assert _rel(got[:1], want) < 1e-5
    assert torch.equal(got[1], torch.zeros(heads, hd))


def test_softmax_of_widely_spread_scores_stays_finite_and_exact():
    """Scores hundreds apart: the exponentials underflow to exactly zero, never to NaN or inf."""
    rows, heads, hd, n = 1, 1, 64, 64
    q = torch.ones(rows, heads, hd)
    k = torch.zeros(rows, heads, n, hd)
    k[0, 0, :, 0] = torch.linspace(-800, 800, n)  # scores -100 .. 100 after 1/sqrt(64)
    v = torch.randn(rows, heads, n, hd)
    got = _attend(q, k, v, None)
    want = F.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0]
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 1e-5


def test_vector_gelu_equals_the_exact_erf_gelu():
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    for n in (x.numel(), 13):  # 13: a tail shorter than one vector
        y = x[:n].clone()
        gemv._lib.mb_gelu(y.data_ptr(), ctypes.c_long(n))
        want = F.gelu(x[:n].double()).float()
        assert (y - want).abs().max().item() < 1e-6  # PyTorch's own float32 GELU: 1.2e-6
