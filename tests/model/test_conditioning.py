"""Text conditioning (model/conditioning.py): a prompt's states do not depend on its batch."""

from __future__ import annotations

import torch

from model.conditioning import encode_text


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
