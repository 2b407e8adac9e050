"""Weight-only quantised linears: int8 per output channel, int4 in groups along the input.

A decode step at batch 1-2 is a stream of matrix-vector products, bound by the bytes of
weights read. Storing weights in 8 or 4 bits cuts those bytes 4x or 8x against float32.
On the CPU, int8 and bfloat16 decode steps run the C kernels (model/kernels/gemv.py) with float32
activations. int4 and the fallbacks use PyTorch's packed kernels, which are only fast with
bfloat16 inputs (measured for a 4096x1024 weight at batch 2: float32 `F.linear` 8.0 ms, int8
with float32 input 8.0 ms, int8 with bfloat16 input 0.18 ms, int4 with bfloat16 input 0.19 ms).

On devices without the packed CPU kernels the same modules dequantise on the fly, so a
quantised model still runs (slower) everywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time

import torch
import torch.nn.functional as F
from torch import nn

from model.kernels import gemv
from model.memory import hugepages, weight_cache
from model.settings import current as settings

MODES = ("int8", "int4")
log = logging.getLogger(__name__)
_PREFILLING = contextvars.ContextVar("musicbridge_prefilling", default=False)


@contextlib.contextmanager
def prefilling():
    """Marks a decoder pass over many positions (a prefill: a jam's window slide, a long
    request's next window). Only inside one may products run in bfloat16 (`prefill_dtype`);
    everything else with many rows (the text's cross-attention keys, a teacher-forced
    measurement) keeps the kernels' float32 arithmetic. Per thread, as the engine's are."""
    token = _PREFILLING.set(True)
    try:
        yield
    finally:
        _PREFILLING.reset(token)


def _bf16_products() -> bool:
    return _PREFILLING.get() and prefill_dtype() == torch.bfloat16


def _kernel_rows(x: torch.Tensor) -> bool:
    """Whether a product over `x` runs in the C kernels: a step's few rows, or up to FEW_ROWS
    outside a bfloat16 prefill (a prompt's cross-attention keys and values), in calls of
    MAX_ROWS each with the kernel's own arithmetic instead of a matmul."""
    return gemv.suits(x) or (gemv.few(x) and not _bf16_products())


@functools.lru_cache(maxsize=1)
def prefill_dtype() -> torch.dtype:
    """The activations' dtype for many-row products (prefill) of bfloat16 and int8 weights on the
    CPU: bfloat16 where this CPU multiplies bfloat16 matrices much faster than float32 ones (AMX,
    AVX512-BF16: 4.3x for a jam's 10 s prefill shapes on an Intel Xeon), float32 elsewhere.

    Measured here once per process (two small matmuls, about 20 ms), never assumed.
    MUSICBRIDGE_PREFILL=float32 or bfloat16 decides instead. The weights stay exact (int8 values
    and bfloat16 weights are exact in bfloat16) and the sums are float32: the error is the
    activations' rounding, the arithmetic of PyTorch's int8 fallback (model/decode/precision.py).
    """
    forced = settings().prefill
    if forced in ("float32", "bfloat16"):
        return getattr(torch, forced)
    x, w = torch.randn(512, 1024), torch.randn(1024, 1024)

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        F.linear(a, b)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            F.linear(a, b)
            times.append(time.perf_counter() - t)
        return min(times)

    f32, b16 = best(x, w), best(x.bfloat16(), w.bfloat16())
    picked = torch.bfloat16 if b16 * 1.5 < f32 else torch.float32
    log.info("prefill products in %s (a 512x1024x1024 matmul: float32 %.1f ms, bfloat16 %.1f ms)",
             str(picked).removeprefix("torch."), f32 * 1e3, b16 * 1e3)
    return picked


def quantize_int8(w: torch.Tensor, biased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel: w ~ q * scale[:, None], q in [-127, 127]; with `biased`,
    q + 128 as uint8 (the layout of the VNNI kernel's unsigned weights).

    On the CPU with the C kernels: one pass per row in C (model/kernels/gemv.c, the same arithmetic bit
    for bit, biased in the same pass); elsewhere one temporary the size of `w` (in-place rounding).
    """
    if w.device.type == "cpu" and w.dim() == 2 and gemv.available():
        return gemv.quantize_i8(w.float().contiguous(), biased=biased)
    weight_cache.materialize(w)  # read here, not through `fill`: a deferred copy must exist first
    w = w.float()
    lo, hi = torch.aminmax(w, dim=1)
    scale = (torch.maximum(hi, -lo) / 127.0).clamp_(min=1e-12)
    q = (w * (1.0 / scale)[:, None]).round_().clamp_(-127, 127)
    return (q.add_(128).to(torch.uint8) if biased else q.to(torch.int8)), scale


# The ranges `quantize_int4` tries for a block: [s lo, s hi] for s = 1 - j / I4_SHRINK_DIV,
# j < I4_SHRINKS; the squared error summed in I4_LANES running sums (model/kernels/int_kernels.h
# holds the same numbers for the C quantiser).
I4_SHRINKS, I4_SHRINK_DIV, I4_LANES = 13, 40.0, 16
_INT4_ROWS = 256


def _int4_at(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, s: torch.Tensor):
    """One candidate range [s lo, s hi] for every block of `g` (N, blocks, group): q, d, z and
    the squared error of d (q - z) against the weights, summed as the C quantiser sums it
    (model/kernels/int4.c i4_block: each term in float32, then float64 in I4_LANES running sums
    and those in order), so the two agree to the bit."""
    d = (s * (hi - lo) / 15.0).half().float()
    inv = torch.where(d > 0, 1.0 / torch.where(d > 0, d, 1.0), 0.0)
    z = (-(s * lo) * inv).round_().clamp_(0, 15)
    q = (g * inv[..., None]).round_().add_(z[..., None]).clamp_(0, 15)
    e = (q - z[..., None]).mul_(d[..., None]).sub_(g).square_().double()
    e = e.view(*e.shape[:-1], -1, I4_LANES)
    lanes = e[..., 0, :].clone()
    for c in range(1, e.shape[-2]):
        lanes += e[..., c, :]
    err = lanes[..., 0].clone()
    for lane in range(1, I4_LANES):
        err += lanes[..., lane]
    return q, d, z, err


def quantize_int4(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block of `group` inputs, w ~ d (q - z) with q, z in [0, 15], over the range with the
    least squared error among [s lo, s hi] (lo = min(w, 0), hi = max(w, 0), s from 1 down to 0.7
    in steps of 1/40; the first on a tie): d = s (hi - lo) / 15 rounded to float16 (as the kernel
    stores it), z = round-half-even(-s lo / d), q = round-half-even(w / d) + z, both clamped.
    Clipping a block's few largest weights lets the step shrink for all the others: on random
    Gaussian weights the RMS error falls by 5%, on heavy-tailed ones by 4-5%. The zero point keeps
    the range asymmetric (a symmetric step, set by the largest magnitude, left a third more RMS
    error on the trained proxy); zero itself stays exact. The C quantiser (model/kernels/int4.c
    mb_quantize_i4) does the same arithmetic. Returns q (N, K) int32, d and z (N, K // group).
    """
    n, k = w.shape
    w = w.float()
    one = torch.ones((), dtype=torch.float32)
    shrinks = [one - torch.tensor(float(j)) / torch.tensor(I4_SHRINK_DIV) for j in range(I4_SHRINKS)]
    qs, ds, zs = [], [], []
    for rows in w.split(_INT4_ROWS):  # a few hundred rows at a time: the candidates' temporaries stay in cache
        g = rows.reshape(rows.shape[0], k // group, group)
        lo, hi = g.amin(dim=-1).clamp(max=0), g.amax(dim=-1).clamp(min=0)
        q, d, z, best = _int4_at(g, lo, hi, shrinks[0])
        for s in shrinks[1:]:
            qc, dc, zc, err = _int4_at(g, lo, hi, s)
            better = err < best
            best = torch.where(better, err, best)
            q = torch.where(better[..., None], qc, q)
            d, z = torch.where(better, dc, d), torch.where(better, zc, z)
        qs.append(q.to(torch.int32).reshape(-1, k))
        ds.append(d)
        zs.append(z.to(torch.int32))
    return torch.cat(qs), torch.cat(ds), torch.cat(zs)


def _many_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Many float32 rows (a prefill) against a dense weight, as one matmul: in bfloat16 inside a
    prefill where this CPU has fast bfloat16 matmuls (`prefilling`), else in float32, the
    kernels' arithmetic."""
    if _bf16_products():
        y = F.linear(x.bfloat16(), weight.bfloat16()).float()
        return y if bias is None else y + bias
    return F.linear(x, weight.float(), bias)


class Bf16Linear(nn.Module):
    """bfloat16 weights behind float32 activations: half the bytes a step reads.

    On the CPU a decode step's few rows go to the C kernel (model/kernels/gemv.py), which widens the
    weights in registers and keeps the activations float32; longer inputs (prefill) run the
    same arithmetic as one float32 matmul.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        convert = w.device.type == "cpu" and w.dtype != torch.bfloat16  # a bfloat16 weight is shared as before
        if convert:
            out = hugepages.for_weights(tuple(w.shape), torch.bfloat16)
            weight_cache.fill(out, None, lambda: out.copy_(w), source=w)
        self.register_buffer("weight", out if convert else w.to(torch.bfloat16))
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        self.kernel = linear.weight.device.type == "cpu" and gemv.takes(linear.in_features)
        self._bias32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel and x.dtype == torch.float32:
            if _kernel_rows(x):
                return gemv.linear_bf16(x, self.weight, self._bias32)
            return _many_rows(x, self.weight, self._bias32)
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


class Int8Linear(nn.Module):
    """int8 weights, one scale per output row.

    Where the C kernels run (CPU), the weights are stored for their arithmetic: biased to
    unsigned (q + 128) for integer dot products ("vnni"), plain int8 for widening ("float").
    Elsewhere PyTorch's packed kernel runs, with activations cast to `act_dtype`.
    """

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype):
        super().__init__()
        kernels = linear.weight.device.type == "cpu" and gemv.takes(linear.in_features)
        self.arithmetic = gemv.int8_arithmetic() if kernels else None
        q, scale = quantize_int8(linear.weight.detach(), biased=self.arithmetic == "vnni")
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale if self.arithmetic else scale.to(act_dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().to(torch.float32 if self.arithmetic else act_dtype), requires_grad=False)

    def _signed(self) -> torch.Tensor:
        return self.weight.to(torch.int16).sub_(128).to(torch.int8) if self.weight.dtype == torch.uint8 else self.weight

    def dequantized(self) -> torch.Tensor:
        return self._signed().float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.arithmetic and _kernel_rows(x):
            return gemv.linear_i8(x, self.weight, self.scale, self.bias)
        shape = x.shape
        if self.arithmetic:  # many rows (prefill): compute-bound, one matmul
            x2 = x.reshape(-1, self.in_features)
            if _bf16_products():  # q exact in bfloat16; the scale after the sums
                q = self.weight.bfloat16()  # 0..255 and -127..127 are exact in bfloat16, and so is q - 128
                y = F.linear(x2.bfloat16(), q.sub_(128) if self.weight.dtype == torch.uint8 else q).float() * self.scale
                y = y if self.bias is None else y + self.bias
            else:
                y = F.linear(x2.float(), self.dequantized(), self.bias)
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)
        if x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


class Int4Linear(nn.Module):
    """int4 weights in blocks of 128 inputs, w = d (q - z) (`quantize_int4`): about half of int8's
    bytes and an eighth of float32's.

    On a CPU with integer dot products a decode step's few rows go to the C kernel
    (model/kernels/gemv.c), which keeps the weights packed in its own layout (`gemv.quantize_i4`:
    sixteen rows a tile, data and scales in one stream per tile); longer inputs (prefill) are one
    matmul over the dequantised weights. Elsewhere PyTorch's packed int4 kernel runs the same weights with
    activations cast to `act_dtype`.
    """

    group = gemv.I4_GROUP  # the kernel's block, and the packed fallback's group

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = w.device.type == "cpu" and gemv.takes_i4(self.in_features)
        if self.kernel:
            self.register_buffer("weight", gemv.quantize_i4(w.float().contiguous()))
            bias_dtype = torch.float32
        else:
            q, d, z = quantize_int4(w, self.group)
            # PyTorch's convention: w = (q - 8) * scale + zero, laid out (K // group, N, 2).
            self.register_buffer("scale_zero", torch.stack([d, (8 - z) * d], dim=-1).transpose(0, 1)
                                 .contiguous().to(act_dtype))
            self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1)
                                 if w.device.type == "cpu" else q.to(torch.uint8))
            self._codes = None if w.device.type == "cpu" else (q, d, z)
            bias_dtype = act_dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(bias_dtype),
                                                                  requires_grad=False)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (N, K) int32, d (N, K // group) float32, z (N, K // group) int32) from the kernel's
        layout, as `quantize_int4` made them."""
        n, tile = self.out_features, gemv.I4_TILE
        blocks = self.weight.view(self.weight.shape[0], -1, gemv.I4_TILE_BLOCK)  # (tiles, blocks, bytes)
        tiles, nb = blocks.shape[:2]
        # vector j, lane (row) i, byte c: inputs 8j + c (low nibble) and 8j + 4 + c (high nibble)
        data = blocks[..., : gemv.I4_STEPS_AT].reshape(tiles, nb, 16, tile, 4).to(torch.int32)
        q = torch.stack([data & 15, data >> 4], dim=4)  # (tiles, blocks, j, row, lo/hi, c)
        q = q.permute(0, 3, 1, 2, 4, 5).reshape(tiles * tile, self.in_features)[:n]
        d = blocks[..., gemv.I4_STEPS_AT : gemv.I4_ZEROS_AT].contiguous().view(torch.float16).float()  # (tiles, blocks, row)
        z = blocks[..., gemv.I4_ZEROS_AT : gemv.I4_ZEROS_AT + tile].to(torch.int32)
        return q, d.transpose(1, 2).reshape(-1, nb)[:n], z.transpose(1, 2).reshape(-1, nb)[:n]

    def dequantized(self) -> torch.Tensor:
        if self.kernel:
            return gemv.dequantize_i4(self.weight, self.out_features, self.in_features)
        if self._codes is None:
            # Recover the weights by running the packed kernel on the identity: exact up to the
            # scales' rounding to act_dtype, which the kernel applies too.
            eye = torch.eye(self.in_features, dtype=self.scale_zero.dtype)
            return torch._weight_int4pack_mm_for_cpu(eye, self.packed, self.group, self.scale_zero).float().T
        q, d, z = self._codes
        g = (q - z.repeat_interleave(self.group, dim=1)).float().view(self.out_features, -1, self.group)
        return (g * d[..., None]).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernel and x.dtype != torch.float32:
            return self(x.float()).to(x.dtype)
        if self.kernel:
            if _kernel_rows(x):
                return gemv.linear_i4(x, self.weight, self.out_features, self.in_features, self.bias)
            return _many_rows(x, self.dequantized(), self.bias)
        x2 = x.reshape(-1, self.in_features).to(self.scale_zero.dtype)
        if x2.device.type == "cpu":
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group, self.scale_zero)
        else:
            y = F.linear(x2, self.dequantized().to(x2.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


def int4_group(in_features: int) -> int | None:
    """int4's block (128 inputs) where it divides the width, else None (the linear gets int8)."""
    return Int4Linear.group if in_features % Int4Linear.group == 0 else None


def quantize_linears(
    module: nn.Module, mode: str, skip: tuple[str, ...] = (),
    act_dtype: torch.dtype = torch.bfloat16, int8_names: tuple[str, ...] = (),
) -> nn.Module:
    """Replace every nn.Linear under `module` in place (names in `skip` stay as they are).

    In int4 mode, linears named in `int8_names` (e.g. the output heads, whose error reaches
    the logits directly) and linears whose width no group divides get int8 instead.
    """
    if mode not in MODES:
        raise ValueError(f"unknown quantisation {mode!r}: expected one of {', '.join(MODES)}")
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            full = f"{name}.{attr}" if name else attr
            if not isinstance(sub, nn.Linear) or full in skip or attr in skip:
                continue
            if (mode == "int4" and int4_group(sub.in_features) is not None and full not in int8_names
                    and attr not in int8_names):
                setattr(child, attr, Int4Linear(sub, act_dtype))
            else:
                setattr(child, attr, Int8Linear(sub, act_dtype))
    return module
