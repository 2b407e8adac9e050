"""MusicGen's decoder re-laid for fast incremental decoding over the checkpoint's weights.

Same arithmetic as `transformers`' MusicgenForCausalLM / MusicgenMelodyForCausalLM (pre-norm
transformer, sinusoidal positions, one embedding and one head per codebook), arranged for a
decode loop: q/k/v fused into one matmul, the codebook embeddings in one table, the heads in one
matmul, and a static KV cache written in place. Text models attend to the text through
cross-attention whose keys/values are computed once per request; melody models read the
conditioning as a prefix of the sequence instead.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.memory import hugepages, placeholders, weight_cache
from model.memory.pages import drop_pages
from model.types import CheckpointError
from model.decode.quant import prefilling


@dataclass(frozen=True)
class DecoderSpec:
    d_model: int
    n_layers: int
    n_heads: int
    ffn: int
    n_codebooks: int
    vocab: int  # codebook entries; the pad/BOS id is `vocab`
    max_positions: int
    cross_attention: bool  # False for melody models (prefix conditioning)
    activation: str = "gelu"

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def pad_id(self) -> int:
        return self.vocab

    @classmethod
    def of_hf(cls, hf_model) -> DecoderSpec:
        """The shapes of a loaded `transformers` MusicGen's decoder."""
        dec = hf_model.decoder.model.decoder
        cfg = hf_model.decoder.config
        return cls(
            d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
            ffn=cfg.ffn_dim, n_codebooks=cfg.num_codebooks, vocab=cfg.vocab_size,
            max_positions=dec.embed_positions.weights.shape[0],
            cross_attention=hasattr(dec.layers[0], "encoder_attn"),
            activation=cfg.activation_function,
        )

    @classmethod
    def of_config(cls, cfg) -> DecoderSpec:
        """The shapes from a text checkpoint's decoder config (model.load.checkpoint's reader)."""
        return cls(
            d_model=cfg.hidden_size, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
            ffn=cfg.ffn_dim, n_codebooks=cfg.num_codebooks, vocab=cfg.vocab_size,
            max_positions=cfg.max_position_embeddings, cross_attention=True,
            activation=cfg.activation_function,
        )


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """MusicGen's position table (n, d): cosines then sines of position / 10000^(i / (d/2 - 1)),
    the tensor2tensor layout `transformers` uses, computed in float32 as it does."""
    half = d // 2
    freq = torch.exp(torch.arange(half, dtype=torch.int64).float() * -(math.log(10000) / (half - 1)))
    angle = torch.arange(n, dtype=torch.int64).float()[:, None] * freq[None]
    table = torch.cat([torch.cos(angle), torch.sin(angle)], dim=1)
    return torch.cat([table, torch.zeros(n, 1)], dim=1) if d % 2 else table


def own_tokens(valid: torch.Tensor) -> int:
    """How many leading positions a text's mask keeps: its own tokens, the rest padding; a mask
    that is not ones-then-zeros counts every position."""
    valid = valid.reshape(-1)
    t = int(valid.sum())
    return t if not valid[t:].any() else valid.numel()


