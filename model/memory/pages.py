"""Give back the memory of checkpoint tensors the engine no longer reads.

`transformers` loads safetensors checkpoints as memory maps: a weight's pages count in the
process's resident memory once touched, and stay resident while the file is mapped (the text
encoder and codec keep the mapping alive). When the engine fuses q/k/v or quantises a layer,
the checkpoint's float32 copy is dead weight; `drop_pages` tells the kernel those pages may go
(MADV_DONTNEED on a private file mapping: a later read would fault them back from the file, so
this is safe even if a tensor were read again). Only whole pages strictly inside a tensor that
lies in a mapped checkpoint file are dropped; heap memory is never touched.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin")


_OWN_MAPS: set[tuple[int, int]] = set()  # checkpoint files our reader mapped (model/load/checkpoint.py)


def file_map(mm: mmap.mmap) -> None:
    """Register a checkpoint file mapped by our reader, whose /proc/self/maps name may not end in
    .safetensors (the Hugging Face cache names files by hash and links to them). A registered
    range counts only while /proc/self/maps still shows a file mapped exactly there."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    _OWN_MAPS.add((base, base + -(-len(mm) // mmap.PAGESIZE) * mmap.PAGESIZE))


def _file_mappings() -> list[tuple[int, int]]:
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[-1].startswith("/"):
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    if parts[-1].endswith(_CHECKPOINT_SUFFIXES) or (lo, hi) in _OWN_MAPS:
                        spans.append((lo, hi))
    except OSError:
        return []
    return spans


_HELD: contextvars.ContextVar[list[tuple[int, int]] | None] = contextvars.ContextVar("held_maps", default=None)


@contextlib.contextmanager
def maps_held():
    """Read /proc/self/maps once for every `drop_pages` inside, for code that maps and unmaps
    no checkpoint file meanwhile (a layout's 50 calls each read it: 0.1 s, measured)."""
    token = _HELD.set(_file_mappings())
    try:
        yield
    finally:
        _HELD.reset(token)


def drop_pages(tensors: list[torch.Tensor]) -> int:
    """Drop the resident pages of `tensors` that lie in a mapped checkpoint; bytes dropped.

    Call while the tensors are still alive (so the mapping certainly is), before releasing them.
    """
    if not sys.platform.startswith("linux"):
        return 0
    spans = _HELD.get()
    if spans is None:
        spans = _file_mappings()
    if not spans:
        return 0
    page = mmap.PAGESIZE
    dropped = 0
    for t in tensors:
        if t.device.type != "cpu" or not t.numel() or not t.is_contiguous():
            continue
        lo = t.data_ptr()
        hi = lo + t.nbytes
        if not any(a <= lo and hi <= b for a, b in spans):
            continue
        start = -(-lo // page) * page
        end = hi // page * page
        if end > start and madvise(start, end - start, _MADV_DONTNEED):
            dropped += end - start
    return dropped


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL | None:
    """The C library, for the memory calls PyTorch does not offer (None where it cannot be had)."""
    try:
        lib = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if hasattr(lib, "malloc_trim"):  # glibc's
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    return lib


def madvise(start: int, length: int, advice: int) -> bool:
    """madvise(2) on [start, start + length); True where the kernel accepted it."""
    lib = libc() if sys.platform.startswith("linux") else None
    if lib is None:
        return False
    return lib.madvise(start, length, advice) == 0
