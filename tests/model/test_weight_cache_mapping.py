"""Where a converted-weights record is used mapped (model/memory/weight_cache.py `_map`): the kernel's
own answer, read from /proc/self/smaps, not a stand-in."""

from __future__ import annotations

import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model.memory import hugepages, weight_cache


def _file_pmd_kb(path: Path) -> int:
    """FilePmdMapped of a fresh private map of `path`, every page touched (smaps, this process)."""
    with open(path, "rb") as f:
        area = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data = np.frombuffer(area, dtype=np.uint8)
    int(data[::4096].sum())
    lo = data.ctypes.data
    text, total, inside = Path("/proc/self/smaps").read_text(), 0, False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0]
        if "-" in head and not head.endswith(":"):
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a <= lo < b
        elif inside and head == "FilePmdMapped:":
            total = int(line.split()[1])
    del data
    area.close()
    return total


_SHM = Path("/dev/shm")


@pytest.fixture(params=["disk", "shm"])
def folder(request, tmp_path):
    """The suite's temporary folder (ext4 here: large folios), and /dev/shm (tmpfs, whose huge
    pages are off by default: 4 KB pages), so both answers are met where the machine has them."""
    if request.param == "disk":
        yield tmp_path
        return
    if not _SHM.is_dir() or not os.access(_SHM, os.W_OK):
        pytest.skip("no writable /dev/shm (tmpfs) on this machine: the 4 KB-page case needs one")
    with tempfile.TemporaryDirectory(dir=_SHM) as d:
        yield Path(d)


def test_a_record_is_mapped_exactly_where_the_kernel_maps_it_on_huge_pages(folder):
    """With the real smaps reading, a 64 MB record is used mapped where this machine's page
    cache maps at least MAPPED_SHARE of the file 2 MB at a time (ext4 on Linux 6.x), and read
    where it does not (tmpfs without huge pages): the answer is the kernel's, found here
    independently."""
    path = folder / f"r{weight_cache.SUFFIX}"
    data = torch.arange(64 << 20, dtype=torch.int64).to(torch.uint8)
    weight_cache._write(path, [], data, torch.empty(0))
    huge = _file_pmd_kb(path) * 1024 >= weight_cache.MAPPED_SHARE * data.numel()
    record = weight_cache.Record.open(path, data.numel())
    assert (record.mapped is not None) is huge
    if huge:
        assert torch.equal(record.mapped, data) and hugepages.huge_bytes([record.mapped]) >= weight_cache.MAPPED_SHARE * data.numel()
