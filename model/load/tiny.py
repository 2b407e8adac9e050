"""Tiny random-weight MusicGen checkpoints in Hugging Face format.

No weights can be downloaded here, so every test loads one of these through the same
`from_pretrained` path a real checkpoint takes. Shapes are small but the structure is the
real one: T5 text encoder, 32 kHz EnCodec at 50 frames a second, delay-pattern decoder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from model.memory.user_cache import new_folder
from model.memory.user_cache import cache_dir

TINY_VOCAB = 64  # codebook entries; the pad/bos token is TINY_VOCAB
TINY_SEED = 1234
TINY_VERSION = 2  # bump when the tiny model's shapes or weights change: caches rebuild
TINY_TEXT_VOCAB = 256

_WORDS = (
    "a an and the with of in on for at by to from beat beats drum drums kick snare hat hats bass "
    "lead pad synth piano guitar acoustic electric strings orchestral violin cello brass horn "
    "choir vocal ambient lofi techno house trance jazz funk rock pop hip hop trap dub reggae "
    "soul blues folk classical cinematic epic dark bright warm cold soft hard slow fast calm "
    "happy sad chill groovy melody melodic rhythm rhythmic loop arpeggio chords chord minor major "
    "bpm tempo bar bars key note notes track stem mix reverb delay distortion chorus saturated "
    "vintage modern retro synthwave upbeat downtempo energetic dreamy"
).split()


def _build_tokenizer(out_dir: Path) -> None:
    """A WordPiece tokenizer with letters as a fallback, built offline, saved as tokenizer.json."""
    # tokenizers loads only where this runs
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast  # transformers loads only where this runs

    specials = ["<pad>", "</s>", "<unk>"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,-'!?")
    vocab_list = specials + chars + ["##" + c for c in chars] + _WORDS
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    assert len(vocab) <= TINY_TEXT_VOCAB, "the tiny T5's embedding must cover the tokenizer"
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", max_input_chars_per_word=64))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=512,
    )
    fast.save_pretrained(out_dir)


def tiny_configs(melody: bool = False, stereo: bool = False, width: int = 32):
    """Configs with the real structure at toy size (the decoder's vocab is TINY_VOCAB). A
    `width` of whole 64-blocks gives a decoder the C decode step runs (model/decode/layer_step.py)."""
    from transformers import EncodecConfig, T5Config  # transformers loads only where this runs

    text = T5Config(
        vocab_size=TINY_TEXT_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32,
        dropout_rate=0.0, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0,
    )
    codec = EncodecConfig(
        sampling_rate=32000, audio_channels=1, num_filters=4, num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4], codebook_size=TINY_VOCAB, codebook_dim=16, hidden_size=16,
        num_lstm_layers=1, kernel_size=7, last_kernel_size=7, residual_kernel_size=3,
        dilation_growth_rate=2, use_causal_conv=False, pad_mode="reflect", compress=2,
        trim_right_ratio=1.0, normalize=False, chunk_length_s=None, overlap=None,
        use_conv_shortcut=False, norm_type="weight_norm",
        # 4 codebooks x 6 bits x 50 Hz = 1.2 kbps
        target_bandwidths=[1.2],
    )
    n_codebooks = 8 if stereo else 4
    dec_kwargs = dict(
        vocab_size=TINY_VOCAB, max_position_embeddings=2048, num_hidden_layers=2, ffn_dim=2 * width,
        num_attention_heads=4, hidden_size=width, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, num_codebooks=n_codebooks, audio_channels=2 if stereo else 1,
        pad_token_id=TINY_VOCAB, bos_token_id=TINY_VOCAB, decoder_start_token_id=TINY_VOCAB,
    )
    return text, codec, dec_kwargs


def randomize_codebooks(codec) -> None:
    """Give an EnCodec's codebooks random entries at the scale of its encoder's output.

    A freshly initialised `transformers` EnCodec has all-zero codebooks, so every code would
    decode to the same audio and every take would encode to the same codes; entries at the
    encoder's scale (each residual level half the last) keep both directions informative.
    """
    with torch.no_grad():
        probe = torch.randn(1, codec.config.audio_channels, codec.config.sampling_rate // 2) * 0.3
        emb = codec.encoder(probe)[0]  # (dim, frames)
        mean, spread = emb.mean(dim=1), emb.std(dim=1).clamp(min=1e-6)
        for level, layer in enumerate(codec.quantizer.layers):
            cb = layer.codebook
            centre = mean if level == 0 else torch.zeros_like(mean)
            cb.embed.copy_(centre + torch.randn_like(cb.embed) * spread * 0.5**level)
            cb.embed_avg.copy_(cb.embed)
            cb.cluster_size.fill_(1.0)
            if hasattr(cb, "inited"):
                cb.inited.fill_(True)


def build_tiny_model(melody: bool = False, stereo: bool = False, width: int = 32):
    """Build the tiny model in memory with seeded random weights."""
    # transformers loads only where this runs
    from transformers import (
        MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
        MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration,
    )

    text, codec, dec_kwargs = tiny_configs(melody, stereo, width)
    # Random weights must not depend on the caller's RNG state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        if melody:
            decoder = MusicgenMelodyDecoderConfig(**dec_kwargs)
            config = MusicgenMelodyConfig(
                text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict(),
                num_chroma=12, chroma_length=235,
            )
            model = MusicgenMelodyForConditionalGeneration(config)
        else:
            decoder = MusicgenDecoderConfig(**dec_kwargs)
            config = MusicgenConfig(
                text_encoder=text.to_dict(), audio_encoder=codec.to_dict(), decoder=decoder.to_dict()
            )
            model = MusicgenForConditionalGeneration(config)
        randomize_codebooks(model.audio_encoder)
        # The default init gives near-uniform logits; wider weights make greedy decoding
        # take distinct paths, which the equivalence tests need to mean anything.
        with torch.no_grad():
            for name, p in model.decoder.named_parameters():
                if "layer_norm" not in name:
                    p.normal_(0.0, 0.3 if "lm_heads" in name else 0.15)
    gen = model.generation_config
    gen.do_sample = True
    gen.top_k = 50
    gen.guidance_scale = 3.0
    gen.max_length = 1500
    gen.pad_token_id = TINY_VOCAB
    gen.bos_token_id = TINY_VOCAB
    gen.decoder_start_token_id = TINY_VOCAB
    return model.eval()


def write_tiny_model(out_dir: str | os.PathLike, melody: bool = False, stereo: bool = False,
                     width: int = 32) -> Path:
    """Write the tiny checkpoint atomically: a half-written directory is never left under `out_dir`."""
    out = Path(out_dir)
    with new_folder(out, ".tiny-") as tmp:
        model = build_tiny_model(melody=melody, stereo=stereo, width=width)
        model.save_pretrained(tmp, safe_serialization=True)
        _build_tokenizer(tmp)
        (tmp / "musicbridge_tiny.json").write_text(
            json.dumps({"tiny": True, "melody": melody, "stereo": stereo, "seed": TINY_SEED,
                        "version": TINY_VERSION, **({"width": width} if width != 32 else {})}) + "\n"
        )
    return out


def cached_tiny_model(melody: bool = False, stereo: bool = False) -> Path:
    """The tiny checkpoint in the user cache, built on first use (`--model tiny`)."""

    base = cache_dir()
    name = "tiny" + ("-melody" if melody else "") + ("-stereo" if stereo else "")
    path = base / name
    if _tiny_version(path) != TINY_VERSION:
        if path.exists():
            shutil.rmtree(path)
        write_tiny_model(path, melody=melody, stereo=stereo)
    return path


def _tiny_version(path: Path) -> int | None:
    """The version a cached tiny checkpoint was written with (None: absent or unreadable)."""
    try:
        if not (path / "config.json").exists():
            return None
        return json.loads((path / "musicbridge_tiny.json").read_text()).get("version")
    except (OSError, ValueError):
        return None
