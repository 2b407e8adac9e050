"""The records that cross between the daemon and a remote engine, with explicit JSON and bytes forms.

What crosses is decided here: **codes, not audio**. A second of MusicGen audio is 50 frames of
4 codebooks (2048 entries each), sent as int16: 400 bytes, against 128 000 bytes of the same
second as 32 kHz float32 audio (64 000 as int16). The codec runs beside the DAW (the daemon
decodes codes with its own copy of the checkpoint's EnCodec), so a jam needs well under
1 kB/s each way and the audio the DAW hears is decoded where it plays (docs/remote.md).

Every decoder is strict: unknown fields, wrong types, arrays over their bounds are refused with
`WireError` before anything reaches the engine.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from model.types import EngineInfo, GenerationRequest, RequestError, SamplingParams

PROTOCOL = 1  # bumped when a record changes shape; both sides say theirs in /info
MAX_ARRAY_BYTES = 64 << 20  # the largest array a request may carry (a 10-minute stereo take is 154 MB: refused)
_DTYPES = {"float32": np.float32, "int16": np.int16, "int64": np.int64}


class WireError(ValueError):
    """A record that cannot be read; the message says which field and why."""


def array_to_json(a: np.ndarray) -> dict[str, Any]:
    """A numeric array as JSON: dtype, shape, little-endian bytes in base64."""
    a = np.ascontiguousarray(a)
    name = a.dtype.name
    if name not in _DTYPES:
        raise WireError(f"arrays of {name} do not cross the wire")
    return {"dtype": name, "shape": list(a.shape),
            "data": base64.b64encode(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()).decode("ascii")}


def array_from_json(d: Any, what: str, max_bytes: int = MAX_ARRAY_BYTES) -> np.ndarray:
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise WireError(f"{what}: expected an array record (dtype, shape, data)")
    dtype = _DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
    shape = d["shape"]
    if dtype is None:
        raise WireError(f"{what}: dtype must be one of {', '.join(_DTYPES)}")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise WireError(f"{what}: bad shape {shape!r}")
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if n > max_bytes or not isinstance(d["data"], str) or len(d["data"]) > (max_bytes * 4) // 3 + 4:
        raise WireError(f"{what}: larger than the {max_bytes >> 20} MiB a request may carry")
    raw = base64.b64decode(d["data"], validate=True)
    if len(raw) != n:
        raise WireError(f"{what}: {len(raw)} bytes for shape {shape} of {d['dtype']}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(shape)


def _check_fields(cls, d: Any, what: str) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise WireError(f"{what}: expected an object")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise WireError(f"{what}: unknown field(s) {', '.join(unknown)}")
    return d


REQUEST_FIELDS = frozenset({"prompt", "seconds", "params", "melody", "audio_prompt", "return_prompt"})


def request_to_json(r: GenerationRequest) -> dict[str, Any]:
    """A GenerationRequest as it crosses: prompt, length, sampling, melody chroma, audio prompt
    (its cancel event stays on this side: a cancel is the client closing the request)."""
    return {"prompt": r.prompt, "seconds": float(r.seconds), "params": r.params.to_dict(),
            "melody": None if r.melody is None else array_to_json(np.asarray(r.melody, np.float32)),
            "audio_prompt": None if r.audio_prompt is None else array_to_json(np.asarray(r.audio_prompt, np.float32)),
            "return_prompt": bool(r.return_prompt)}


def request_from_json(d: Any) -> GenerationRequest:
    """The engine's request from its wire form; WireError naming the field when it is not one (the
    engine's own range checks run here, before any queue)."""
    if not isinstance(d, dict):
        raise WireError("request: expected an object")
    unknown = sorted(set(d) - REQUEST_FIELDS)
    if unknown:
        raise WireError(f"request: unknown field(s) {', '.join(unknown)}")
    prompt, seconds = d.get("prompt"), d.get("seconds")
    if not isinstance(prompt, str) or len(prompt) > 4096:
        raise WireError("request: prompt must be text of at most 4096 characters")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise WireError("request: seconds must be a number")
    try:
        params = SamplingParams.from_dict(d.get("params") or {})
    except RequestError as e:
        raise WireError(f"request: {e}") from None
    melody = None if d.get("melody") is None else array_from_json(d["melody"], "request melody")
    audio = None if d.get("audio_prompt") is None else array_from_json(d["audio_prompt"], "request audio_prompt")
    try:
        return GenerationRequest(prompt, float(seconds), params, melody, audio, bool(d.get("return_prompt", False)))
    except RequestError as e:
        raise WireError(f"request: {e}") from None


@dataclass(frozen=True)
class ServedBy:
    """Which replica made a result: for logs, render summaries and the fault tests."""

    replica: str
    node: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"replica": self.replica, "node": self.node, "pid": self.pid}

    @classmethod
    def from_json(cls, d: Any) -> ServedBy:
        d = _check_fields(cls, d, "served_by")
        return cls(str(d["replica"]), str(d["node"]), int(d["pid"]))


@dataclass(frozen=True)
class TokensResult:
    """One request's codes (codebooks, frames), or None where it was cancelled."""

    codes: np.ndarray | None
    served_by: ServedBy
    batch_size: int  # how many requests shared the replica's engine call (Serve's batching)

    def to_json(self) -> dict[str, Any]:
        return {"codes": None if self.codes is None else array_to_json(self.codes.astype(np.int16)),
                "served_by": self.served_by.to_json(), "batch_size": self.batch_size}

    @classmethod
    def from_json(cls, d: Any) -> TokensResult:
        d = _check_fields(cls, d, "result")
        codes = None if d.get("codes") is None else array_from_json(d["codes"], "codes").astype(np.int64)
        return cls(codes, ServedBy.from_json(d["served_by"]), int(d["batch_size"]))


# ---------------------------------------------------------------- a jam's code pieces (binary)

_PIECE = struct.Struct("<qHI")  # first stream frame, codebooks, frames


def piece_to_bytes(first_frame: int, codes: np.ndarray) -> bytes:
    """A piece of a jam's codes as one binary message: 14 bytes of header, then int16 codes."""
    k, n = codes.shape
    return _PIECE.pack(int(first_frame), k, n) + np.ascontiguousarray(codes, dtype="<i2").tobytes()


def piece_from_bytes(b: bytes) -> tuple[int, np.ndarray]:
    if len(b) < _PIECE.size:
        raise WireError("piece: shorter than its header")
    first, k, n = _PIECE.unpack_from(b)
    if len(b) != _PIECE.size + 2 * k * n:
        raise WireError(f"piece: {len(b)} bytes for {k} x {n} codes")
    return first, np.frombuffer(b, dtype="<i2", offset=_PIECE.size).astype(np.int64).reshape(k, n)


def info_to_json(info) -> dict[str, Any]:
    """model.engine.EngineInfo as JSON (its fields are plain values)."""
    return {f.name: getattr(info, f.name) for f in fields(info)}


def info_from_json(d: Any):
    d = _check_fields(EngineInfo, d, "engine info")
    try:
        return EngineInfo(**d)
    except TypeError as e:
        raise WireError(f"engine info: {e}") from None


def codec_digest(codec) -> str:
    """sha256 over the codec's weights: the daemon decodes with its own copy, which must be the same."""

    import torch  # torch loads only where this runs

    h = hashlib.sha256()
    for name, t in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
