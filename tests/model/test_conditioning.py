"""Text conditioning (model/conditioning/prepare.py): a prompt's states do not depend on its batch."""

from __future__ import annotations

import torch

from model.conditioning.prepare import encode_text


@torch.inference_mode()
def test_a_prompts_text_states_are_the_same_alone_and_in_any_batch(tiny_engine):
    """Encoded as one batch, a prompt's T5 states moved in their last bits with the batch's size and
    padding, enough to change a take's tokens between --variations and a single generation."""
    hf, tok = tiny_engine.hf, tiny_engine.tokenizer
    alone, alone_mask = encode_text(hf, tok, ["lofi drums"], "cpu")
    n = alone.shape[1]
    for batch in (["lofi drums"] * 3, ["lofi drums", "a much longer prompt with many more words in it"],
                  ["x", "lofi drums", "lofi drums"]):
        states, mask = encode_text(hf, tok, batch, "cpu")
        assert states.shape[0] == mask.shape[0] == len(batch)
        for i, prompt in enumerate(batch):
            if prompt != "lofi drums":
                continue
            assert torch.equal(states[i, :n], alone[0]), f"row {i} of {batch} differs from the prompt alone"
            assert torch.equal(mask[i, :n], alone_mask[0]) and not mask[i, n:].any()
            assert not states[i, n:].any()  # padding is zeros


def test_an_unknown_token_id_is_a_request_error_naming_the_mismatch(tiny_engine):
    import pytest

    from model.types import RequestError

    vocab = tiny_engine.hf.text_encoder.get_input_embeddings().num_embeddings
    tok = tiny_engine.tokenizer

    def too_big(prompts, return_tensors="pt", **kw):
        out = tok(prompts, return_tensors=return_tensors, **kw)
        out.input_ids = torch.full_like(out.input_ids, vocab)
        return out

    with pytest.raises(RequestError, match="does not match its model"):
        encode_text(tiny_engine.hf, too_big, ["lofi"], "cpu")


@torch.inference_mode()
def test_a_prompts_cross_keys_and_folded_values_are_the_same_beside_a_longer_prompt(tiny_engine):
    """Padding a prompt to a longer prompt's width must not change what its cross-attention reads:
    its keys and values are projected over its own tokens (model.decode.decoder.cross_kv; float32's
    matmul blocked differently for 3 and 7 rows), and so are the folded keys and values
    (model/decode/cross_fold.py). (Its tokens beside a longer prompt were checked equal on
    musicgen-small's shapes, where the C step runs: docs/engine.md.)"""
    from model.decode import cross_fold
    from model.conditioning.prepare import build_conditioning

    lm = tiny_engine.lm
    # 3 and 7 tokens: both under the tiny model's head width (8), so both batches fold (a prompt
    # past it turns folding off for the whole batch: docs/engine.md)
    prompts = ["lofi drums", "a jazz trio"]
    crosses = []
    for batch in (prompts[:1], prompts):
        cond = build_conditioning(tiny_engine.hf, tiny_engine.tokenizer, batch, None, True, "cpu", torch.float32)
        crosses.append(lm.cross_kv(cond.states, cond.mask))
    alone, batched = crosses
    n = alone.k.shape[3]
    assert batched.k.shape[3] > n
    assert torch.equal(batched.k[:, 0, :, :n], alone.k[:, 0]) and torch.equal(batched.v[:, 0, :, :n], alone.v[:, 0])
    assert not batched.k[:, 0, :, n:].any() and not batched.v[:, 0, :, n:].any()
    fa, fb = (cross_fold.fold(lm.layers, c, torch.float32) for c in (alone, batched))
    assert fa is not None and fb is not None
    assert torch.equal(fb.m[:, 0, :, :n], fa.m[:, 0]) and torch.equal(fb.u[:, 0, :, :n], fa.u[:, 0])
