"""EnCodec decoder (codes -> audio) for MusicGen checkpoints, without `transformers`.

Why: importing `transformers` costs about 3 s of a 15 s `musicbridge generate`, and decoding
is all generation needs from the codec. This reproduces `transformers`' `EncodecModel.decode`
(same ops in the same order, so the audio matches to float rounding) from the tensors of a
MusicGen `model.safetensors` and the `audio_encoder` section of its config.json. It offers the
surface model/codec/codes.py uses: `decode(codes, scales).audio_values`, `.device`, `.config`.
Encoding stays with `transformers`, loaded lazily where needed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# `transformers`' EncodecConfig defaults, for fields a config.json may leave out.
_DEFAULTS: dict[str, object] = dict(
    target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0], sampling_rate=24_000, audio_channels=1,
    normalize=False, chunk_length_s=None, overlap=None, hidden_size=128, num_filters=32,
    num_residual_layers=1, upsampling_ratios=[8, 5, 4, 2], norm_type="weight_norm",
    kernel_size=7, last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2,
    use_causal_conv=True, pad_mode="reflect", compress=2, num_lstm_layers=2,
    trim_right_ratio=1.0, codebook_size=1024, codebook_dim=None, use_conv_shortcut=True,
)
_PAD_MODES = ("reflect", "constant", "replicate")


class EncodecDecoderConfig:
    """The codec config's fields as attributes, plus the derived values `transformers` defines."""

    def __init__(self, config: Mapping[str, object]):
        for name, default in _DEFAULTS.items():
            setattr(self, name, config.get(name, default))
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size
        self.upsampling_ratios = [int(r) for r in self.upsampling_ratios]
        self.target_bandwidths = list(self.target_bandwidths)

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def codebook_nbits(self) -> int:
        return math.ceil(math.log2(self.codebook_size))

    @property
    def num_quantizers(self) -> int:
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * self.codebook_nbits))

    def to_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in _DEFAULTS}

    def check_supported(self) -> None:
        """Raise ValueError for configurations this decoder does not reproduce."""

        def bad(field: str, why: str) -> ValueError:
            return ValueError(f"EnCodec config {field}={getattr(self, field)!r} is not supported: {why}")

        if self.norm_type != "weight_norm":
            raise bad("norm_type", "only 'weight_norm' is")
        if self.pad_mode not in _PAD_MODES:
            raise bad("pad_mode", f"expected one of {_PAD_MODES}")
        if self.chunk_length_s is not None:
            raise bad("chunk_length_s", "chunked overlap-add decoding is not implemented")
        if not self.use_causal_conv and self.trim_right_ratio != 1.0:
            raise bad("trim_right_ratio", "!= 1.0 only makes sense for causal convolutions")
        if self.num_quantizers < 1:
            raise bad("target_bandwidths", "gives no codebooks")


@dataclass
class EncodecDecodeOutput:
    audio_values: torch.Tensor  # (batch, audio_channels, samples)


