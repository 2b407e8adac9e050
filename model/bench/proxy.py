"""A trained quantisation proxy: a small MusicGen-shaped decoder whose logits are peaked.

Random weights give flat logits, so they overstate what quantisation does to a trained
model: no learnt margin between the best token and the rest absorbs the error. This proxy is
MusicGen's structure at small size (T5 text encoder, cross-attention, 4 codebooks of 2048
entries, delay pattern) trained here for a few hundred steps on structured token data, so
its next-token distributions are peaked, as a real checkpoint's are.

The data (`structured_codes`) stands in for EnCodec codes of music: each codebook uses 256 of
its 2048 codes, and each code is followed by its usual successor (a fixed permutation per
codebook) nine times in ten and by a random code otherwise, so a trained model's next-token
distribution puts most of its mass on one token, as a real checkpoint's often does; the text
prompt names one of four styles, and each style starts its clips in its own region of the
codes. Everything is seeded: the same flags train the same weights.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.conditioning.prepare import encode_text
from model.decode.decoder import MusicgenDecoderLM
from model.decode.patterns import get_pattern
from model.load.tiny import _build_tokenizer, randomize_codebooks, tiny_configs

log = logging.getLogger(__name__)

STYLES = ("lofi piano", "techno drums", "ambient pad", "funk bass")
VOCAB = 2048
K = 4
ACTIVE = 256  # codes a codebook uses in the data
LR = 5e-3


def build_proxy_model():
    """(hf model, tokenizer): tiny T5 and codec, a 256-wide 4-layer decoder, 4 x 2048 codebooks."""

    # transformers loads only where this runs
    from transformers import AutoTokenizer, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration

    text, codec, _ = tiny_configs()
    codec.codebook_size = VOCAB
    dec = MusicgenDecoderConfig(vocab_size=VOCAB, max_position_embeddings=512, num_hidden_layers=4,
                                ffn_dim=1024, num_attention_heads=4, hidden_size=256, num_codebooks=K,
                                dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                pad_token_id=VOCAB, bos_token_id=VOCAB, decoder_start_token_id=VOCAB)
    config = MusicgenConfig(text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=dec.to_dict())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MusicgenForConditionalGeneration(config).eval()
        randomize_codebooks(model.audio_encoder)
    tok_dir = Path(tempfile.mkdtemp(prefix="musicbridge-proxy-tok-"))
    _build_tokenizer(tok_dir)
    return model, AutoTokenizer.from_pretrained(tok_dir)


def structured_codes(rng: np.random.Generator, n: int, frames: int) -> tuple[np.ndarray, list[str]]:
    """(n, K, frames) codes and their style prompts (see the module docstring)."""
    fixed = np.random.default_rng(1234)  # the code book of the data itself is fixed
    active = fixed.choice(VOCAB, size=(K, ACTIVE), replace=False)  # codes each codebook uses
    succ = np.stack([fixed.permutation(ACTIVE) for _ in range(K)])  # each code's usual successor
    codes = np.zeros((n, K, frames), np.int64)
    prompts = []
    for i in range(n):
        s = int(rng.integers(len(STYLES)))
        prompts.append(STYLES[s])
        for k in range(K):
            j = np.empty(frames, np.int64)
            j[0] = (s * ACTIVE // len(STYLES) + int(rng.integers(ACTIVE // len(STYLES)))) % ACTIVE
            jump = rng.random(frames) < 0.1
            for t in range(1, frames):
                j[t] = int(rng.integers(ACTIVE)) if jump[t] else succ[k, j[t - 1]]
            codes[i, k] = active[k, j]
    return codes, prompts


def delayed_batch(codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (B, K, S) with BOS first, targets (B, K, S) with -100 where the pattern pads."""
    pattern = get_pattern("delay", K)
    seqs = np.stack([pattern.build(c, VOCAB) for c in codes])  # (B, K, S)
    inp = np.concatenate([np.full(seqs.shape[:2] + (1,), VOCAB), seqs[:, :, :-1]], axis=2)
    tgt = np.where(seqs == VOCAB, -100, seqs)
    return torch.from_numpy(inp), torch.from_numpy(tgt)


def train_proxy(steps: int = 300, batch: int = 8, frames: int = 48, seed: int = 0, log_fn=log.info):
    """Train `build_proxy_model()`'s decoder; return (hf model, tokenizer, final loss)."""

    torch.manual_seed(seed)
    model, tokenizer = build_proxy_model()
    lm = MusicgenDecoderLM.from_hf(model)  # shares (and so trains) the checkpoint's tensors
    lm.train().requires_grad_(True)
    with torch.no_grad():
        # The default init (std 0.02) leaves the tokens far quieter than the sinusoidal
        # positions; at unit scale a few hundred steps are enough to learn the structure.
        lm.embed.weight.normal_(0.0, 1.0)
    with torch.inference_mode():
        states, mask = encode_text(model, tokenizer, list(STYLES), "cpu")
    states, mask = states.clone(), mask.clone()
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(steps):
        codes, prompts = structured_codes(rng, batch, frames)
        inp, tgt = delayed_batch(codes)
        rows = torch.tensor([STYLES.index(p) for p in prompts])
        cross = lm.cross_kv(states[rows], mask[rows])
        cache = _TrainingCache()
        logits = lm(inp, 0, cache, cross)  # (B, K, S, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = LR * min(1.0, 2.0 * (1 - step / steps))
        loss_v = float(loss)
        if step % 50 == 0 or step == steps - 1:
            log_fn(f"proxy training step {step + 1}/{steps}: loss {loss_v:.3f} "
                   f"({time.perf_counter() - t0:.0f} s)")
    lm.eval().requires_grad_(False)
    model.requires_grad_(False)
    return model, tokenizer, loss_v


class _TrainingCache:
    """A KV cache for one full-sequence pass with autograd: each layer's keys and values kept as
    they come. The inference cache writes every layer into one tensor in place, which autograd
    cannot differentiate through; a teacher-forced pass from position 0 needs no cache at all,
    only the layer's own keys back."""

    quantized = False

    def __init__(self):
        self.by_layer: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.by_layer[layer] = (k, v)

    def read(self, layer: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.by_layer[layer]
