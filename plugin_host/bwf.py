"""Broadcast Wave (EBU Tech 3285) `bext` chunk: the time reference a DAW places a stem by.

Pedalboard writes plain RIFF/WAVE; `add_bext` rewrites such a file with a version-1 `bext`
chunk right after the WAVE header (where BWF readers look first), keeping every other chunk.
"""

from __future__ import annotations

import os
import struct
from datetime import datetime, timezone

BEXT_FIXED = 602  # bytes before CodingHistory in a version 0/1 bext chunk


class BwfError(ValueError):
    """A file that is not the RIFF/WAVE this module can annotate or read."""


def bext_payload(time_reference: int, description: str = "", originator: str = "musicbridge",
                 originator_reference: str = "", when: datetime | None = None,
                 coding_history: str = "") -> bytes:
    """The bytes of a version-1 bext chunk body (without the chunk header)."""
    if not 0 <= time_reference < 2**64:
        raise BwfError(f"time reference must be a sample count in [0, 2**64), got {time_reference}")
    when = when or datetime.now(timezone.utc)
    body = b"".join([
        _ascii(description, 256), _ascii(originator, 32), _ascii(originator_reference, 32),
        _ascii(when.strftime("%Y-%m-%d"), 10), _ascii(when.strftime("%H:%M:%S"), 8),
        struct.pack("<IIH", time_reference & 0xFFFFFFFF, time_reference >> 32, 1),
        bytes(64),  # UMID: none
        bytes(190),  # loudness fields (version 2) and reserved: zero in version 1
    ])
    assert len(body) == BEXT_FIXED
    history = coding_history.encode("ascii", "replace")
    if history:
        history += b"\r\n" if not history.endswith(b"\r\n") else b""
    return body + history


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b"\0")


def _chunks(f) -> list[tuple[bytes, int, int]]:
    """(id, offset of the body, body size) for every chunk after the RIFF/WAVE header."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise BwfError("not a RIFF/WAVE file")
    total = os.fstat(f.fileno()).st_size
    out, pos = [], 12
    while pos + 8 <= total:
        f.seek(pos)
        cid, size = struct.unpack("<4sI", f.read(8))
        out.append((cid, pos + 8, size))
        pos += 8 + size + (size & 1)
    return out


def add_bext(src: str | os.PathLike, dst: str | os.PathLike, time_reference: int, **fields) -> None:
    """Copy WAV `src` to `dst` with a bext chunk (replacing any old one) placed before `fmt `."""
    payload = bext_payload(time_reference, **fields)
    with open(src, "rb") as f:
        chunks = [c for c in _chunks(f) if c[0] != b"bext"]
        size = 4 + (8 + len(payload) + (len(payload) & 1)) + sum(8 + s + (s & 1) for _, _, s in chunks)
        if size >= 2**32:
            raise BwfError("file too large for RIFF (4 GiB); write FLAC instead")
        with open(dst, "wb") as out:
            out.write(b"RIFF" + struct.pack("<I", size) + b"WAVE")
            out.write(b"bext" + struct.pack("<I", len(payload)) + payload + bytes(len(payload) & 1))
            for cid, body, csize in chunks:
                out.write(cid + struct.pack("<I", csize))
                f.seek(body)
                _copy(f, out, csize)
                if csize & 1:
                    out.write(b"\0")
            out.flush()
            os.fsync(out.fileno())


def _copy(src, dst, n: int) -> None:
    left = n
    while left:
        buf = src.read(min(left, 1 << 20))
        if not buf:
            raise BwfError("chunk runs past the end of the file")
        dst.write(buf)
        left -= len(buf)


def read_bext(path: str | os.PathLike) -> dict | None:
    """The bext fields of a WAV file (None if it has no bext chunk)."""
    with open(path, "rb") as f:
        for cid, body, size in _chunks(f):
            if cid == b"bext":
                if size < BEXT_FIXED:
                    raise BwfError(f"bext chunk of {size} bytes is shorter than {BEXT_FIXED}")
                f.seek(body)
                raw = f.read(size)
                lo, hi, version = struct.unpack_from("<IIH", raw, 338)
                text = lambda a, b: raw[a:b].split(b"\0")[0].decode("ascii", "replace")  # noqa: E731
                return {"description": text(0, 256), "originator": text(256, 288),
                        "originator_reference": text(288, 320), "origination_date": text(320, 330),
                        "origination_time": text(330, 338), "time_reference": lo | (hi << 32),
                        "version": version, "coding_history": raw[BEXT_FIXED:].decode("ascii", "replace")}
    return None


def wav_format(path: str | os.PathLike) -> dict:
    """Format fields of a WAV header: channels, sample_rate, bits_per_sample, frames, format_tag."""
    with open(path, "rb") as f:
        chunks = {cid: (body, size) for cid, body, size in _chunks(f)}
        if b"fmt " not in chunks or b"data" not in chunks:
            raise BwfError(f"{path}: WAV without fmt or data chunk")
        f.seek(chunks[b"fmt "][0])
        tag, ch, rate, _, align, bits = struct.unpack("<HHIIHH", f.read(16))
    return {"format_tag": tag, "channels": ch, "sample_rate": rate, "bits_per_sample": bits,
            "frames": chunks[b"data"][1] // align}
