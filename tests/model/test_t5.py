"""Our T5 encoder (model/conditioning/t5.py) against transformers' T5EncoderModel on the same weights.

The reference is a real random T5EncoderModel whose weights are pushed away from their init
(norms not 1, a strong relative position bias) so that a mistake in any part shows.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.conditioning.t5 import T5Encoder

ROOT = Path(__file__).resolve().parents[2]

TINY = dict(  # the shape of tiny_configs()' text encoder
    vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
    relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="relu",
)
MID = dict(
    vocab_size=512, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
)


def _reference(shape: dict, attn: str = "eager", seed: int = 0):
    """A seeded random T5EncoderModel with weights away from their init."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(**shape, dropout_rate=0.0, pad_token_id=0, eos_token_id=1)
    model = T5EncoderModel._from_config(config, attn_implementation=attn).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)  # in [0.5, 1.5)
            elif "relative_attention_bias" in name or "shared" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _checkpoint(model) -> dict[str, torch.Tensor]:
    """The reference's weights under MusicGen's checkpoint names."""
    return {"text_encoder." + k: v for k, v in model.state_dict().items()}


def _ours(model) -> T5Encoder:
    return T5Encoder.from_state_dict(model.config.to_dict(), _checkpoint(model))


def _inputs(vocab: int, lengths: list[int], width: int, seed: int = 1):
    """Random ids with rows padded after `lengths` (0 = an all-zero mask row)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
        ids[row, n:] = 0  # pad token
    return ids, mask


def _rel_error(ref_model, ours: T5Encoder, ids, mask) -> float:
    with torch.no_grad():
        want = ref_model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert not torch.isnan(want).any() and not torch.isnan(got).any()
    return float((got - want).abs().max() / want.abs().max())


CASES = {
    # two prompts of different lengths, plus an all-zero mask row (CFG's unconditional row)
    "padded": ([7, 4, 0], 7),
    # longer than relative_attention_max_distance: the log buckets and the clamp
    "long": ([300, 173], 300),
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [TINY, MID], ids=["tiny", "mid"])
def test_matches_transformers(shape, case, attn):
    ref = _reference(shape, attn)
    ours = _ours(ref)
    lengths, width = CASES[case]
    assert _rel_error(ref, ours, *_inputs(shape["vocab_size"], lengths, width)) <= 1e-5


@pytest.mark.parametrize("proj", ["gated-gelu", "gelu", "gated-silu"])
def test_other_feed_forwards(proj):
    ref = _reference({**MID, "num_layers": 2, "feed_forward_proj": proj})
    ours = _ours(ref)
    assert hasattr(ours.blocks[0], "wi_0") == proj.startswith("gated-")
    assert _rel_error(ref, ours, *_inputs(MID["vocab_size"], [9, 150, 0], 150)) <= 1e-5


def test_shares_the_given_tensors():
    ref = _reference(TINY)
    tensors = _checkpoint(ref)
    ours = T5Encoder.from_state_dict(ref.config.to_dict(), tensors)
    q = tensors["text_encoder.encoder.block.1.layer.0.SelfAttention.q.weight"]
    assert ours.blocks[1].q.weight.data_ptr() == q.data_ptr()
    embed = ours.get_input_embeddings()
    assert embed.weight.data_ptr() == tensors["text_encoder.shared.weight"].data_ptr()
    assert embed.num_embeddings == TINY["vocab_size"]
    # .parameters() covers every weight: callers drop their pages after each encode
    n_weights = sum(
        v.numel() for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"
    )
    assert sum(p.numel() for p in ours.parameters()) == n_weights
    assert {p.data_ptr() for p in ours.parameters()} <= {t.data_ptr() for t in tensors.values()}


def test_casts_half_weights_and_accepts_embed_tokens_alias():
    ref = _reference(TINY)
    tensors = {k: v.to(torch.bfloat16) for k, v in _checkpoint(ref).items()}
    tensors.pop("text_encoder.shared.weight")
    ours = T5Encoder.from_state_dict(ref.config.to_dict(), tensors)
    assert all(p.dtype == torch.float32 for p in ours.parameters())
    alias = tensors["text_encoder.encoder.embed_tokens.weight"].float()
    assert torch.equal(ours.get_input_embeddings().weight, alias)


def test_missing_or_misshapen_tensor_is_named():
    ref = _reference(TINY)
    config = ref.config.to_dict()
    tensors = _checkpoint(ref)
    key = "text_encoder.encoder.block.1.layer.1.DenseReluDense.wi.weight"
    del tensors[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r".*expected shape \(64, 32\)"):
        T5Encoder.from_state_dict(config, tensors)
    tensors = _checkpoint(ref)
    key = "text_encoder.encoder.final_layer_norm.weight"
    tensors[key] = torch.ones(33)
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + r".*\(33,\), expected \(32,\)"):
        T5Encoder.from_state_dict(config, tensors)
    with pytest.raises(ValueError, match="d_model"):
        T5Encoder.from_state_dict({"vocab_size": 256}, tensors)


def test_loads_a_musicgen_checkpoint(tiny_model_dir):
    """The names in a real MusicGen model.safetensors, against its own transformers encoder."""
    import json

    from safetensors.torch import load_file
    from transformers import MusicgenForConditionalGeneration

    hf = MusicgenForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    config = json.loads((Path(tiny_model_dir) / "config.json").read_text())["text_encoder"]
    ours = T5Encoder.from_state_dict(config, load_file(Path(tiny_model_dir) / "model.safetensors"))
    ids, mask = _inputs(ours.get_input_embeddings().num_embeddings, [5, 3, 0], 5)
    assert _rel_error(hf.text_encoder, ours, ids, mask) <= 1e-5


def test_import_does_not_load_transformers():
    out = subprocess.run(
        [sys.executable, "-c", "import sys, model.conditioning.t5; print('transformers' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "False"
