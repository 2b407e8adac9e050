"""Converted decoder weights kept on disk, so that a later load reads them instead of converting.

Converting musicgen-small's decoder to int8 reads its 1.4 GB of float32 weights and quantises
every row: 0.4-0.65 s of each `musicbridge generate` (Intel Xeon, 2 cores), and the arena's fresh
pages cost the kernel's zeroing besides. For one checkpoint file, precision and kernel layout the
result is the same bytes every time, so the first load records them (the weight arena's bytes
and the int8 rows' scales) and later loads skip each conversion: the record's data becomes the
arena itself where the page cache maps the file on huge pages (`Record.open`), else it is read
into a fresh arena in one pass.

What keeps a replay right:
- the key covers each checkpoint file (path, size, modification time, inode), the precision,
  the kernels' signature (their build and the int8 layout: VNNI weights are biased), torch's
  version, the decoder's shapes and FORMAT (raise it when a conversion or the layout changes);
- each conversion a replay skips is first checked against its entry: its place in the arena,
  shape, dtype, and a CRC of three slices of its source weight (the start, the middle, the end:
  so a layout that made same-shaped weights in another order, or a checkpoint rewritten under
  the same name, size and time, is caught); from the first that differs on, the rest are
  converted as usual and the record is written again;
- a file is written whole under a temporary name, synced, then renamed, so no reader meets half
  of one, and its header's sizes are checked against its length before a byte is used.

The most recently used records stay, up to KEEP_BYTES and KEEP_FILES (a replay counts as a use).
Files live in `<cache>/weights/` (model/memory/user_cache.py); MUSICBRIDGE_WEIGHT_CACHE=0 turns the cache
off, and a folder there puts it elsewhere (the test suite keeps its own).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import mmap
import os
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from model.memory import hugepages
from model.memory.user_cache import cache_dir
from model.settings import current as settings

log = logging.getLogger(__name__)

FORMAT = 3
KEEP_BYTES = 4 << 30
KEEP_FILES = 32
SUFFIX = ".mbw"  # not .bin: model.memory.pages treats mapped .bin files as checkpoints
_MAGIC = b"MBWCACHE"
_ALIGN = 4096
# The share of a mapped record that must lie on huge pages for the map to be used. The rest
# streams through 4 KB pages: all of musicgen-small's int8 record on 4 KB pages cost 1.5-3 ms a
# step (22.7-24.1 against 20-21 ms); at 87% on huge pages no difference showed, and the map
# saved 0.4-0.7 s of load against reading the record (Intel Xeon, 2 cores; BENCHMARKS.md).
MAPPED_SHARE = 0.75
_PROBES = 4  # aligned 2 MB windows touched first, spread over the record


_OFF = ("0", "off", "no", "false")
_ON = ("", "1", "on", "yes", "true")


def enabled() -> bool:
    return settings().weight_cache.lower() not in _OFF


def folder() -> Path:
    value = settings().weight_cache
    return cache_dir() / "weights" if value.lower() in _ON else Path(value).expanduser()


def fingerprint(source: torch.Tensor, parts: list[torch.Tensor] | None = None) -> int:
    """CRC32 of the first, middle and last 1024 values of a source weight (its bytes); with
    `parts`, of their concatenation along the first dimension, which `source` is to hold."""
    flats = [p.detach().reshape(-1) for p in parts] if parts is not None else [source.detach().reshape(-1)]
    n = sum(f.numel() for f in flats)
    crc = zlib.crc32(repr((tuple(source.shape), str(source.dtype))).encode())
    for lo in sorted({0, max(0, n // 2 - 512), max(0, n - 1024)}):
        crc = zlib.crc32(_values(flats, lo, 1024).contiguous().view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _values(flats: list[torch.Tensor], lo: int, count: int) -> torch.Tensor:
    """Values [lo, lo + count) of the flat tensors laid end to end."""
    taken = []
    for f in flats:
        if count <= 0:
            break
        if lo >= f.numel():
            lo -= f.numel()
            continue
        piece = f[lo : lo + count]
        taken.append(piece)
        count -= piece.numel()
        lo = 0
    return taken[0] if len(taken) == 1 else torch.cat(taken)


def key_of(files: list[Path], **layout) -> str:
    """The cache key of a layout of these checkpoint files; `layout` names all else it depends on."""
    parts = []
    for f in files:
        st = os.stat(f)
        parts.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev])
    text = json.dumps({"format": FORMAT, "files": parts, "torch": torch.__version__, **layout},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Record:
    """One layout's conversions, in the order the layout makes them: replayed from a file where a
    valid one exists, noted as they are made either way.

    Make it with `open` before the arena: where the file is valid and the page cache maps it on
    huge pages, `mapped` is its data, which the arena then hands out as is (`hugepages.Arena`'s
    `buffer`): no fresh pages to zero, no copy. Otherwise `attach` gives it the arena, and a valid
    file is read into it."""

    def __init__(self, path: Path | None):
        self.path = path
        self.buf: torch.Tensor | None = None  # the arena's whole buffer (uint8), once attached
        self.mapped: torch.Tensor | None = None  # the file's data, where the arena can use it as is
        self.made: list[tuple[list | None, torch.Tensor | None]] = []  # each conversion's entry (None: outside) and scale
        self.replay: list[list] = []  # [offset, shape, dtype, scale_at, scale_len, fingerprint] per conversion
        self.scales: torch.Tensor | None = None
        self._scale_at = 0  # where the next conversion's scales go among all of them
        self._used = 0  # the end of the last byte the conversions wrote in the arena
        self.replayed = 0
        self.outside = False  # a conversion landed outside the arena: nothing to record
        self._head: dict | None = None
        self._file = None  # the record's one open file: header, map, data and scales all from it
        # Sources not yet written: their address -> (tensor, the parts it is to concatenate);
        # a replayed conversion never needs them (`defer_concat`).
        self.pending: dict[int, tuple[torch.Tensor, list[torch.Tensor], Callable[[], None] | None]] = {}

    @classmethod
    def open(cls, path: Path | None, nbytes: int) -> Record:
        """The record at `path` for an arena of `nbytes`: its header checked, and its data mapped
        where the mapping lies on huge pages. One open file serves the whole replay, so a record
        replaced meanwhile (another process's rename) never mixes into it."""
        record = cls(path)
        if path is None:
            return record
        try:
            record._file = open(path, "rb")
        except OSError:
            return record
        record._head = _header(record._file, nbytes)
        if record._head is not None and record._head["used"] == nbytes:  # a record for this very layout
            record.mapped = _map(record._file, record._head)
        if record._head is None:
            record._close()
        return record

    def attach(self, arena_buf: torch.Tensor) -> None:
        """The arena the layout's conversions land in: the mapping itself, or fresh memory that
        a valid record is read into."""
        self.buf = arena_buf
        head, f = self._head, self._file
        if head is None or f is None:
            return
        try:
            if self.mapped is None or arena_buf.data_ptr() != self.mapped.data_ptr():
                if not _read_into(f, head, arena_buf):
                    return
            scales = torch.empty(head["scales"])
            if os.preadv(f.fileno(), [memoryview(scales.numpy()).cast("B")],
                         head["start"] + head["used"]) != scales.nbytes:
                return
        except OSError:
            return
        finally:
            self._close()
        self.replay, self.scales = head["entries"], scales
        with contextlib.suppress(OSError):
            os.utime(self.path)  # a use: eviction keeps the most recently used

    def _entry(self, out: torch.Tensor, scale: torch.Tensor | None, scale_at: int, fp: int) -> list | None:
        base, lo = self.buf.data_ptr(), out.data_ptr()
        if not (base <= lo and lo + out.nbytes <= base + self.buf.numel()):
            return None
        return [lo - base, list(out.shape), str(out.dtype).removeprefix("torch."), scale_at,
                0 if scale is None else scale.numel(), fp]

    def fill(self, out: torch.Tensor, scale: torch.Tensor | None, convert: Callable[[], None],
             source: torch.Tensor) -> None:
        i, scale_at = len(self.made), self._scale_at
        later = self.pending.get(source.data_ptr())
        if later is not None and later[0].shape != source.shape:
            later = None
        fp = fingerprint(source, later[1] if later is not None else None)
        entry = self._entry(out, scale, scale_at, fp) if self.buf is not None else None
        if entry is None:
            self.outside = True
        if (entry is not None and self.replayed == i and i < len(self.replay) and self.replay[i] == entry
                and self.scales is not None):
            if scale is not None:
                scale.copy_(self.scales[scale_at : scale_at + scale.numel()])
            self.replayed += 1
            if later is not None:
                del self.pending[source.data_ptr()]
        else:
            self.materialize(source)
            convert()  # in a mapped record, a write copies the page it lands on (private mapping)
        self.made.append((entry, scale))
        self._scale_at += 0 if scale is None else scale.numel()
        if entry is not None:
            self._used = max(self._used, entry[0] + out.nbytes)

    def materialize(self, tensor: torch.Tensor | None = None) -> None:
        """Write the deferred concatenation into `tensor` (None: into every tensor still waiting)."""
        keys = list(self.pending) if tensor is None else [tensor.data_ptr()]
        for key in keys:
            got = self.pending.pop(key, None)
            if got is not None:
                target, parts, done = got
                torch.cat(parts, dim=0, out=target)
                if done is not None:
                    done()

    @property
    def how(self) -> str:
        """'mapped' where the arena is the record's map, 'read' otherwise (for the log)."""
        used_map = self.mapped is not None and self.buf is not None and self.buf.data_ptr() == self.mapped.data_ptr()
        return "mapped" if used_map else "read"

    @property
    def complete_replay(self) -> bool:
        return bool(self.made) and self.replayed == len(self.made) == len(self.replay)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def save(self) -> threading.Thread | None:
        """Write the record in the background (a non-daemon thread: the process waits for it
        before it ends); None where there is nothing to write. A conversion that landed outside
        the arena means the layout no longer fits the record (or the arena): the record goes, so
        the next load converts into a whole arena and records afresh."""
        if self.outside and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            return None
        if self.path is None or self.complete_replay or not self.made:
            return None
        entries = [entry for entry, _ in self.made]
        scales = [scale for _, scale in self.made if scale is not None]
        used = self._used
        size = f"{used / 1e6:.0f} MB" if used >= 1e6 else f"{used / 1e3:.0f} kB"
        log.info("recording the converted weights in %s for later loads (%s, once)", self.path.parent, size)
        thread = threading.Thread(target=_write, name="musicbridge-weight-cache",
                                  args=(self.path, entries, self.buf[:used],
                                        torch.cat(scales) if scales else torch.empty(0)))
        thread.start()
        return thread


def _header(f, nbytes: int) -> dict | None:
    """The record's header where the open file is one of ours, fits an arena of `nbytes` and its
    length agrees with it; None otherwise."""
    try:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(_MAGIC)) != _MAGIC:
            return None
        n = int.from_bytes(f.read(8), "little")
        if not 0 < n < 1 << 24:
            return None
        head = json.loads(f.read(n))
        used, nscales, start = int(head["used"]), int(head["scales"]), int(head["start"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (start % _ALIGN or used > nbytes or start + used + 4 * nscales != size
            or not _entries_fit(head.get("entries"), used, nscales)):
        return None
    return head


def _map(f, head: dict) -> torch.Tensor | None:
    """The record's data as a private (copy-on-write) map of the file, where the page cache hands
    at least MAPPED_SHARE of it over on huge pages (large folios: ext4 on Linux 6.x maps a hot
    file's pages 2 MB at a time), so the step streams it about as it would a huge-page arena.
    None elsewhere: 4 KB pages would cost every step more than a copy costs once."""
    try:
        area = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    data = hugepages.adopt(area, head["start"], head["used"])
    # A few aligned 2 MB windows first, spread over the record: where the file comes in 4 KB
    # pages, stop before faulting it all (a record after memory pressure is partly in 4 KB
    # folios, so one window alone could miss a mostly huge map).
    huge = hugepages.HUGE
    lo = -data.data_ptr() % huge
    windows = (data.numel() - lo) // huge
    if windows >= 2 * _PROBES:
        for k in range(_PROBES):
            at = lo + (k * windows // _PROBES) * huge
            data[at : at + huge : 1 << 12].sum()
        if hugepages.huge_bytes([data]) < huge // 2:  # not one probed window on a huge page
            return None  # dropping `data` unmaps it
    data[:: 1 << 12].sum()  # fault every page in (one read per 4 KB page)
    if hugepages.huge_bytes([data]) < MAPPED_SHARE * data.numel():
        return None
    return data


def _read_into(f, head: dict, buf: torch.Tensor) -> bool:
    used = head["used"]
    view = memoryview(buf[:used].numpy())
    got = 0
    while got < used:
        k = os.preadv(f.fileno(), [view[got:]], head["start"] + got)
        if not k:
            return False
        got += k
    return True


def _write(path: Path, entries: list, data: torch.Tensor, scales: torch.Tensor) -> None:
    head = {"used": data.numel(), "scales": scales.numel(), "entries": entries, "start": 0}
    n = len(json.dumps(head)) + 64
    head["start"] = -(-(len(_MAGIC) + 8 + n) // _ALIGN) * _ALIGN
    text = json.dumps(head).encode().ljust(n)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".writing-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + len(text).to_bytes(8, "little") + text)
            f.seek(head["start"])
            f.write(memoryview(data.numpy()))
            f.write(memoryview(scales.numpy()).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _evict(path.parent, keep=path)
        log.debug("converted weights recorded in %s", path)
    except OSError as e:
        log.warning("could not keep the converted weights in %s (%s); the next load converts them again",
                    path.parent, e.strerror or e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _evict(folder: Path, keep: Path) -> None:
    """Delete the least recently used records beyond KEEP_FILES or KEEP_BYTES (`keep` stays),
    and half-written files a killed process left over an hour ago."""
    for tmp in folder.glob(".writing-*"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
    for old in folder.glob("*.bin"):  # FORMAT 1's records (this folder holds nothing else)
        with contextlib.suppress(OSError):
            old.unlink()
    files = []
    for f in folder.glob("*" + SUFFIX):
        with contextlib.suppress(OSError):
            st = f.stat()
            files.append((f == keep, st.st_mtime_ns, st.st_size, f))
    files.sort(reverse=True)  # `keep` first, then the most recently used
    count = total = 0
    for _, _, size, f in files:
        count, total = count + 1, total + size
        if count > 1 and (count > KEEP_FILES or total > KEEP_BYTES):
            with contextlib.suppress(OSError):
                f.unlink()


_ACTIVE: contextvars.ContextVar[Record | None] = contextvars.ContextVar("weight_record", default=None)


@contextlib.contextmanager
def recording(record: Record | None) -> Iterator[Record | None]:
    """Route the conversions made inside the block through `record` (None: convert as usual)."""
    token = _ACTIVE.set(record)
    try:
        yield record
    finally:
        _ACTIVE.reset(token)
        if record is not None:
            record.materialize()  # whatever no conversion consumed is written as it was asked for


def fill(out: torch.Tensor, scale: torch.Tensor | None, convert: Callable[[], None], source: torch.Tensor) -> None:
    """Make `out` (and `scale`) hold the conversion of `source`: replayed from the open record
    where it holds this one, else by `convert()`, which writes them."""
    record = _ACTIVE.get()
    if record is None:
        convert()
    else:
        record.fill(out, scale, convert, source)


def defer_concat(out: torch.Tensor, parts: list[torch.Tensor], done: Callable[[], None] | None = None) -> None:
    """Make `out` the concatenation of `parts` along the first dimension, or promise to.

    Why: musicgen-small's fused q/k/v and heads are 0.3 GB of float32 copied from the
    checkpoint on every load, only to be quantised; where the open record replays that
    conversion, its source is never read. Inside `recording` the copy is deferred until a
    conversion needs it (`fill`, `materialize`) and made when the block ends at the latest; the
    replay's fingerprint is taken from the parts. `done` runs once the copy is made."""
    record = _ACTIVE.get()
    if record is None or record.buf is None:
        torch.cat(parts, dim=0, out=out)
        if done is not None:
            done()
        return
    record.pending[out.data_ptr()] = (out, list(parts), done)


def materialize(tensor: torch.Tensor) -> None:
    """Make a deferred concatenation into `tensor` now (a no-op where none waits)."""
    record = _ACTIVE.get()
    if record is not None:
        record.materialize(tensor)


def path_for(key: str) -> Path | None:
    return folder() / f"{key}{SUFFIX}" if enabled() else None


def _entries_fit(entries, used: int, nscales: int) -> bool:
    """Each entry well formed and inside the record: its bytes within `used`, its scales within
    `nscales` (so a replay never reads padding or past the scales)."""
    if not isinstance(entries, list):
        return False
    for e in entries:
        if not (isinstance(e, list) and len(e) == 6 and isinstance(e[1], list)):
            return False
        offset, shape, dtype, scale_at, scale_len, _ = e
        dt = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(dt, torch.dtype) or not all(isinstance(n, int) and n >= 0 for n in shape):
            return False
        nbytes = hugepages.byte_count(tuple(shape), dt)
        if not (isinstance(offset, int) and 0 <= offset and offset + nbytes <= used
                and isinstance(scale_at, int) and isinstance(scale_len, int)
                and 0 <= scale_at and scale_at + scale_len <= nscales):
            return False
    return True
