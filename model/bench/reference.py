"""The reference peer: `transformers`' own `generate`, driven with our request types.

The engine's tokens are checked against this in tests, and `musicbridge bench` times it
beside the engine in the same run.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from model.types import GenerationRequest


def frames_for_seconds(seconds: float, frame_rate: float) -> int:
    return max(1, int(round(seconds * frame_rate)))


def text_inputs(tokenizer, prompts: list[str], device) -> dict:
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    return {"input_ids": enc.input_ids.to(device), "attention_mask": enc.attention_mask.to(device)}


def melody_features(requests: list[GenerationRequest], device, dtype) -> torch.Tensor:
    """Stack chroma into (batch, frames, 12), padding with zeros ('no melody')."""
    n = max(r.melody.shape[0] if r.melody is not None else 1 for r in requests)
    out = torch.zeros(len(requests), n, 12, dtype=dtype, device=device)
    for i, r in enumerate(requests):
        if r.melody is not None:
            out[i, : r.melody.shape[0]] = torch.from_numpy(r.melody)
    return out


@torch.inference_mode()
def reference_generate_tokens(model, tokenizer, requests: list[GenerationRequest]) -> tuple[np.ndarray, np.ndarray]:
    """Codes (batch, codebooks, frames) and audio (batch, channels, samples) from `model.decode.loop`.

    All requests share length and sampling params (transformers' generate takes one set).
    """
    p = requests[0].params
    frame_rate = model.config.audio_encoder.frame_rate
    n_frames = frames_for_seconds(requests[0].seconds, frame_rate)
    n_codebooks = model.decoder.num_codebooks
    k = n_codebooks // model.decoder.config.audio_channels
    device = next(model.parameters()).device
    kwargs = text_inputs(tokenizer, [r.prompt for r in requests], device)
    if getattr(model.config, "num_chroma", None):
        kwargs["input_features"] = melody_features(requests, device, model.dtype)
    if p.seed is not None:
        torch.manual_seed(p.seed)
    collector = _TokenCollector()
    audio = model.generate(
        **kwargs,
        stopping_criteria=StoppingCriteriaList([collector]),
        max_new_tokens=n_frames + k - 1,
        do_sample=not p.greedy,
        guidance_scale=p.guidance if p.guidance != 1.0 else None,
        temperature=p.temperature if not p.greedy else None,
        top_k=p.top_k if not p.greedy else None,
        top_p=p.top_p if (p.top_p > 0 and not p.greedy) else None,
    )
    # generate() returns audio only; the recorder saw every token in the delayed layout.
    seqs = collector.last.reshape(len(requests), n_codebooks, -1)
    codes = np.empty((len(requests), n_codebooks, n_frames), dtype=np.int64)
    for cb in range(n_codebooks):
        d = cb // model.decoder.config.audio_channels
        codes[:, cb] = seqs[:, cb, 1 + d : 1 + d + n_frames].cpu().numpy()
    return codes, audio.float().cpu().numpy()


class _TokenCollector(StoppingCriteria):
    """Never stops anything: it keeps the ids `generate` has so far, after every step.

    (MusicGen's `generate` in transformers 5 does not forward its `streamer` to the loop.)
    """

    last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        self.last = input_ids.detach().clone()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
