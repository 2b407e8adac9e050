"""The decoder's weights and KV cache on 2 MB pages (Linux transparent huge pages).

Why: a CPU decode step streams every weight and the filled cache from memory once. On 4 KB
pages that stream crosses a page, and costs a TLB miss and a restart of the hardware
prefetcher, every 4 KB; on 2 MB pages it does not. Measured on musicgen-small's int8 layers
(Intel Xeon, 2 cores): the step's products 22-23 ms -> 17.5-19 ms (BENCHMARKS.md).

Where the kernel keeps huge pages for programs that ask (`madvise`, the usual default), we ask:
weights the engine owns are copied into one 2 MB-aligned arena marked MADV_HUGEPAGE before it
is touched; weights shared with a loaded checkpoint are collapsed in place (MADV_COLLAPSE,
Linux 6.1+); caches are allocated marked. Where huge pages are off or the call is refused,
everything still works on ordinary pages, only slower.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import itertools
import logging
import math
import mmap
import warnings
import weakref

import torch
from torch import nn

from model.memory.pages import libc, madvise

log = logging.getLogger(__name__)

HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
MIN_BYTES = HUGE  # smaller tensors cannot hold a whole huge page


def _advise(lo: int, hi: int, advice: int) -> bool:
    """madvise the whole huge pages inside [lo, hi); True where the kernel accepted."""
    start, end = -(-lo // HUGE) * HUGE, hi // HUGE * HUGE
    return end > start and madvise(start, end - start, advice)


def byte_count(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """A CPU tensor on a fresh anonymous mapping (zero pages, none touched yet), 2 MB-aligned and
    marked for huge pages, and True; small ones plain (uninitialised) and False.

    Its own mapping, not the allocator's heap: recycled heap memory is already on small pages,
    which marking no longer changes (a 16 MB tensor in the middle of the test suite got none)."""
    nbytes = byte_count(shape, dtype)
    if nbytes < MIN_BYTES:
        return torch.empty(shape, dtype=dtype), False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note that the buffer is shared, not copied
        area = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared would be shmem
        raw = torch.frombuffer(area, dtype=torch.uint8)  # the tensor keeps it mapped
    skip = -raw.data_ptr() % HUGE
    start = raw.data_ptr() + skip
    _advise(start, start + nbytes, _MADV_HUGEPAGE)
    _own(area, start, nbytes)
    return raw[skip : skip + nbytes].view(dtype).view(shape), True


def adopt(area: mmap.mmap, offset: int, nbytes: int) -> torch.Tensor:
    """Bytes [offset, offset + nbytes) of a mapping made elsewhere (a weight record's file,
    model/memory/weight_cache.py) as a uint8 tensor that keeps it mapped, counted as our own (so `pack`
    leaves tensors in it where they are)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # frombuffer's note that the buffer is shared, not copied
        data = torch.frombuffer(area, dtype=torch.uint8)[offset : offset + nbytes]
    _own(area, data.data_ptr(), nbytes)
    return data


_OWN: dict[int, tuple[int, int]] = {}  # start -> (end, token) of each live mapping made by `_fresh`
_TOKENS = itertools.count()


def _own(area: mmap.mmap, start: int, nbytes: int) -> None:
    """Count [start, start + nbytes) of `area` as our own until the mapping goes (its range may
    then be reused)."""
    token = next(_TOKENS)
    _OWN[start] = (start + nbytes, token)
    weakref.finalize(area, _forget, start, token)


def _forget(start: int, token: int) -> None:
    """Drop a freed mapping's entry, unless the address already belongs to a newer one."""
    if _OWN.get(start, (0, -1))[1] == token:
        _OWN.pop(start, None)


