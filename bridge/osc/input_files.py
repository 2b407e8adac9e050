"""Input files named by OSC messages: opened safely, limited before decoding, read cancellably.

A path in a message was checked when the message arrived (bridge.osc.paths), but the file is read
later, on the job worker; in between, the name can be swapped for a symlink to somewhere else.
So every read starts here: the file is opened (non-blocking, so a FIFO cannot stall us), the
*open descriptor* is checked (a regular file, its real path under the allowed folders), limits
are applied from its size and declared header before any audio is decoded, and all reading
comes from that same descriptor.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np
from pedalboard.io import AudioFile

from bridge.osc.paths import PathPolicy, file_kind
from bridge.osc.protocol import ProtocolError

READ_CHUNK_SECONDS = 1.0


@dataclass(frozen=True)
class InputLimits:
    """Bounds on one input file; `serve --max-take-seconds` sets the length."""

    max_take_seconds: float = 600.0
    max_audio_bytes: int = 512 * 1024 * 1024
    max_midi_bytes: int = 1024 * 1024
    max_midi_events: int = 100_000


def _real_path(fd: int, path: str) -> Path:
    """Where the open descriptor really points (Linux: /proc/self/fd); elsewhere the resolved name."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return Path(os.path.realpath(path))


@contextlib.contextmanager
def open_input(path: str | os.PathLike, policy: PathPolicy, what: str = "file") -> Iterator[int]:
    """An open, checked descriptor of a regular file under the roots; ProtocolError otherwise."""
    text = str(path)
    try:
        fd = os.open(text, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise ProtocolError("not_found", f"{what} {text[:200]!r} does not exist") from None
    except OSError as e:
        raise ProtocolError("bad_path", f"{what} {text[:200]!r} cannot be opened: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        real = _real_path(fd, text)
        if not policy.inside(real):
            raise ProtocolError("bad_path", f"{what} {text[:200]!r} now leads to {str(real)[:200]!r}, outside "
                                            "the allowed folders (was it replaced by a link?)")
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError("bad_args", f"{what} {text[:200]!r} is {file_kind(st.st_mode)}; expected a "
                                            "regular file")
        os.set_blocking(fd, True)
        yield fd
    finally:
        os.close(fd)


def _size_ok(fd: int, text: str, limit: int, what: str) -> int:
    size = os.fstat(fd).st_size
    if size > limit:
        raise ProtocolError("limit", f"{what} {text[:200]!r} is {size / 1e6:.1f} MB, the limit is "
                                     f"{limit / 1e6:.1f} MB")
    return size


def check_audio(path: str | os.PathLike, policy: PathPolicy, limits: InputLimits, what: str = "audio file") -> float:
    """Open, check size and declared length of an audio file without decoding it; its length in seconds."""
    with open_input(path, policy, what) as fd:
        return _declared_seconds(fd, str(path), limits, what)


def _declared_seconds(fd: int, text: str, limits: InputLimits, what: str) -> float:
    _size_ok(fd, text, limits.max_audio_bytes, what)
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        with os.fdopen(os.dup(fd), "rb") as fo, AudioFile(fo) as f:
            frames, rate = int(f.frames), float(f.samplerate)
    except Exception as e:  # noqa: BLE001 - any header failure is "not readable audio"
        raise ProtocolError("bad_args", f"{what} {text[:200]!r} is not a readable audio file ({e})") from None
    if not rate > 0:
        raise ProtocolError("bad_args", f"{what} {text[:200]!r} declares no sample rate")
    seconds = frames / rate
    if seconds > limits.max_take_seconds:
        raise ProtocolError("limit", f"{what} {text[:200]!r} declares {seconds:.0f} s of audio, the limit is "
                                     f"{limits.max_take_seconds:g} s (serve --max-take-seconds)")
    if frames == 0:
        raise ProtocolError("bad_args", f"{what} {text[:200]!r} contains no audio (0 samples)")
    return seconds


def read_audio(path: str | os.PathLike, policy: PathPolicy, limits: InputLimits,
               cancel: threading.Event | None = None, what: str = "take") -> tuple[np.ndarray, int]:
    """float32 (channels, samples) and rate, read from the checked descriptor a second at a time.

    Stops with ProtocolError("failed", "cancelled ...") as soon as `cancel` is set.
    """

    text = str(path)
    with open_input(path, policy, what) as fd:
        _declared_seconds(fd, text, limits, what)
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        try:
            with os.fdopen(os.dup(fd), "rb") as fo, AudioFile(fo) as f:
                rate, left = int(f.samplerate), int(f.frames)
                step = max(1, int(rate * READ_CHUNK_SECONDS))
                while left > 0:
                    if cancel is not None and cancel.is_set():
                        raise ProtocolError("failed", f"reading {what} {text[:200]!r} was cancelled")
                    block = f.read(min(step, left))
                    if block.shape[1] == 0:
                        break
                    chunks.append(block)
                    left -= block.shape[1]
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ProtocolError("bad_args", f"{what} {text[:200]!r} is not a readable audio file ({e})") from None
    audio = np.concatenate(chunks, axis=1) if chunks else np.zeros((1, 0), np.float32)
    if audio.shape[1] == 0:
        raise ProtocolError("bad_args", f"{what} {text[:200]!r} contains no audio (0 samples)")
    if not np.isfinite(audio).all():
        raise ProtocolError("bad_args", f"{what} {text[:200]!r} contains NaN or infinite samples")
    return np.ascontiguousarray(audio, dtype=np.float32), rate


def check_midi(path: str | os.PathLike, policy: PathPolicy, limits: InputLimits, what: str = "MIDI file") -> int:
    """Open a MIDI file, check its size, then its event count; the number of events."""

    text = str(path)
    with open_input(path, policy, what) as fd:
        _size_ok(fd, text, limits.max_midi_bytes, what)
        try:
            with os.fdopen(os.dup(fd), "rb") as fo:
                mid = mido.MidiFile(file=fo)
        except Exception as e:  # noqa: BLE001
            raise ProtocolError("bad_args", f"{what} {text[:200]!r} is not a readable MIDI file ({e})") from None
    events = sum(len(t) for t in mid.tracks)
    if events > limits.max_midi_events:
        raise ProtocolError("limit", f"{what} {text[:200]!r} has {events} events, the limit is "
                                     f"{limits.max_midi_events}")
    return events


@contextlib.contextmanager
def pinned(path: str | os.PathLike, policy: PathPolicy, what: str = "file") -> Iterator[Path]:
    """A name for the checked open file that cannot be swapped: for readers that want a path.

    On Linux a link to /proc/self/fd/N in a private folder reopens exactly the descriptor we
    checked, whatever happens to the original name meanwhile; the link keeps the suffix, which
    those readers use to pick a format. Elsewhere it is the resolved path (checked, but not pinned).
    """
    suffix = Path(str(path)).suffix
    with open_input(path, policy, what) as fd:
        proc = f"/proc/self/fd/{fd}"
        if not os.path.exists(proc):
            yield _real_path(fd, str(path))
            return
        with tempfile.TemporaryDirectory(prefix="musicbridge-input-") as d:
            link = Path(d) / f"input{suffix}"
            os.symlink(proc, link)
            yield link


HEADER_SUFFIXES = (".wav", ".flac", ".aif", ".aiff")  # formats whose length is read from a header alone


class Inputs:
    """The daemon's input gate: roots and limits together, used at message time and by the job worker."""

    def __init__(self, policy: PathPolicy, limits: InputLimits = InputLimits()):
        self.policy, self.limits = policy, limits

    def check_now(self, path: str | os.PathLike, kind: str) -> None:
        """The quick checks at message time, on the OSC thread: type, real path, size, header length.

        Nothing here decodes audio or parses MIDI events (that waits for the job worker), so it
        answers in milliseconds whatever the file holds.
        """
        what = {"take": "take", "audio": "audio file", "midi": "MIDI file"}[kind]
        with open_input(path, self.policy, what) as fd:
            if kind == "midi":
                _size_ok(fd, str(path), self.limits.max_midi_bytes, what)
            elif Path(str(path)).suffix.lower() in HEADER_SUFFIXES:
                _declared_seconds(fd, str(path), self.limits, what)
            else:
                _size_ok(fd, str(path), self.limits.max_audio_bytes, what)

    def read_take(self, path: str | os.PathLike, cancel: threading.Event | None) -> tuple[np.ndarray, int]:
        return read_audio(path, self.policy, self.limits, cancel, "take")

    @contextlib.contextmanager
    def pinned(self, path: str | os.PathLike, what: str = "file") -> Iterator[Path]:
        """A checked name for `path` that keeps reading the file as opened now (see `pinned`)."""
        with pinned(path, self.policy, what) as p:
            yield p

    @contextlib.contextmanager
    def melody_file(self, path: str | os.PathLike) -> Iterator[Path]:
        """A pinned, checked name for a melody file named over OSC: MIDI by size and events, audio by size and length."""
        with pinned(path, self.policy, "melody file") as p:
            if Path(str(path)).suffix.lower() in (".mid", ".midi"):
                check_midi(p, self.policy, self.limits)
            else:
                check_audio(p, self.policy, self.limits, "melody audio")
            yield p
