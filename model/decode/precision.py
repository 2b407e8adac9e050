"""Decoder precisions: how each is applied, and which hold the quality bound.

The quality bound is on teacher-forced logits against float32: max |ours - float32| /
max |float32| <= QUALITY_BOUND. Whether a precision holds it is a property of the arithmetic,
not of the machine, so it is measured once with `musicbridge bench --quality` and recorded
here (BENCHMARKS.md, "Quantisation quality"); the speed of each precision is a property of the
machine and is measured on it (`model.decode.autotune`).
"""

from __future__ import annotations

import torch
from torch import nn
from model.decode.quant import Bf16Linear, quantize_linears
from model.kernels import gemv

CPU_CANDIDATES = ("float32", "bfloat16", "int8", "int4")
QUALITY_BOUND = 2e-2

# Max relative teacher-forced logit error against float32 on the *trained* proxy (a small
# MusicGen-shaped decoder trained on structured token data, whose logits are peaked like a
# real checkpoint's), measured with `musicbridge bench --arch tiny --dtype bfloat16,int8,int4
# --quality --proxy-steps 300` (BENCHMARKS.md, "Quantisation quality"). Random weights (flat
# logits) are a pessimistic proxy and are reported beside it, not used here. The proxy trains on
# the machine that measures it, so each CPU's figures differ a little. An entry covers both
# arithmetics a precision can run in: the C kernels (float32 activations) and PyTorch's
# fallback (bfloat16 activations).
# - bfloat16 5.1e-3: PyTorch's fallback; the C kernel reads 1.3e-3 to 2.8e-3 (the upper end
#   with the bfloat16 KV cache, kv_dtype below).
# - int8 1.03e-2: the C kernel with the int8 KV cache on a proxy trained on the Intel Xeon (RMS
#   2.66e-3, top-k 250 KL 4.6e-5; 6.94e-3 for the same proxy with a bfloat16 cache); PyTorch's
#   fallback 9.7e-3. A proxy trained on the AMD EPYC (Zen 4) reads 1.38e-2, also within the
#   bound. The activations go in as two int8 terms per block of 64 because one term reads 1.8e-2,
#   at the bound.
# - int4 5.64e-2: the C kernel (blocks of 128 with a step and a zero point, one int8 activation
#   term; RMS 1.25e-2, top-k 250 KL 2.25e-3; 3.16e-2 on the Zen 4's proxy); PyTorch's packed
#   int4 reads 4.6e-2 to 8.7e-2 depending on the CPU the proxy trained on. Over the bound either
#   way, so `auto` never picks it. The quantiser's range search (model.decode.quant.quantize_int4)
#   halves the max error on a sensitive proxy (1.39e-1 to 6.6e-2, AMD EPYC Zen 4) without
#   reaching the bound; neither blocks of 32 nor int8 for the most sensitive matrices (qkv, then
#   out) do short of int8's bytes (docs/engine.md, "int4's range search").
TRAINED_PROXY_ERROR: dict[str, float] = {
    "float32": 0.0,
    "bfloat16": 5.1e-3,
    "int8": 1.03e-2,
    "int4": 5.64e-2,
}


def kv_dtype(dtype: str, device: str = "cpu") -> torch.dtype | None:
    """The self-attention cache's dtype where it is narrower than the activations, else None.

    On the CPU bfloat16 keeps the cache in bfloat16 and int8 in int8 (one scale per key and per
    value vector, model.decode.decoder.quantize_kv): past about 17 s a decode step reads more float32
    cache than int8 weights (at 30 s, 590 MB of cache a step for musicgen-small at batch 2,
    against 336 MB of weights; 157 MB in int8 with its scales), and rounding keys and values costs less quality
    than the weights' own rounding (BENCHMARKS.md). float32 stays exact. int4 keeps an int8
    cache where its C step runs (integer dot products); elsewhere it runs the eager step, whose
    attention would widen the cache every step.
    """

    if str(device).startswith("cuda"):
        return None
    if dtype == "int4":
        return torch.int8 if gemv.has_vnni() else None
    return {"bfloat16": torch.bfloat16, "int8": torch.int8}.get(dtype)


def within_bound(dtype: str) -> bool:
    return TRAINED_PROXY_ERROR.get(dtype, float("inf")) <= QUALITY_BOUND


def apply_precision(module: nn.Module, dtype: str, device: str = "cpu") -> torch.dtype:
    """Convert a decoder (or one layer) in place; return the dtype its activations run in.

    On the CPU only the linears' weights change precision (and the KV cache, where the C step
    runs: `kv_dtype`): activations and layer norms stay float32, because attention in bfloat16
    on a CPU without native bf16 instructions is 4-8x slower than in float32 (measured on an AMD
    EPYC, AVX2: 0.86 against 0.16 ms for one head-batched query over 264 keys), and the step is
    bound by reading weights, not activations. On a GPU everything runs in the low precision.
    """

    if dtype == "float32":
        return torch.float32
    on_cpu = not str(device).startswith("cuda")
    if dtype in ("bfloat16", "float16"):
        dt = getattr(torch, dtype)
        if on_cpu and dtype == "bfloat16":
            _swap_linears(module, lambda lin: Bf16Linear(lin))
            return torch.float32
        module.to(dt)
        return dt
    # The packed kernels are fast only with bfloat16 inputs: each quantised linear casts its
    # input to bfloat16 and its output back to the activations' dtype.
    quantize_linears(module, dtype, int8_names=("heads",))
    if on_cpu:
        return torch.float32
    module.to(torch.bfloat16)
    return torch.bfloat16


def _swap_linears(module: nn.Module, make) -> None:
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, nn.Linear):
                setattr(child, attr, make(sub))
