"""MusicGen's T5 text encoder, without `transformers`.

Importing `transformers` costs about 3 s of a `musicbridge generate` run, and the text encoder
is the only part of it that generation needs. This module computes the same
`T5EncoderModel(...).last_hidden_state` in float32 from the checkpoint's own tensors:

- layer norm is RMS norm (no mean subtraction, no bias), computed in float32;
- attention scores are not scaled by 1/sqrt(d_kv) (T5 folds that into its weights);
- one relative position bias (bidirectional buckets) lives in block 0 and every block adds it;
- padding is masked by adding `finfo(float32).min` to the scores, as `transformers` does. A row
  whose mask is all zeros therefore attends uniformly to every position (finite, no NaN), which
  is what `transformers` gives too;
- there is no dropout (inference only).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model.memory import placeholders

# `feed_forward_proj` is "<act>" or "gated-<act>"; T5Config maps "gated-gelu" to the tanh GELU.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}

# Shape keys without a safe default: a dict lacking them is most likely the wrong config section.
_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
# T5Config's defaults for the rest.
_DEFAULTS: dict[str, Any] = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}


def _activation(feed_forward_proj: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool]:
    """(activation, is_gated) for a `feed_forward_proj` such as "relu" or "gated-gelu"."""
    parts = feed_forward_proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated):
        raise ValueError(f"feed_forward_proj {feed_forward_proj!r} is not '<act>' or 'gated-<act>'")
    name = "gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"feed_forward_proj {feed_forward_proj!r}: activation {name!r} is not one of "
            f"{sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name], gated


def relative_position_bucket(
    relative_position: torch.Tensor, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bidirectional T5 buckets: half for each direction, exact near 0, log-spaced to max_distance.

    The float expression keeps `transformers`' order of operations so that positions on a bucket
    boundary truncate to the same bucket.
    """
    half = num_buckets // 2
    buckets = (relative_position > 0).long() * half
    distance = relative_position.abs()
    max_exact = half // 2
    # clamp(min=1) only avoids log(0); those distances take the exact branch below.
    far = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact)
        / math.log(max_distance / max_exact)
        * (half - max_exact)
    ).long()
    far = far.clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, far)