class _Tensors:
    """Looks up checkpoint tensors under a prefix; a missing one is a ValueError naming it."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def get(self, name: str) -> torch.Tensor:
        key = self.prefix + name
        if key not in self.tensors:
            raise ValueError(f"EnCodec checkpoint is missing tensor {key!r}")
        return self.tensors[key].detach().to(torch.float32)

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def conv_weight(self, name: str) -> torch.Tensor:
        """The effective weight of a weight-normed conv `name` (new or old key names)."""
        if self.has(f"{name}.parametrizations.weight.original0"):
            g = self.get(f"{name}.parametrizations.weight.original0")
            v = self.get(f"{name}.parametrizations.weight.original1")
        elif self.has(f"{name}.weight_g"):
            g, v = self.get(f"{name}.weight_g"), self.get(f"{name}.weight_v")
        else:
            raise ValueError(f"EnCodec checkpoint is missing tensor "
                             f"{self.prefix + name + '.parametrizations.weight.original0'!r} "
                             f"(or the older {self.prefix + name + '.weight_g'!r})")
        if g.dim() == 0:
            return v * (g / v.norm())
        dims = [d for d in range(v.dim())
                if g.shape[d] == v.shape[d] and all(g.shape[e] == 1 for e in range(g.dim()) if e != d)]
        if g.dim() != v.dim() or not dims:
            raise ValueError(f"weight-norm shapes of {self.prefix}{name} do not match: "
                             f"g {tuple(g.shape)}, v {tuple(v.shape)}")
        # The op torch's weight_norm itself evaluates, so the weight is the same to the bit.
        return torch._weight_norm(v, g, dims[0])


class _Conv(nn.Module):
    """EncodecConv1d: padded so the output has ceil(length / stride) frames."""

    def __init__(self, t: _Tensors, name: str, cfg: EncodecDecoderConfig, dilation: int = 1):
        super().__init__()
        self.register_buffer("weight", t.conv_weight(name))
        self.register_buffer("bias", t.get(f"{name}.bias"))
        self.stride, self.dilation = 1, dilation
        self.kernel = (self.weight.shape[-1] - 1) * dilation + 1  # effective, with dilation
        self.causal, self.pad_mode = cfg.use_causal_conv, cfg.pad_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length, s = x.shape[-1], self.stride
        padding_total = self.kernel - s
        n_frames = -(-(length - s) // s)  # ceil((length - kernel + padding_total) / stride)
        extra = n_frames * s + self.kernel - padding_total - length
        if self.causal:
            left, right = padding_total, extra
        else:
            right = padding_total // 2
            left, right = padding_total - right, right + extra
        return F.conv1d(_pad(x, left, right, self.pad_mode), self.weight, self.bias,
                        stride=s, dilation=self.dilation)

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The input samples [lo', hi') that outputs [lo, hi) read (stride 1, as in the decoder).

        Reflect padding makes the first `left` outputs read x[1..left] too, to their right: a
        causal conv's whole reach there (its right pad is 0)."""
        right = 0 if self.causal else (self.kernel - 1) // 2
        left = self.kernel - 1 - right
        if self.pad_mode == "reflect" and lo < left:  # output o < left reads x[left - o] by reflection
            return lo - left, max(hi + right, left - max(lo, 0) + 1)
        return lo - left, hi + right


def _pad(x: torch.Tensor, left: int, right: int, mode: str) -> torch.Tensor:
    """F.pad, but reflect padding of an input no longer than the pad first appends zeros
    (and drops them after), as `transformers` does, so short inputs decode identically."""
    if mode != "reflect":
        return F.pad(x, (left, right), mode)
    length, extra = x.shape[-1], 0
    if length <= max(left, right):
        extra = max(left, right) - length + 1
        x = F.pad(x, (0, extra))
    padded = F.pad(x, (left, right), mode)
    return padded[..., : padded.shape[-1] - extra]


def polyphase_weight(weight: torch.Tensor, stride: int) -> torch.Tensor:
    """A transposed convolution's weight (in, out, kernel), kernel a multiple of `stride`, as
    an ordinary convolution's (stride * out, in, kernel / stride): output channel p * out + o
    holds output phase p of channel o, its taps p, p + stride, ... in time order reversed."""
    c_in, c_out, k = weight.shape
    taps = k // stride
    poly = weight.view(c_in, c_out, taps, stride).permute(3, 1, 0, 2).flip(-1)
    return poly.reshape(stride * c_out, c_in, taps).contiguous()


def polyphase_transposed(x: torch.Tensor, poly: torch.Tensor, bias: torch.Tensor | None, stride: int) -> torch.Tensor:
    """`F.conv_transpose1d(x, weight, bias, stride)` from `polyphase_weight(weight, stride)`:
    x (B, in, T) -> (B, out, (T + taps - 1) * stride)."""
    taps = poly.shape[-1]
    y = F.conv1d(F.pad(x, (taps - 1, taps - 1)), poly)  # (B, stride * out, T + taps - 1)
    b, _, n = y.shape
    y = y.view(b, stride, -1, n).permute(0, 2, 3, 1).reshape(b, -1, n * stride)
    return y if bias is None else y + bias[:, None]


