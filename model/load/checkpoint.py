"""A MusicGen text checkpoint read without importing `transformers`.

Why: importing `transformers`' MusicGen pulls in torch._dynamo and torch.distributed.tensor,
2.5-3.3 s of every `musicbridge generate` (measured on an Intel Xeon, 2 cores; a 6 s clip takes
about 15 s in all). Everything the engine runs is ours already except the text encoder and the
codec's decoder, so those are ours too (model/conditioning/t5.py, model/codec/encodec.py) and the checkpoint is
read here: its config.json, its safetensors (memory-mapped, no copy) and its tokenizer.json (the
`tokenizers` library, which `transformers`' fast tokenizers wrap).

What this covers: text-conditioned MusicGen checkpoints in safetensors with a tokenizer.json
(every facebook/musicgen* text model). Melody checkpoints, older .bin files, configurations the
ours do not implement, and MUSICBRIDGE_LOADER=transformers load through `transformers`
(model.load.resolve.load_hf_model), as do the tests' reference models. Encoding audio (continuation
prompts) builds `transformers`' EnCodec from the same tensors the first time it is asked for.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from model.memory import placeholders
from model.types import CheckpointError
from model.memory.pages import file_map
from model.settings import current as settings
from model.codec.encodec import EncodecDecoder
from model.codec.encodec import EncodecDecoderConfig
from model.conditioning.t5 import T5Encoder

log = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

# transformers' MusicgenDecoderConfig defaults, for fields a config.json may leave out.
_DECODER_DEFAULTS = dict(
    vocab_size=2048, max_position_embeddings=2048, num_hidden_layers=24, ffn_dim=4096,
    num_attention_heads=16, hidden_size=1024, activation_function="gelu", scale_embedding=False,
    num_codebooks=4, audio_channels=1, pad_token_id=2048, bos_token_id=2048,
)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one .safetensors file, as views of a private memory map (no copy: pages
    come from the page cache when first read, and `model.memory.pages.drop_pages` can give them back)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header size)")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header size {n} of a {size}-byte file)")
            header = json.loads(f.read(n))
            if not isinstance(header, dict):
                raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
            # Copy-on-write: writable for torch.frombuffer, shared with the page cache until written.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    except (OSError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: cannot read as safetensors: {e}") from e
    base = 8 + n
    out: dict[str, torch.Tensor] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            kind = meta["dtype"]
            lo, hi = meta["data_offsets"]
            shape = list(meta["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({e})") from e
        if kind not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {kind!r}; supported: {', '.join(_DTYPES)}")
        dtype = _DTYPES[kind]
        if not all(type(v) is int and v >= 0 for v in (lo, hi, *shape)) or lo > hi:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry "
                                  f"(offsets {lo}, {hi} and shape {shape} must be whole numbers, 0 or more)")
        count = math.prod(shape)
        if hi - lo != count * dtype.itemsize or base + hi > size:
            raise CheckpointError(f"{path}: tensor {name!r} ({meta['dtype']} {shape}) does not fit its byte range")
        t = torch.frombuffer(mm, dtype=dtype, count=count, offset=base + lo) if count else torch.empty(0, dtype=dtype)
        out[name] = t.view(shape)
    if mm is not None:
        file_map(mm)
    return out


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read its weight_map ({e})") from e
        return [folder / s for s in shards]
    return []


def unsupported(folder: Path) -> str | None:
    """Why this folder is not for the reader here (None where it is); the engine then loads it
    through `transformers`."""
    if settings().loader == "transformers":
        return "MUSICBRIDGE_LOADER=transformers"
    if not checkpoint_files(folder):
        return "no model.safetensors"
    if not (folder / "tokenizer.json").exists():
        return "no tokenizer.json"
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return "config.json unreadable"
    if cfg.get("model_type") != "musicgen":
        return f"model_type {cfg.get('model_type')!r}"
    dec = {**_DECODER_DEFAULTS, **cfg.get("decoder", {})}
    if dec["scale_embedding"] or dec["activation_function"] != "gelu":
        return "decoder options the engine's reader does not implement"
    if cfg.get("text_encoder", {}).get("model_type") != "t5" or cfg.get("audio_encoder", {}).get("model_type") != "encodec":
        return "text encoder or codec of another kind"

    try:
        EncodecDecoderConfig(cfg["audio_encoder"]).check_supported()
    except ValueError as e:
        return str(e)
    return None


class TextTokenizer:
    """tokenizer.json through the `tokenizers` library, called as `transformers`' tokenizers are:
    `tok(prompts, return_tensors="pt", padding=True)` -> .input_ids, .attention_mask (right-padded)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer  # tokenizers loads only where this runs

        try:
            self._tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception for a broken file
            raise CheckpointError(f"{folder / 'tokenizer.json'}: cannot read as a tokenizer ({e})") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        pad = "<pad>"
        try:
            conf = json.loads((folder / "tokenizer_config.json").read_text())
            p = conf.get("pad_token", pad)
            pad = p.get("content", pad) if isinstance(p, dict) else (p or pad)
        except (OSError, ValueError):
            pass
        pid = self._tok.token_to_id(pad)
        self.pad_token_id = 0 if pid is None else pid

    def __call__(self, prompts: list[str], return_tensors: str = "pt", padding: bool = True) -> SimpleNamespace:
        encs = self._tok.encode_batch(list(prompts))
        width = max((len(e.ids) for e in encs), default=0)
        ids = torch.full((len(encs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for i, e in enumerate(encs):
            ids[i, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            mask[i, : len(e.ids)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


@dataclass
class Checkpoint:
    """What the engine reads of a MusicGen checkpoint, in the attribute names of `transformers`'
    model (`config.decoder`, `config.audio_encoder`, `text_encoder`, `enc_to_dec_proj`,
    `audio_encoder`), so conditioning and the codec code serve both loaders.

    The tensors are views of the file's map and are never written: the engine hands their pages
    back to the page cache (`model.memory.pages.drop_pages`), which would also undo a write."""

    path: Path
    config: SimpleNamespace
    tensors: dict[str, torch.Tensor]
    text_encoder: nn.Module
    enc_to_dec_proj: nn.Module | None
    audio_encoder: nn.Module
    raw_config: dict
    _full_codec: nn.Module | None = None

    @classmethod
    def load(cls, folder: str | Path) -> Checkpoint:
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        tensors: dict[str, torch.Tensor] = {}
        for f in checkpoint_files(folder):
            tensors.update(read_safetensors(f))
        text = T5Encoder.from_state_dict(cfg["text_encoder"], tensors).eval()
        codec = EncodecDecoder.from_state_dict(cfg["audio_encoder"], tensors).eval()
        proj = None
        if "enc_to_dec_proj.weight" in tensors:
            w = tensors["enc_to_dec_proj.weight"].float()
            proj = placeholders.linear(w.shape[1], w.shape[0], bias="enc_to_dec_proj.bias" in tensors)
            proj.weight = nn.Parameter(w, requires_grad=False)
            if proj.bias is not None:
                proj.bias = nn.Parameter(tensors["enc_to_dec_proj.bias"].float(), requires_grad=False)
        dec = SimpleNamespace(**{**_DECODER_DEFAULTS, **cfg.get("decoder", {})})
        config = SimpleNamespace(decoder=dec, audio_encoder=codec.config)
        return cls(folder, config, tensors, text, proj, codec, cfg)

    def decoder_tensors(self) -> dict[str, torch.Tensor]:
        """The decoder's tensors by their names under `decoder.` (transformers' MusicgenForCausalLM)."""
        p = "decoder."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def full_codec(self) -> nn.Module:
        """`transformers`' EnCodec (encoder included) over this checkpoint's tensors, built the
        first time audio is encoded (a continuation prompt); the import costs seconds, once."""
        if self._full_codec is None:
            from transformers import EncodecConfig, EncodecModel  # transformers loads only where this runs

            model = EncodecModel(EncodecConfig(**self.raw_config["audio_encoder"])).eval()
            want = model.state_dict()
            state = {}
            for k, v in self.tensors.items():
                if not k.startswith("audio_encoder."):
                    continue
                k = k[len("audio_encoder."):]
                k = k.replace(".weight_g", ".parametrizations.weight.original0").replace(
                    ".weight_v", ".parametrizations.weight.original1")
                if k in want:
                    state[k] = v
            missing = sorted(set(want) - set(state))
            if missing:
                raise CheckpointError(f"{self.path}: the codec's tensors lack {', '.join(missing[:3])}")
            model.load_state_dict(state)
            self._full_codec = model
        return self._full_codec
