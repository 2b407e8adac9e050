"""Cross-attention with its query and output projections folded into the text's keys and values.

Why: in a decode step each layer's cross-attention reads two d x d projections (W_q, W_o: 2 of
musicgen-small's 14 MB of int8 weights a layer) to attend to a dozen text tokens. The keys and
values are fixed for a whole generation, so per head h and text token j

    q_h . k_hj = x . (W_q,h^T k_hj) = x . M_hj        W_o,h (sum_j p_hj v_hj) = sum_j p_hj (W_o,h v_hj) = sum_j p_hj U_hj

and the step can read the d-wide M and U (2 x heads x tokens x d values a row) instead of the
projections (2 x d x d). The unconditional half of a guided batch has all-zero keys and values:
its cross-attention output is exactly zero either way, so it reads nothing. For one guided
prompt of 12 tokens on musicgen-small that is 0.39 MB a layer against 2.1 MB in int8. In the
weights' own width, folding is less to read while the text has fewer tokens than a head has
dimensions (64 here); past that the step keeps the projections.

M and U are stored like the self-attention cache of the same precision (`precision.kv_dtype`):
float32 for float32 weights (the same arithmetic, reassociated), bfloat16, or int8 with one
scale per vector (`decoder.quantize_kv`). They are made from the weights the step would have
used (int8's dequantised), once per conditioning, and kept on the `CrossKV` they fold.
MUSICBRIDGE_CROSS_FOLD=0 turns folding off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from model.kernels import gemv
from model.decode.decoder import CrossKV, own_tokens, quantize_kv
from model.settings import current as settings
from model.decode.quant import Int4Linear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Folded:
    """M and U (layers, slots, heads, tokens, d) of the rows that attend to anything."""

    m: torch.Tensor
    u: torch.Tensor
    m_scale: torch.Tensor | None  # int8: (layers, slots, heads, tokens)
    u_scale: torch.Tensor | None
    slot: torch.Tensor  # int32 (rows,): the row's index in m and u (rows with one text share it), -1: reads nothing

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.m, self.u, self.m_scale, self.u_scale) if t is not None)


def enabled() -> bool:
    """MUSICBRIDGE_CROSS_FOLD=0 keeps the projections (for A/B measurements)."""
    return settings().cross_fold


def _weight(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight a linear's products use as float32 values and per-row scales (int8's own;
    ones otherwise), so that weight = values * scales[:, None] without a dequantised copy."""

    if isinstance(linear, Int4Linear):  # scales per block, not per row
        return linear.dequantized(), torch.ones(linear.out_features)
    w = linear.weight.detach()
    scale = getattr(linear, "scale", None)
    if w.dtype == torch.uint8:  # biased int8 ("vnni"): q + 128
        return w.float().sub_(128.0), scale.float()
    if scale is not None and w.dtype == torch.int8:
        return w.float(), scale.float()
    return w.float(), torch.ones(w.shape[0])


def _same_text(cross: CrossKV, a: int, b: int) -> bool:
    return (torch.equal(cross.k[:, a], cross.k[:, b]) and torch.equal(cross.v[:, a], cross.v[:, b])
            and torch.equal(cross.mask[a], cross.mask[b]))


def _bytes(linear: nn.Module) -> int:
    return sum(t.nbytes for t in (*linear.parameters(), *linear.buffers()))


def fold(layers: nn.ModuleList, cross: CrossKV, dtype: torch.dtype) -> Folded | None:
    """The folded keys and values in `dtype`, or None where one text's would be more to read per
    step than the projections they replace. Each slot's values depend on its text alone; whether
    to fold depends on the batch's text length (the longest prompt's)."""
    n_layers, rows, heads, n, hd = cross.k.shape
    d = heads * hd
    active = (cross.v != 0).transpose(0, 1).reshape(rows, -1).any(dim=1)
    # Rows with the same text (a prompt's variations) share one slot: it is read once a step.
    slot = torch.full((rows,), -1, dtype=torch.int32)
    picked: list[int] = []
    for r in active.nonzero().flatten().tolist():
        same = next((i for i, p in enumerate(picked) if _same_text(cross, p, r)), None)
        if same is None:
            same = len(picked)
            picked.append(r)
        slot[r] = same
    a = len(picked)
    width = torch.empty(0, dtype=dtype).element_size()
    per_text = 2 * heads * n * (d * width + (4 if dtype == torch.int8 else 0))
    projections = _bytes(layers[0].cross_q) + _bytes(layers[0].cross_out)
    if per_text >= projections:
        log.debug("cross-attention keeps its projections: %d text tokens fold to %.2f MB a text a layer, "
                  "the projections are %.2f MB", n, per_text / 1e6, projections / 1e6)
        return None
    # The batch's text length n is its longest prompt's: one product over n rows blocked its sums
    # differently for different n, so a prompt's folded keys moved in their last bits with the
    # prompts beside it (and its tokens changed). Each text's products run over its own tokens
    # (a mask that is ones then zeros; any other mask, all n), and its padding folds to zeros.
    live = [own_tokens(cross.mask[r]) for r in picked]
    m = torch.zeros(n_layers, a, heads, n, d)
    u = torch.zeros(n_layers, a, heads, n, d)
    for i, layer in enumerate(layers):
        (wq, sq), (wo, so) = _weight(layer.cross_q), _weight(layer.cross_out)
        wq, wo = wq.view(heads, hd, d), wo.view(d, heads, hd).permute(1, 2, 0)  # (heads, hd, d) each
        for j, r in enumerate(picked):  # one text at a time, over its own tokens (above)
            t = live[j]
            k = cross.k[i, r, :, :t].float() * sq.view(heads, 1, hd)  # W_q's row scales on the key side
            m[i, j, :, :t] = torch.matmul(k, wq)  # (heads, t, d)
            u[i, j, :, :t] = torch.matmul(cross.v[i, r, :, :t].float(), wo)
        u[i] *= so  # W_o's row scales: one per output element
    log.debug("cross-attention folded: %d text(s) of %d tokens, %s, %.2f MB a layer instead of %.2f MB",
              a, n, str(dtype).removeprefix("torch."), a * per_text / 1e6, projections / 1e6)
    if dtype == torch.int8:
        quantize = gemv.quantize_kv if gemv.available() else quantize_kv
        (m, m_scale), (u, u_scale) = quantize(m), quantize(u)
        return Folded(m.contiguous(), u.contiguous(), m_scale.contiguous(), u_scale.contiguous(), slot)
    return Folded(m.to(dtype).contiguous(), u.to(dtype).contiguous(), None, None, slot)


def folded(layers: nn.ModuleList, cross: CrossKV, dtype: torch.dtype) -> Folded | None:
    """`fold`, made once per `CrossKV` (a generation's conditioning) and kept on it."""
    key = ("folded", dtype)
    memo = cross.derived
    if key not in memo:
        memo[key] = fold(layers, cross, dtype)
    return memo[key]