class _RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square, no mean subtraction and no bias."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size, device="meta"), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class _Block(nn.Module):
    """Self-attention then feed-forward, each pre-normed and residual."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        d_model, d_ff = config["d_model"], config["d_ff"]
        inner = config["num_heads"] * config["d_kv"]
        eps = config["layer_norm_epsilon"]
        self.heads, self.d_kv = config["num_heads"], config["d_kv"]
        self.attn_norm = _RMSNorm(d_model, eps)
        self.q, self.k, self.v = (placeholders.linear(d_model, inner) for _ in range(3))
        self.o = placeholders.linear(inner, d_model)
        self.ff_norm = _RMSNorm(d_model, eps)
        self.act, self.gated = _activation(config["feed_forward_proj"])
        if self.gated:
            self.wi_0, self.wi_1 = placeholders.linear(d_model, d_ff), placeholders.linear(d_model, d_ff)
        else:
            self.wi = placeholders.linear(d_model, d_ff)
        self.wo = placeholders.linear(d_ff, d_model)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """`bias` (B or 1, heads, L, L) is the position bias plus the padding mask."""
        batch, length, _ = h.shape
        x = self.attn_norm(h)
        q, k, v = (
            proj(x).view(batch, length, self.heads, self.d_kv).transpose(1, 2)
            for proj in (self.q, self.k, self.v)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1)
        h = h + self.o((weights @ v).transpose(1, 2).reshape(batch, length, -1))
        x = self.ff_norm(h)
        x = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return h + self.wo(x)


class T5Encoder(nn.Module):
    """The encoder stack of T5 as MusicGen uses it, built from a `text_encoder` config dict.

    A fresh instance has no weights (its parameters are on the meta device); build one with
    `from_state_dict`, which shares the checkpoint's tensors instead of copying them.
    """

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        missing = [key for key in _REQUIRED if key not in config]
        if missing:
            raise ValueError(
                f"T5 config lacks {missing}: expected the `text_encoder` section of a MusicGen "
                f"config.json (T5Config fields {list(_REQUIRED)})"
            )
        known = _REQUIRED + tuple(_DEFAULTS)
        self.config = {**_DEFAULTS, **{k: v for k, v in config.items() if k in known}}
        c = self.config
        self.embed = placeholders.embedding(c["vocab_size"], c["d_model"])
        self.relative_bias = placeholders.embedding(c["relative_attention_num_buckets"], c["num_heads"])
        self.blocks = nn.ModuleList(_Block(c) for _ in range(c["num_layers"]))
        self.final_norm = _RMSNorm(c["d_model"], c["layer_norm_epsilon"])
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def _checkpoint_names(self) -> dict[str, str]:
        """Our parameter name -> its name in a MusicGen checkpoint (without the prefix)."""
        names = {
            "embed.weight": "shared.weight",
            "relative_bias.weight":
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            "final_norm.weight": "encoder.final_layer_norm.weight",
        }
        for i, block in enumerate(self.blocks):
            ours, theirs = f"blocks.{i}.", f"encoder.block.{i}.layer."
            names[ours + "attn_norm.weight"] = theirs + "0.layer_norm.weight"
            for proj in "qkvo":
                names[f"{ours}{proj}.weight"] = f"{theirs}0.SelfAttention.{proj}.weight"
            names[ours + "ff_norm.weight"] = theirs + "1.layer_norm.weight"
            for proj in ("wi_0", "wi_1", "wo") if block.gated else ("wi", "wo"):
                names[f"{ours}{proj}.weight"] = f"{theirs}1.DenseReluDense.{proj}.weight"
        return names

    @classmethod
    def from_state_dict(
        cls, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
        prefix: str = "text_encoder.",
    ) -> T5Encoder:
        """An encoder whose parameters are `tensors` themselves (cast to float32 only if needed).

        `tensors` maps checkpoint names (e.g. "text_encoder.shared.weight") to tensors, as a
        MusicGen model.safetensors does; other keys are ignored. "encoder.embed_tokens.weight"
        stands in for "shared.weight" when only it is present.
        """
        model = cls(config)
        found: dict[str, torch.Tensor] = {}
        problems = []
        for ours, theirs in model._checkpoint_names().items():
            key = prefix + theirs
            alias = prefix + "encoder.embed_tokens.weight"
            if theirs == "shared.weight" and key not in tensors and alias in tensors:
                key = alias
            expected = tuple(model.get_parameter(ours).shape)
            if key not in tensors:
                problems.append(f"missing {key!r} (expected shape {expected})")
            elif tuple(tensors[key].shape) != expected:
                problems.append(
                    f"{key!r} has shape {tuple(tensors[key].shape)}, expected {expected}"
                )
            else:
                found[ours] = tensors[key]
        if problems:
            raise ValueError(
                "T5 text encoder weights do not match its config "
                f"(d_model={model.config['d_model']}, num_layers={model.config['num_layers']}, "
                f"feed_forward_proj={model.config['feed_forward_proj']!r}): " + "; ".join(problems)
            )
        for ours, tensor in found.items():
            owner, _, leaf = ours.rpartition(".")
            setattr(model.get_submodule(owner), leaf,
                    nn.Parameter(tensor.to(torch.float32), requires_grad=False))
        return model

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (callers check token ids against `.num_embeddings`)."""
        return self.embed

    def position_bias(self, length: int) -> torch.Tensor:
        """(1, heads, length, length) bias that every block adds to its attention scores."""
        device = self.relative_bias.weight.device
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]  # key position - query position
        buckets = relative_position_bucket(
            relative, self.config["relative_attention_num_buckets"],
            self.config["relative_attention_max_distance"],
        )
        return self.relative_bias(buckets).permute(2, 0, 1)[None]

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) token ids and mask (1 = real token) -> (B, L, d_model) last hidden state."""
        h = self.embed(input_ids)
        bias = self.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            padding = torch.zeros(attention_mask.shape, dtype=h.dtype, device=h.device)
            padding.masked_fill_(~attention_mask.bool(), torch.finfo(h.dtype).min)
            bias = bias + padding[:, None, None, :]
        for block in self.blocks:
            h = block(h, bias)
        return self.final_norm(h)