class KVCache:
    """Self-attention keys/values for every layer, allocated once per request batch.

    Shape (layers, batch, heads, max_len, head_dim); step `t` writes column `t` in place. The
    cache is kept in `dtype`: the activations' own, bfloat16, or int8 with one float32 scale per
    key and per value vector (`k_scale`, `v_scale`: (layers, batch, heads, max_len); see
    `quantize_kv`). Writes and reads go through `write` / `read` (and `write_at` / `read_all` for
    the fixed-shape step), which convert; the C step reads the same tensors directly.
    """

    def __init__(self, spec: DecoderSpec, batch: int, max_len: int, device, dtype):
        shape = (spec.n_layers, batch, spec.n_heads, max_len, spec.head_dim)
        if torch.device(device).type == "cpu":  # streamed every step: on huge pages where there are some
            zeros = hugepages.zeros
        else:
            def zeros(shape, dtype):
                return torch.zeros(shape, device=device, dtype=dtype)
        self.k, self.v = zeros(shape, dtype), zeros(shape, dtype)
        self.k_scale = self.v_scale = None
        if dtype == torch.int8:
            self.k_scale, self.v_scale = zeros(shape[:-1], torch.float32), zeros(shape[:-1], torch.float32)
        self.max_len = max_len

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    def _stored(self, k: torch.Tensor, v: torch.Tensor):
        """(cache tensor, scales tensor or None, what goes in it, its scales) for keys and values."""
        for data, scales, x in ((self.k, self.k_scale, k), (self.v, self.v_scale, v)):
            yield (data, scales, *quantize_kv(x)) if self.quantized else (data, None, x.to(data.dtype), None)

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values (batch, heads, n, head_dim) into columns start..start+n-1."""
        end = start + k.shape[2]
        for data, scales, x, scale in self._stored(k, v):
            data[layer, :, :, start:end] = x
            if scales is not None:
                scales[layer, :, :, start:end] = scale

    def read(self, layer: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of columns [0, end) in `dtype`."""
        return self._widen(layer, slice(0, end), dtype)

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """One column, at a position held in a tensor (the fixed-shape step: no host value)."""
        for data, scales, x, scale in self._stored(k, v):
            data[layer].index_copy_(2, pos, x)
            if scales is not None:
                scales[layer].index_copy_(2, pos, scale)

    def read_all(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Every column's keys and values in `dtype` (the fixed-shape step masks the unfilled)."""
        return self._widen(layer, slice(None), dtype)

    def _widen(self, layer: int, cols: slice, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.k[layer, :, :, cols], self.v[layer, :, :, cols]
        if self.quantized:
            return (k.to(dtype) * self.k_scale[layer, :, :, cols, None].to(dtype),
                    v.to(dtype) * self.v_scale[layer, :, :, cols, None].to(dtype))
        return (k, v) if k.dtype == dtype else (k.to(dtype), v.to(dtype))


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors along the last dim as int8 and one float32 scale each: scale = max|x| / 127 and
    x / scale rounded to nearest even, clamped to [-127, 127] (an all-zero vector keeps scale 0,
    one with a NaN gets scale NaN and zeros). The C step (model/kernels/layer_step.c) does the same
    float32 operations, so both store the same bytes."""
    x = x.float()
    scale = x.abs().amax(dim=-1) / 127
    q = torch.round((x / scale[..., None]).clamp_(-127, 127)).nan_to_num_(0.0)
    return q.to(torch.int8), scale


@dataclass
class CrossKV:
    """Cross-attention keys/values (layers, batch, heads, text_len, head_dim) and key mask."""

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor  # bool (batch, 1, 1, text_len): True where a key may be attended
    # What a step derives from these once (model/decode/cross_fold.py's folded keys and values).
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    def bias(self) -> torch.Tensor:
        """`mask` as the additive mask attention applies (0 or -inf, in the keys' dtype), made once
        per batch: the fixed-shape step hands it to attention as is, where a boolean mask would be
        converted in every call of every layer (four kernels each on a GPU)."""
        b = self.derived.get("bias")
        if b is None:
            b = torch.zeros(self.mask.shape, dtype=self.k.dtype, device=self.k.device)
            b = self.derived["bias"] = b.masked_fill(~self.mask, float("-inf"))
        return b


@dataclass(frozen=True)
class TokenStep:
    """One decode state's share of a step of several (`MusicgenDecoderLM.forward_together`): its
    tokens (rows, codebooks, 1) at position `start`, over its own cache and conditioning."""

    tokens: torch.Tensor
    start: int
    cache: KVCache
    cross: CrossKV | None


def _on_meta() -> bool:
    """Whether modules are being built on the meta device (`with torch.device("meta")`)."""
    return torch.empty(0).device.type == "meta"


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec):
        super().__init__()
        d = spec.d_model
        self.spec = spec
        # On the meta device (a layout from a checkpoint) without random init: model/memory/placeholders.py.
        linear = placeholders.linear if _on_meta() else lambda n_in, n_out: nn.Linear(n_in, n_out, bias=False)
        self.ln_self = nn.LayerNorm(d)
        self.qkv = linear(d, 3 * d)
        self.out = linear(d, d)
        if spec.cross_attention:
            self.ln_cross = nn.LayerNorm(d)
            self.cross_q = linear(d, d)
            self.cross_k = linear(d, d)
            self.cross_v = linear(d, d)
            self.cross_out = linear(d, d)
        self.ln_ff = nn.LayerNorm(d)
        self.fc1 = linear(d, spec.ffn)
        self.fc2 = linear(spec.ffn, d)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.spec.n_heads, self.spec.head_dim).transpose(1, 2)

    fused = None  # model.decode.layer_step.FusedLayer once `MusicgenDecoderLM.fuse` has run

    def forward(self, x, layer: int, start: int, cache: KVCache, cross: CrossKV | None):
        b, n, d = x.shape
        if n == 1 and self.fused is not None and self.fused.suits(x, cache, cross):
            return self.fused(x, layer, start, cache, cross)
        h = self.ln_self(x)
        q, k, v = self.qkv(h).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        end = start + n
        cache.write(layer, start, k, v)
        keys, values = cache.read(layer, end, q.dtype)
        if n == 1:
            a = F.scaled_dot_product_attention(q, keys, values)
        elif start == 0:
            a = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            causal = torch.ones(n, end, dtype=torch.bool, device=x.device).tril(diagonal=start)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=causal)
        return self._rest(x, a, layer, cross)

    def step_static(self, x, layer: int, pos: torch.Tensor, valid: torch.Tensor, cache: KVCache,
                    cross: CrossKV | None):
        """One token per row at position `pos` with fixed shapes (see MusicgenDecoderLM.step_static)."""
        d = x.shape[2]
        h = self.ln_self(x)
        q, k, v = self.qkv(h).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        cache.write_at(layer, pos, k, v)
        keys, values = cache.read_all(layer, q.dtype)
        a = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid)
        return self._rest(x, a, layer, cross, static=True)

    def _rest(self, x, a, layer: int, cross: CrossKV | None, static: bool = False):
        """Everything after self-attention: its projection, cross-attention, the feed-forward.
        `static`: the fixed-shape step, whose masks are additive (made once, not per call)."""
        b, n, d = x.shape
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        if cross is not None:
            h = self.ln_cross(x)
            q = self._heads(self.cross_q(h))
            mask = cross.bias() if static else cross.mask
            a = F.scaled_dot_product_attention(q, cross.k[layer], cross.v[layer], attn_mask=mask)
            x = x + self.cross_out(a.transpose(1, 2).reshape(b, n, d))
        h = self.ln_ff(x)
        h = self.fc1(h)
        h = F.gelu(h) if self.spec.activation == "gelu" else _act(self.spec.activation)(h)
        h = self.fc2(h)
        return x + h


def _act(name: str):
    from transformers.activations import ACT2FN  # transformers loads only where this runs

    return ACT2FN[name]


class MusicgenDecoderLM(nn.Module):
    """The decoder plus heads: tokens (batch, codebooks, n) -> logits (batch, codebooks, n, vocab)."""

    kv_dtype: torch.dtype | None = None
    """The self-attention cache's dtype where it is not the activations' (model.decode.precision.kv_dtype)."""
    stack = None
    """model.decode.layer_step.FusedStack: the whole n == 1 step in one C call, once `fuse` found every layer fusable."""

    def __init__(self, spec: DecoderSpec):
        super().__init__()
        self.spec = spec
        k, v1, d = spec.n_codebooks, spec.vocab + 1, spec.d_model
        # Laid out from a checkpoint (from_hf, from_tensors), the module is built on the meta
        # device; there, random init of the embedding and arange import torch._dynamo (1.7 s,
        # measured), so the placeholders skip both (the checkpoint's tensors replace them).
        meta = _on_meta()
        self.embed = placeholders.embedding(k * v1, d) if meta else nn.Embedding(k * v1, d)
        table = torch.empty(spec.max_positions, d) if meta else torch.zeros(spec.max_positions, d)
        self.register_buffer("positions", table, persistent=False)  # on meta, the layout's replaces it
        self.register_buffer("offsets", (torch.arange(k, device="cpu" if meta else None) * v1).view(1, k, 1),
                             persistent=False)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.n_layers))
        self.ln_final = nn.LayerNorm(d)
        self.heads = placeholders.linear(d, k * spec.vocab) if meta else nn.Linear(d, k * spec.vocab, bias=False)

    @classmethod
    def from_hf(cls, hf_model, on_layer=None) -> MusicgenDecoderLM:
        """Lay out a loaded `transformers` MusicGen / MusicGen-Melody's decoder, sharing its memory.

        No weight is copied: layer norms and single linears are the checkpoint's own tensors,
        and where we fuse (q/k/v, the embedding tables, the heads) the fused tensor is made
        once and the checkpoint's tensors become views into it. The `transformers` model
        stays usable (the reference peer in tests) and the decoder's weights exist once.
        `on_layer(ours, theirs)` runs on each layer as soon as it is laid out (precision conversion
        layer by layer keeps the peak to one layer's worth of extra memory).
        """
        causal_lm = hf_model.decoder
        dec = causal_lm.model.decoder
        spec = DecoderSpec.of_hf(hf_model)
        ref = next(dec.parameters())
        with torch.device("meta"):
            lm = cls(spec)
        lm.positions = dec.embed_positions.weights[: spec.max_positions].detach()
        lm.offsets = (torch.arange(spec.n_codebooks, device=ref.device) * (spec.vocab + 1)).view(1, -1, 1)
        with torch.no_grad():
            lm.embed.weight = _fuse([e.weight for e in dec.embed_tokens])
            for mine, theirs in zip(lm.layers, dec.layers):
                sa = theirs.self_attn
                mine.ln_self = theirs.self_attn_layer_norm
                # transformers scales q inside attention; SDPA applies the same 1/sqrt(head_dim).
                mine.qkv.weight = _fuse([sa.q_proj.weight, sa.k_proj.weight, sa.v_proj.weight])
                mine.out.weight = sa.out_proj.weight
                if spec.cross_attention:
                    ca = theirs.encoder_attn
                    mine.ln_cross = theirs.encoder_attn_layer_norm
                    mine.cross_q.weight = ca.q_proj.weight
                    mine.cross_k.weight = ca.k_proj.weight
                    mine.cross_v.weight = ca.v_proj.weight
                    mine.cross_out.weight = ca.out_proj.weight
                mine.ln_ff = theirs.final_layer_norm
                mine.fc1.weight = theirs.fc1.weight
                mine.fc2.weight = theirs.fc2.weight
                if on_layer is not None:
                    on_layer(mine, theirs)
            lm.ln_final = dec.layer_norm
            lm.heads.weight = _fuse([h.weight for h in causal_lm.lm_heads])
        left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
        assert not left, f"decoder tensors not laid out: {left}"
        return lm.eval().requires_grad_(False)

    @classmethod
    def from_tensors(cls, spec: DecoderSpec, tensors: Mapping[str, torch.Tensor], on_layer=None) -> MusicgenDecoderLM:
        """Lay out a text checkpoint's decoder from its tensors, named as in `transformers`'
        MusicgenForCausalLM (`model.decoder.layers.0.fc1.weight`, `lm_heads.0.weight`, ...).

        Single linears and layer norms share the given tensors (a memory-mapped file's, from
        model.load.checkpoint); fused ones (q/k/v, the embedding tables, the heads) are new tensors
        and the sources' pages are handed back, so each weight is resident once while the
        given tensors stay valid (another engine can be laid out from them).
        `on_layer(ours, sources)` runs on each layer as soon as it is laid out.
        """

        d, v1 = spec.d_model, spec.vocab + 1
        shapes = {"embed_tokens": (v1, d), "norm": (d,), "proj": (d, d), "fc1": (spec.ffn, d),
                  "fc2": (d, spec.ffn), "lm_heads": (spec.vocab, d)}

        def get(name: str, kind: str) -> torch.Tensor:
            """The tensor, checked against the config's shapes: the C step trusts them."""
            t = tensors.get(name)
            if t is None:
                raise CheckpointError(f"the checkpoint has no tensor decoder.{name}")
            if tuple(t.shape) != shapes[kind]:
                raise CheckpointError(f"tensor decoder.{name} is {tuple(t.shape)}, but config.json's decoder "
                                      f"section makes it {shapes[kind]}")
            return t if t.dtype == torch.float32 else t.float()

        def param(name: str, kind: str = "proj") -> nn.Parameter:
            return nn.Parameter(get(name, kind), requires_grad=False)

        scratch: list[torch.Tensor] = []

        def fused(names: list[str], kind: str, passing: bool = False, converted: bool = False) -> nn.Parameter:
            """The named tensors stacked; with `passing`, into one buffer reused by every layer,
            for weights `on_layer` converts into new tensors at once (a fresh 12 MB a layer cost
            its first touch, 0.1-0.3 s over musicgen-small's layers, measured)."""
            parts = [get(n, kind) for n in names]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
            if passing:
                if not scratch:
                    scratch.append(torch.empty(shape))
                out = scratch[0]
            else:  # On 2 MB pages: a fresh 12 MB tensor on 4 KB pages faulted 3,000 times (5 ms a layer).
                out = hugepages.empty(shape, torch.float32)
            if converted:  # not copied at all where the weight cache replays its conversion
                weight_cache.defer_concat(out, parts, lambda: drop_pages(parts))
            else:
                torch.cat(parts, dim=0, out=out)
                drop_pages(parts)
            return nn.Parameter(out, requires_grad=False)

        def norm(prefix: str) -> nn.LayerNorm:
            ln = nn.LayerNorm(spec.d_model, device="meta")
            ln.weight, ln.bias = param(prefix + ".weight", "norm"), param(prefix + ".bias", "norm")
            return ln

        p = "model.decoder."
        with torch.device("meta"):
            lm = cls(spec)
        lm.positions = sinusoidal_positions(spec.max_positions, spec.d_model)
        with torch.no_grad():
            lm.embed.weight = fused([f"{p}embed_tokens.{k}.weight" for k in range(spec.n_codebooks)], "embed_tokens")
            for i, mine in enumerate(lm.layers):
                q = f"{p}layers.{i}."
                mine.ln_self = norm(q + "self_attn_layer_norm")
                mine.qkv.weight = fused([q + f"self_attn.{x}_proj.weight" for x in "qkv"], "proj",
                                        passing=on_layer is not None, converted=on_layer is not None)
                mine.out.weight = param(q + "self_attn.out_proj.weight")
                mine.ln_cross = norm(q + "encoder_attn_layer_norm")
                for x in "qkv":
                    getattr(mine, f"cross_{x}").weight = param(q + f"encoder_attn.{x}_proj.weight")
                mine.cross_out.weight = param(q + "encoder_attn.out_proj.weight")
                mine.ln_ff = norm(q + "final_layer_norm")
                mine.fc1.weight, mine.fc2.weight = param(q + "fc1.weight", "fc1"), param(q + "fc2.weight", "fc2")
                if on_layer is not None:
                    on_layer(mine, [t for n, t in tensors.items() if n.startswith(q)])
                    if isinstance(mine.qkv, nn.Linear):  # left as it was: it cannot stay in the scratch
                        weight_cache.materialize(mine.qkv.weight)
                        mine.qkv.weight = nn.Parameter(mine.qkv.weight.clone(), requires_grad=False)
            lm.ln_final = norm(p + "layer_norm")
            lm.heads.weight = fused([f"lm_heads.{k}.weight" for k in range(spec.n_codebooks)], "lm_heads",
                                    converted=on_layer is not None)
        left = [n for n, t in list(lm.named_parameters()) + list(lm.named_buffers()) if t.is_meta]
        assert not left, f"decoder tensors not laid out: {left}"
        return lm.eval().requires_grad_(False)

    def fuse(self) -> int:
        """Give each layer its one-call C decode step where it applies (model/decode/layer_step.py);
        call after the precision is applied. Returns how many layers got one."""
        from model.decode.layer_step import FusedLayer, FusedStack  # layer_step builds on this module's types

        for layer in self.layers:
            layer.fused = FusedLayer.of(layer)
        self.stack = FusedStack.of(self)
        return sum(layer.fused is not None for layer in self.layers)

    def new_cache(self, batch: int, max_len: int, device, dtype: torch.dtype) -> KVCache:
        """An empty cache for `batch` rows; `dtype` is the activations', the cache's own may differ."""
        return KVCache(self.spec, batch, max_len, device, self.kv_dtype or dtype)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, codebooks, n) ids -> (batch, n, d): the sum of the codebooks' embeddings."""
        return self.embed(tokens + self.offsets).sum(dim=1)

    def cross_kv(self, states: torch.Tensor, mask: torch.Tensor) -> CrossKV:
        """Project conditioning (batch, text_len, d) once per request for every layer."""
        b, n, _ = states.shape
        ks, vs = [], []
        # Row by row, and over a row's own tokens only (padding after them gets the projection of
        # a zero row): how a product runs (kernel calls or one matmul, and a matmul's blocking)
        # depends on how many rows it has, and a request's keys must not depend on what else is
        # in its batch, nor on how far the longest prompt there pads it.
        live = [own_tokens(m) for m in mask]
        rows = states.split(1)
        zero = states.new_zeros(1, 1, states.shape[2]) if min(live) < n else None

        def project(linear) -> torch.Tensor:
            pad = linear(zero) if zero is not None else None  # once a layer, shared by padded rows
            out = []
            for r, t in zip(rows, live):
                if t == n:
                    out.append(linear(r))
                else:
                    out.append(pad.expand(1, n - t, -1) if not t else
                               torch.cat([linear(r[:, :t]), pad.expand(1, n - t, -1)], dim=1))
            return torch.cat(out)

        for layer in self.layers:
            ks.append(layer._heads(project(layer.cross_k)))
            vs.append(layer._heads(project(layer.cross_v)))
        # A row with no valid key (the unconditional half) has all-zero keys/values: let it
        # attend everywhere so the softmax stays finite and the output is exactly zero.
        mask = mask.bool().clone()
        mask[~mask.any(dim=1)] = True
        return CrossKV(torch.stack(ks), torch.stack(vs), mask.view(b, 1, 1, n))

    def forward_embeds(self, x: torch.Tensor, start: int, cache: KVCache, cross: CrossKV | None):
        """Run (batch, n, d) input embeddings at positions start..start+n-1 -> logits."""
        n = x.shape[1]
        x = x + self.positions[start : start + n]
        if n == 1 and self.stack is not None and self.stack.suits(x, cache, cross):
            b = x.shape[0]
            return self.stack(x, start, cache, cross).view(b, 1, self.spec.n_codebooks, self.spec.vocab).transpose(1, 2)
        with prefilling() if n > 1 else contextlib.nullcontext():
            for i, layer in enumerate(self.layers):
                x = layer(x, i, start, cache, cross)
            logits = self.heads(self.ln_final(x))  # (batch, n, codebooks * vocab)
        b = x.shape[0]
        return logits.view(b, n, self.spec.n_codebooks, self.spec.vocab).transpose(1, 2)

    def forward(self, tokens: torch.Tensor, start: int, cache: KVCache, cross: CrossKV | None):
        return self.forward_embeds(self.embed_tokens(tokens), start, cache, cross)

    def forward_together(self, steps: list[TokenStep]) -> tuple[list[torch.Tensor], int]:
        """One token each for several decode states -> each one's logits (rows, codebooks, 1,
        vocab), as `forward` gives them, and how many decoder passes that took.

        Where the one-call C step runs, it runs once for all of them: every weight is read once
        for every state's rows, each state's attention reads its own cache at its own position,
        and each state's logits are bit for bit its logits alone. Elsewhere (a GPU, a layer on
        its eager code) the states step one after another.
        """
        from model.decode.layer_step import StepRows  # layer_step builds on this module's types

        embeds = [self.embed_tokens(s.tokens) for s in steps]
        stack = self.stack
        if len(steps) < 2 or stack is None or not all(
                stack.suits(x, s.cache, s.cross) for x, s in zip(embeds, steps)):
            return [self.forward_embeds(x, s.start, s.cache, s.cross) for x, s in zip(embeds, steps)], len(steps)
        rows = [StepRows(x + self.positions[s.start : s.start + 1], s.start, s.cache, s.cross)
                for x, s in zip(embeds, steps)]
        logits = stack.together(rows)
        k, v = self.spec.n_codebooks, self.spec.vocab
        return [part.view(part.shape[0], 1, k, v).transpose(1, 2)
                for part in logits.split([r.x.shape[0] for r in rows])], 1

    def step_static(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache,
                    cross: CrossKV | None) -> torch.Tensor:
        """One decode step with every shape fixed: tokens (batch, codebooks, 1) at position
        `pos` (a one-element int64 tensor) -> logits (batch, codebooks, 1, vocab).

        Attention reads the whole static cache under a mask of the filled positions (as
        gpt-fast does), and the position is a tensor, not a Python number, so no shape or
        host value changes from step to step: a CUDA graph can capture this call once and
        replay it with `pos` updated in place. On the CPU the eager slice (`forward`) is
        cheaper, as it reads only the filled part of the cache.
        """
        x = self.embed_tokens(tokens) + self.positions.index_select(0, pos)
        # One additive mask of the filled positions for every layer (a boolean one would be
        # converted in each layer's attention call).
        unfilled = torch.arange(cache.max_len, device=pos.device) > pos
        valid = torch.zeros(cache.max_len, dtype=x.dtype, device=pos.device).masked_fill(unfilled, float("-inf"))
        valid = valid.view(1, 1, 1, -1)
        for i, layer in enumerate(self.layers):
            x = layer.step_static(x, i, pos, valid, cache, cross)
        logits = self.heads(self.ln_final(x))
        b = x.shape[0]
        return logits.view(b, 1, self.spec.n_codebooks, self.spec.vocab).transpose(1, 2)


def _fuse(params: list[nn.Parameter]) -> nn.Parameter:
    """One tensor holding `params` stacked by rows; each param's data becomes a view into it."""

    fused = torch.cat([p.detach() for p in params], dim=0)
    drop_pages([p.detach() for p in params])  # the checkpoint's own pages: now a second copy
    row = 0
    for p in params:
        n = p.shape[0]
        p.data = fused[row : row + n]
        row += n
    return nn.Parameter(fused, requires_grad=False)