class _ConvTranspose(nn.Module):
    """EncodecConvTranspose1d: upsample by `stride`, then trim kernel - stride samples."""

    def __init__(self, t: _Tensors, name: str, cfg: EncodecDecoderConfig, stride: int):
        super().__init__()
        weight = t.conv_weight(name)  # (in, out, kernel)
        self.register_buffer("bias", t.get(f"{name}.bias"))
        self.stride = stride
        self.kernel = weight.shape[-1]
        padding_total = self.kernel - stride
        if cfg.use_causal_conv:
            self.right = math.ceil(padding_total * cfg.trim_right_ratio)
        else:
            self.right = padding_total // 2
        self.left = padding_total - self.right
        # Polyphase: output phase p of each input frame is an ordinary convolution over the
        # input with taps p, p + stride, ... of the kernel, so all phases are one conv1d with
        # stride * out channels, interleaved after. oneDNN ran it 1.4-2.2x faster than its
        # transposed convolution for the first three of musicgen-small's four stages (and the
        # same for the last), the same sums in another order (within 1e-6 of the peak).
        self.polyphase = self.kernel % stride == 0
        self.register_buffer("weight", polyphase_weight(weight, stride) if self.polyphase else weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.polyphase:
            y = polyphase_transposed(x, self.weight, self.bias, self.stride)
        else:
            y = F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride)
        return y[..., self.left : y.shape[-1] - self.right]

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        """The input frames that outputs [lo, hi) read: frame n reaches untrimmed outputs
        n * stride .. n * stride + kernel - 1."""
        k, s = self.kernel, self.stride
        return (lo + self.left - k) // s + 1, (hi - 1 + self.left) // s + 1


class _LSTM(nn.Module):
    """EncodecLSTM: an LSTM over time with a skip connection, in conv layout (B, C, T)."""

    def __init__(self, t: _Tensors, name: str, dim: int, num_layers: int):
        super().__init__()
        with torch.device("meta"):  # no random init (0.1 s for musicgen-small's): the file's weights replace it
            self.lstm = nn.LSTM(dim, dim, num_layers)
        names = [f"{kind}_l{n}" for n in range(num_layers)
                 for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        self.lstm.load_state_dict({k: t.get(f"{name}.{k}") for k in names}, assign=True)
        self.lstm.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(2, 0, 1)
        return (self.lstm(x)[0] + x).permute(1, 2, 0)


class _ResBlock(nn.Module):
    """SEANet residual block: ELU, conv (k, dilation), ELU, conv (1), plus the shortcut."""

    def __init__(self, t: _Tensors, name: str, cfg: EncodecDecoderConfig, dilation: int):
        super().__init__()
        self.conv1 = _Conv(t, f"{name}.block.1.conv", cfg, dilation=dilation)
        self.conv2 = _Conv(t, f"{name}.block.3.conv", cfg)
        self.shortcut = _Conv(t, f"{name}.shortcut.conv", cfg) if cfg.use_conv_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.elu(self.conv1(F.elu(x))))
        return (x if self.shortcut is None else self.shortcut(x)) + y

    def span(self, lo: int, hi: int) -> tuple[int, int]:
        a, b = self.conv1.span(*self.conv2.span(lo, hi))
        if self.shortcut is not None:
            c, d = self.shortcut.span(lo, hi)
            return min(a, c), max(b, d)
        return min(a, lo), max(b, hi)


