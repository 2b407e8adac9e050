"""model/memory/placeholders.py: modules with a checkpoint's shapes, no values and no random init."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.memory import placeholders
from model.decode.decoder import DecoderSpec, MusicgenDecoderLM


def test_shapes_without_values():
    lin = placeholders.linear(3, 5)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (5, 3) and lin.weight.is_meta and lin.bias is None
    assert (lin.in_features, lin.out_features) == (3, 5)
    biased = placeholders.linear(3, 5, bias=True)
    assert biased.bias.shape == (5,) and biased.bias.is_meta
    emb = placeholders.embedding(7, 4)
    assert emb.weight.shape == (7, 4) and emb.weight.is_meta


def test_a_decoder_built_on_meta_runs_no_init(monkeypatch):
    """A layout's placeholder decoder (from_tensors, from_hf) skips every random init, which on
    the meta device runs through Python decompositions; built for real it still initialises."""
    def refuse(*args, **kwargs):
        raise AssertionError("random init ran")

    spec = DecoderSpec(d_model=64, n_heads=4, n_layers=2, ffn=128, n_codebooks=4, vocab=32,
                       max_positions=64, cross_attention=True)
    monkeypatch.setattr(nn.init, "kaiming_uniform_", refuse)
    with torch.device("meta"):
        lm = MusicgenDecoderLM(spec)
    assert all(p.is_meta for p in lm.layers.parameters() if p.dim() == 2)
    with pytest.raises(AssertionError, match="random init ran"):
        MusicgenDecoderLM(spec)
