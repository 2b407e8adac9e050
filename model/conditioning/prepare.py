"""Text and melody conditioning, computed once per request batch.

Classifier-free guidance runs as one batch: rows [conditional..., unconditional...]. The
unconditional text is all-zero states with an all-zero mask, and the unconditional melody is
the "no melody" chroma (bin 0 set), both as in `transformers`' MusicGen generate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from model.memory.pages import drop_pages
from model.types import RequestError


@dataclass
class Conditioning:
    """What the decoder reads: cross-attention states (text models) or a prefix (melody models)."""

    states: torch.Tensor  # (rows, len, d_model)
    mask: torch.Tensor  # (rows, len) 1 = real token
    is_prefix: bool


@torch.inference_mode()
def encode_text(hf_model, tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 states projected to the decoder width and zeroed at padding, with their mask.

    Each distinct prompt is encoded alone, then padded into the batch: run as one batch, a
    prompt's states moved in their last bits with the batch's size and padding (matrix products
    block differently for different row counts), which was enough to change a take's tokens
    between `--variations 2` and a single generation with the same seed (musicgen-small).
    """
    vocab = hf_model.text_encoder.get_input_embeddings().num_embeddings
    alone: dict[str, torch.Tensor] = {}
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer([prompt], return_tensors="pt").input_ids.to(device)
        if ids.numel() and int(ids.max()) >= vocab:
            raise RequestError(
                f"the tokenizer produced token id {int(ids.max())} but the text encoder knows {vocab}: "
                "the checkpoint's tokenizer does not match its model"
            )
        out = hf_model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
        states = getattr(out, "last_hidden_state", out)  # transformers' T5 or ours (model/conditioning/t5.py)
        if getattr(hf_model, "enc_to_dec_proj", None) is not None:
            states = hf_model.enc_to_dec_proj(states)
        alone[prompt] = states[0]
    # The text encoder runs once per distinct prompt of a request and reads every weight; its pages
    # of the mapped checkpoint go back to the page cache until the next request (measured: no slower, and
    # about 0.3-0.4 GB less resident memory for musicgen-small while decoding; model/memory/pages.py).
    drop_pages(list(hf_model.text_encoder.parameters()))
    width = max(t.shape[0] for t in alone.values())
    first = next(iter(alone.values()))
    states = torch.zeros(len(prompts), width, first.shape[1], dtype=first.dtype, device=first.device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=first.device)
    for i, prompt in enumerate(prompts):
        n = alone[prompt].shape[0]
        states[i, :n] = alone[prompt]
        mask[i, :n] = 1
    return states, mask


def _melody_states(hf_model, chroma: torch.Tensor) -> torch.Tensor:
    """Project chroma (rows, frames, 12) and tile/truncate it to the model's chroma length."""
    length = hf_model.config.chroma_length
    h = hf_model.audio_enc_to_dec_proj(chroma) if hasattr(hf_model, "audio_enc_to_dec_proj") else chroma
    if h.shape[1] < length:
        h = h.repeat(1, int(math.ceil(length / h.shape[1])), 1)
    return h[:, :length]


@torch.inference_mode()
def build_conditioning(
    hf_model, tokenizer, prompts: list[str], melodies: list[np.ndarray | None] | None,
    guidance: bool, device, dtype,
) -> Conditioning:
    text, mask = encode_text(hf_model, tokenizer, prompts, device)
    if guidance:
        text = torch.cat([text, torch.zeros_like(text)])
        mask = torch.cat([mask, torch.zeros_like(mask)])
    is_melody = bool(getattr(hf_model.config, "num_chroma", 0))
    if not is_melody:
        return Conditioning(text.to(dtype), mask, is_prefix=False)
    n = len(prompts)
    null = torch.zeros(1, 1, 12, device=device)
    null[..., 0] = 1.0
    rows = []
    for m in melodies or [None] * n:
        c = null if m is None else torch.from_numpy(np.asarray(m, np.float32)).to(device)[None]
        rows.append(_melody_states(hf_model, c))
    if guidance:
        rows += [_melody_states(hf_model, null)] * n
    melody = torch.cat(rows)
    # transformers' melody generate feeds the whole prefix unmasked (padding rows are zeros).
    prefix = torch.cat([melody, text], dim=1)
    return Conditioning(prefix.to(dtype), torch.ones(prefix.shape[:2], device=device), is_prefix=True)