def _on_own_mapping(t: torch.Tensor) -> bool:
    """Whether `t` lies in a huge-page mapping made by `empty`/`zeros` or an `Arena` (so `pack`
    leaves it where it is)."""
    lo = t.data_ptr()
    hi = lo + t.nbytes
    return any(start <= lo and hi <= end for start, (end, _) in list(_OWN.items()))  # a copy: finalizers may run meanwhile


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, on huge pages where it is large enough to hold one."""
    return _fresh(shape, dtype)[0]


class Arena:
    """One huge-page mapping handed out front to back, 64-byte aligned.

    Why: a layout makes its converted weights one by one, in the order a step reads them; made
    in here they are on huge pages from their first touch, with no copy after (`pack` would
    copy and touch them twice: 0.18 s for musicgen-small's 1 MB projections, measured).
    """

    def __init__(self, nbytes: int, buffer: torch.Tensor | None = None):
        """`buffer`: memory to hand out instead of a fresh mapping (a weight record's, mapped)."""
        if buffer is not None:
            self._buf = buffer
        else:
            self._buf = _fresh((nbytes,), torch.uint8)[0] if nbytes > 0 else None
        self.used = 0

    @property
    def buffer(self) -> torch.Tensor | None:
        """The whole mapping (uint8), None for an empty arena."""
        return self._buf

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised tensor from the arena; None where it no longer fits."""
        nbytes = byte_count(shape, dtype)
        start = -(-self.used // 64) * 64
        if self._buf is None or start + nbytes > self._buf.numel():
            return None
        self.used = start + nbytes
        return self._buf[start : start + nbytes].view(dtype).view(shape)


_WEIGHTS: contextvars.ContextVar[Arena | None] = contextvars.ContextVar("weights_arena", default=None)


@contextlib.contextmanager
def weights_into(arena: Arena):
    """Make `for_weights` draw from `arena` inside the block."""
    token = _WEIGHTS.set(arena)
    try:
        yield arena
    finally:
        _WEIGHTS.reset(token)


def for_weights(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor for weights a step streams: from the arena of `weights_into` where
    one is open and has room, else `empty`."""
    arena = _WEIGHTS.get()
    t = arena.take(shape, dtype) if arena is not None else None
    return t if t is not None else empty(shape, dtype)


def zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros, on huge pages where large enough. Written here, though a fresh mapping reads as
    zeros already: pages left to be made while decoding cost a musicgen-small int8 step about
    5 ms more (measured, A/B)."""
    return _fresh(shape, dtype)[0].zero_()


def _tensors(module: nn.Module) -> list[torch.Tensor]:
    """Each distinct CPU tensor (parameters and buffers) of `module`, in module order."""
    seen, out = set(), []
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == "cpu" and t.numel() and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def pack(module: nn.Module) -> int:
    """Move `module`'s own tensors into one huge-page arena, in module order (the order a step
    reads them); each tensor keeps its identity (`.data` becomes a view). Only for tensors no
    one else holds: a tensor that is a view of another's storage would keep that alive.
    Tensors made on their own huge-page mapping (`empty`, as the quantised weights are) stay
    where they are: moving them would only add a copy and a second first touch of their pages.
    Returns the arena's size in bytes."""
    tensors = [t for t in _tensors(module) if t.is_contiguous() and not _on_own_mapping(t)]
    offsets, total = [], 0
    for t in tensors:
        total = -(-total // 64) * 64
        offsets.append(total)
        total += t.nbytes
    if total < MIN_BYTES:
        return 0
    arena = empty((total,), torch.uint8)
    freed = 0
    with torch.no_grad():
        for t, at in zip(tensors, offsets):
            nbytes = t.nbytes
            view = arena[at : at + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.data = view
            freed += nbytes
            if freed >= 32 << 20:  # hand the old copies' pages back as we go: the peak stays one copy
                _trim()
                freed = 0
    _trim()
    return total


def _trim() -> None:
    """Return freed heap pages to the system (glibc keeps them otherwise, and they count)."""
    lib = libc()
    if lib is not None and hasattr(lib, "malloc_trim"):
        lib.malloc_trim(0)


def huge_bytes(tensors: list[torch.Tensor]) -> int:
    """About how many bytes of `tensors` the kernel has on huge pages now: each memory area's
    AnonHugePages and FilePmdMapped (/proc/self/smaps) in proportion to how much of the area the tensors cover, so
    an area shared with other memory is not counted whole (0 where smaps cannot be read)."""
    spans: list[list[int]] = []
    for lo, hi in sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors if t.numel()):
        if spans and lo <= spans[-1][1]:  # packed tensors merge into one span (smaps has ~1000 areas)
            spans[-1][1] = max(spans[-1][1], hi)
        else:
            spans.append([lo, hi])
    if not spans:
        return 0
    starts = [a for a, _ in spans]
    total, share = 0.0, 0.0
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    covered, i = 0, bisect.bisect_left(starts, hi) - 1
                    while i >= 0 and spans[i][1] > lo:
                        covered += min(hi, spans[i][1]) - max(lo, spans[i][0])
                        i -= 1
                    share = covered / (hi - lo)
                elif share and head in ("AnonHugePages:", "FilePmdMapped:"):  # fresh memory; a mapped file
                    total += int(line.split()[1]) * 1024 * share
    except (OSError, ValueError):
        return 0
    return int(total)


def report(tensors: list[torch.Tensor]) -> str | None:
    """The log line on how much of `tensors` sits on huge pages; None where they are too small to
    fill one (a tiny model), since "0 of 0 MB" would read as huge pages being off."""
    total = sum(t.nbytes for t in tensors)
    if total < MIN_BYTES:
        return None
    return f"decoder weights on huge pages: {huge_bytes(tensors) / 1e6:.0f} of {total / 1e6:.0f} MB (model/memory/hugepages.py)"


def collapse(module: nn.Module) -> int:
    """Ask the kernel to put `module`'s large tensors on huge pages where they lie (for tensors
    shared with a loaded checkpoint, which `pack` would duplicate). Returns the bytes accepted."""
    done = 0
    for t in _tensors(module):
        nbytes = t.nbytes
        if nbytes >= MIN_BYTES and _advise(t.data_ptr(), t.data_ptr() + nbytes, _MADV_HUGEPAGE):
            if _advise(t.data_ptr(), t.data_ptr() + nbytes, _MADV_COLLAPSE):
                done += nbytes
    return done