class EncodecDecoder(nn.Module):
    """MusicGen's EnCodec decode path: residual-VQ codebooks, then the SEANet decoder."""

    tile_samples = 20480  # output samples per tile of `upsample` (measured: BENCHMARKS.md)

    def __init__(self, config: EncodecDecoderConfig, tensors: Mapping[str, torch.Tensor],
                 prefix: str = "audio_encoder."):
        super().__init__()
        config.check_supported()
        self.config = config
        t = _Tensors(tensors, prefix)
        self.register_buffer("codebooks", torch.stack(
            [t.get(f"quantizer.layers.{q}.codebook.embed") for q in range(config.num_quantizers)]))

        # Layer indices follow `transformers`' decoder list, where each ELU takes an index too.
        c = config
        scale = 2 ** len(c.upsampling_ratios)
        layers: list[nn.Module] = [
            _Conv(t, "decoder.layers.0.conv", c),
            _LSTM(t, "decoder.layers.1.lstm", scale * c.num_filters, c.num_lstm_layers),
        ]
        i = 2
        for ratio in c.upsampling_ratios:
            layers += [nn.ELU(), _ConvTranspose(t, f"decoder.layers.{i + 1}.conv", c, stride=ratio)]
            i += 2
            for j in range(c.num_residual_layers):
                layers.append(_ResBlock(t, f"decoder.layers.{i}", c, dilation=c.dilation_growth_rate**j))
                i += 1
        layers += [nn.ELU(), _Conv(t, f"decoder.layers.{i + 1}.conv", c)]
        self.layers = nn.Sequential(*layers)
        self.to(self.codebooks.device)  # where the checkpoint's tensors are
        self.eval()

    @classmethod
    def from_state_dict(cls, config: Mapping[str, object], tensors: Mapping[str, torch.Tensor],
                        prefix: str = "audio_encoder.") -> EncodecDecoder:
        """Build from a MusicGen config.json's `audio_encoder` dict and its checkpoint tensors.

        Encoder tensors and the quantizer's training statistics are ignored; each weight-normed
        conv weight is computed once here.
        """
        return cls(EncodecDecoderConfig(config), tensors, prefix)

    @property
    def device(self) -> torch.device:
        return self.codebooks.device

    @staticmethod
    def _span(layers: Sequence[nn.Module], lo: int, hi: int) -> tuple[int, int]:
        """The input positions that `layers`' outputs [lo, hi) depend on (unclamped)."""
        for layer in reversed(layers):
            span = getattr(layer, "span", None)  # pointwise layers (ELU) have none
            if span is not None:
                lo, hi = span(lo, hi)
        return lo, hi

    def upsample(self, x: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """The stack after the LSTM, (B, C, T) -> (B, channels, T * hop).

        The first upsampling stage runs whole; the later ones, whose activations are the large
        ones (64 channels at 32 kHz: 50 MB per 6 s, written and read once per op and faulted in
        fresh each time), run `tile` output samples at a time, so that their activations stay in
        cache (measured: BENCHMARKS.md). Each tile computes its samples from the inputs they
        depend on (`_span`, from the kernels and strides) and keeps only its own samples, so the
        audio is the whole stack's up to float rounding (tested). Inside the signal a tile's own
        padding falls in the neighbours' part, which is dropped; at either end the tile starts
        or stops where the signal does, so its padding is the whole stack's.
        """
        stack = self.layers[2:]
        ups = [i for i, layer in enumerate(stack) if isinstance(layer, _ConvTranspose)]
        split = ups[1] - 1 if len(ups) > 1 else len(stack)  # the ELU before the second upsampling
        x = stack[:split](x)
        rest = stack[split:]
        up = math.prod(layer.stride for layer in rest if isinstance(layer, _ConvTranspose))
        frames = x.shape[-1]
        step = max(1, (self.tile_samples if tile is None else tile) // up)
        if frames <= step:
            return rest(x)
        out = None
        for a in range(0, frames, step):
            b = min(a + step, frames)
            lo, hi = self._span(rest, a * up, b * up)
            lo, hi = max(lo, 0), min(hi, frames)
            y = rest(x[..., lo:hi])
            if out is None:
                out = y.new_empty(*y.shape[:-1], frames * up)
            out[..., a * up : b * up] = y[..., (a - lo) * up : (b - lo) * up]
        return out

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, K, T) -> the sum of each level's codebook entry, (B, codebook_dim, T)."""
        if codes.shape[1] > self.codebooks.shape[0]:
            raise ValueError(f"got {codes.shape[1]} codebooks, the codec has {self.codebooks.shape[0]}")
        out = torch.zeros((), device=self.device)  # summed level by level, as transformers does
        for k in range(codes.shape[1]):
            out = out + F.embedding(codes[:, k], self.codebooks[k])
        return out.permute(0, 2, 1)

    @torch.inference_mode()
    def decode(self, audio_codes: torch.Tensor, audio_scales: Sequence[torch.Tensor | None],
               padding_mask: torch.Tensor | None = None,
               last_frame_pad_length: int = 0) -> EncodecDecodeOutput:
        """Codes (1 chunk, B, K, T) -> audio (B, audio_channels, T * hop), as EncodecModel.decode.

        `audio_scales[0]` (None: no scaling) multiplies the audio; a `padding_mask` shorter than
        the audio truncates it; `last_frame_pad_length` drops that many trailing frames first.
        """
        if len(audio_codes) != 1:
            raise ValueError(f"Expected one frame, got {len(audio_codes)}")
        codes = audio_codes[0]
        if last_frame_pad_length > 0:
            codes = codes[..., :-last_frame_pad_length]
        audio = self.upsample(self.layers[:2](self.embed(codes.to(self.device))))
        scale = audio_scales[0]
        if scale is not None:
            audio = audio * scale.view(-1, 1, 1)
        if padding_mask is not None and padding_mask.shape[-1] < audio.shape[-1]:
            audio = audio[..., : padding_mask.shape[-1]]
        return EncodecDecodeOutput(audio)
