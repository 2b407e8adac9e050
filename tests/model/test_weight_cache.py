"""Converted weights kept on disk (model/memory/weight_cache.py): replayed bit for bit, or converted."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.kernels import gemv
from model.memory import weight_cache
from model.engine import Engine
from model.decode.quant import Int4Linear
from model.types import GenerationRequest, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, params=["mapped", "read"])
def replay_by(request, monkeypatch):
    """Both ways a record comes back: mapped as it is (where the page cache maps it on huge
    pages: ext4 on Linux 6.x, for a file this size only when told so here) or read into a fresh
    arena (elsewhere)."""
    from model.memory import hugepages

    on_huge = request.param == "mapped"
    monkeypatch.setattr(hugepages, "huge_bytes", lambda ts: sum(t.nbytes for t in ts) if on_huge else 0)
    return request.param


def _in_record(t: torch.Tensor) -> bool:
    """Whether `t`'s memory is a mapping of a weight record file (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= t.data_ptr() < hi:
            return len(parts) > 5 and parts[5].endswith(weight_cache.SUFFIX)
    return False


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MUSICBRIDGE_CACHE", str(folder))
    monkeypatch.delenv("MUSICBRIDGE_WEIGHT_CACHE", raising=False)
    return folder / "weights"


@pytest.fixture
def model_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny checkpoint this test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


@pytest.fixture
def conversions(monkeypatch):
    """How many weights were converted (int8 quantisations and bfloat16 copies)."""
    count = [0]
    real = weight_cache.fill

    def counting(out, scale, convert, source):
        def counted():
            count[0] += 1
            convert()
        real(out, scale, counted, source)

    monkeypatch.setattr(weight_cache, "fill", counting)
    return count


def _load(path: Path, dtype: str) -> Engine:
    eng = Engine.load(str(path), dtype=dtype)
    if eng.weight_writer is not None:
        eng.weight_writer.join()
    return eng


def _converted(eng: Engine) -> list[torch.Tensor]:
    """Every converted tensor of the decoder (weights and int8 scales), in module order."""
    return [t for t in [*eng.lm.buffers(), *eng.lm.parameters()]
            if t.dtype in (torch.int8, torch.uint8, torch.bfloat16) or t.dim() == 1 and t.numel() > 4]


def _tokens(eng: Engine) -> np.ndarray:
    req = GenerationRequest(prompt="warm piano", seconds=0.4, params=SamplingParams(seed=5))
    return eng.generate_tokens([req])[0]


@pytest.mark.parametrize("dtype", ["int8", "bfloat16", "int4"])
def test_a_second_load_replays_every_conversion_bit_for_bit(cache, model_dir, conversions, dtype, replay_by,
                                                            caplog, tiny_wide_model_dir, tmp_path):
    if dtype == "int4":  # whole 128-input blocks: int4's own layout, where the CPU runs its kernel
        if not gemv.has_vnni():
            pytest.skip("this CPU has no integer kernels (x86-64 without AVX2, ARM64 without the dot-product "
                        "extension): int4 runs PyTorch's "
                        "packed kernel, whose packing is PyTorch's own and is not cached")
        model_dir = Path(shutil.copytree(tiny_wide_model_dir, tmp_path / "wide"))
    first = _load(model_dir, dtype)
    if dtype == "int4":
        assert any(isinstance(m, Int4Linear) and m.kernel for m in first.lm.modules())
    made = conversions[0]
    assert made > 0 and len(list(cache.glob("*.mbw"))) == 1
    with caplog.at_level(logging.INFO, logger="model.engine"):
        second = _load(model_dir, dtype)
    assert f"{dtype} weights {replay_by} from the cache" in caplog.text
    assert conversions[0] == made  # nothing converted again
    a, b = _converted(first), _converted(second)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    weights = [t for t in b if t.dim() == 2]
    assert not any(_in_record(t) for t in a)
    assert all(_in_record(t) for t in weights) is (replay_by == "mapped")
    assert np.array_equal(_tokens(first), _tokens(second))


def test_each_precision_has_its_own_record(cache, model_dir, conversions):
    _load(model_dir, "int8")
    _load(model_dir, "bfloat16")
    assert len(list(cache.glob("*.mbw"))) == 2


def test_a_changed_checkpoint_is_converted_again(cache, model_dir, conversions):
    first = _load(model_dir, "int8")
    made = conversions[0]
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data)  # the same bytes in a new file: a new inode and time, so a new key
    os.utime(f, ns=(1, 1))
    second = _load(model_dir, "int8")
    assert conversions[0] == 2 * made
    assert len(list(cache.glob("*.mbw"))) == 2
    for x, y in zip(_converted(first), _converted(second)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("weight,end", [("model.decoder.layers.1.fc1.weight", False),
                                        # fused with q and k (with the other heads), the copy
                                        # deferred: the fingerprint is taken from the parts
                                        ("model.decoder.layers.1.self_attn.v_proj.weight", True),
                                        ("lm_heads.3.weight", True)])
def test_a_checkpoint_rewritten_in_place_under_the_same_key_is_caught(cache, model_dir, conversions, monkeypatch,
                                                                      weight, end):
    """Same file, size, time and inode, one weight's values changed: the key cannot see it, the
    entry's fingerprint of its source does, and that weight is converted from the new values."""
    _load(model_dir, "int8")
    f = model_dir / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    lo, hi = head["decoder." + weight]["data_offsets"]
    at = 8 + n + (hi - 64 if end else lo)
    data[at : at + 64] = bytes(reversed(data[at : at + 64]))
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(data)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_ino == st.st_ino and f.stat().st_mtime_ns == st.st_mtime_ns
    made = conversions[0]
    again = _converted(_load(model_dir, "int8"))
    assert made < conversions[0] < 2 * made  # the weights before it replayed
    monkeypatch.setenv("MUSICBRIDGE_WEIGHT_CACHE", "0")
    fresh = _converted(_load(model_dir, "int8"))
    for x, y in zip(fresh, again):
        assert torch.equal(x, y)


@pytest.mark.parametrize("damage", ["truncated", "not ours", "header lies", "empty", "entry past the end"])
def test_a_damaged_record_is_never_used_and_is_written_again(cache, model_dir, conversions, damage):
    fresh = _converted(_load(model_dir, "int8"))
    made = conversions[0]
    (path,) = cache.glob("*.mbw")
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "not ours":
        path.write_bytes(b"PK\x03\x04" + data[4:])
    elif damage == "header lies":
        n = int.from_bytes(data[8:16], "little")
        head = json.loads(data[16 : 16 + n])
        head["used"] += 64
        text = json.dumps(head).encode().ljust(n)
        path.write_bytes(data[:16] + text[:n] + data[16 + n :])
    elif damage == "entry past the end":
        n = int.from_bytes(data[8:16], "little")
        head = json.loads(data[16 : 16 + n])
        head["entries"][-1][0] = head["used"]  # the last weight's bytes after what the file holds
        path.write_bytes(data[:16] + json.dumps(head).encode().ljust(n) + data[16 + n :])
    else:
        path.write_bytes(b"")
    again = _converted(_load(model_dir, "int8"))
    assert conversions[0] == 2 * made
    for x, y in zip(fresh, again):
        assert torch.equal(x, y)
    assert path.read_bytes() == data  # rewritten whole


def test_a_record_that_disagrees_with_the_layout_converts_from_there_on(cache, model_dir, conversions):
    """A record whose entries no longer match the order the layout makes its weights in (a
    changed layout under the same FORMAT): the matching ones replay, the rest are converted."""
    fresh = _converted(_load(model_dir, "int8"))
    made = conversions[0]
    (path,) = cache.glob("*.mbw")
    data = path.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    head = json.loads(data[16 : 16 + n])
    head["entries"][3][0] += 64  # the 4th weight somewhere else in the arena
    path.write_bytes(data[:16] + json.dumps(head).encode().ljust(n) + data[16 + n :])
    again = _converted(_load(model_dir, "int8"))
    assert conversions[0] == 2 * made - 3
    for x, y in zip(fresh, again):
        assert torch.equal(x, y)
    assert path.read_bytes() == data  # rewritten whole, the same bytes (read from the mapping where mapped)


def test_off_by_environment(cache, model_dir, conversions, monkeypatch):
    monkeypatch.setenv("MUSICBRIDGE_WEIGHT_CACHE", "0")
    _load(model_dir, "int8")
    _load(model_dir, "int8")
    assert not cache.exists()
    assert conversions[0] > 0


def test_an_unwritable_cache_folder_is_a_warning_not_a_failure(tmp_path, model_dir, monkeypatch, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MUSICBRIDGE_CACHE", str(blocker))
    monkeypatch.delenv("MUSICBRIDGE_WEIGHT_CACHE", raising=False)
    with caplog.at_level(logging.WARNING, logger="model.memory.weight_cache"):
        eng = _load(model_dir, "int8")
    assert "could not keep the converted weights" in caplog.text
    assert _tokens(eng).shape[0] == 4
    assert blocker.read_text().startswith("a file")
    assert not [p for p in tmp_path.rglob(".writing-*")]


@pytest.mark.parametrize("limit", ["files", "bytes"])
def test_only_the_most_recently_used_records_are_kept(cache, model_dir, conversions, monkeypatch, limit):
    """Beyond KEEP_FILES records, or KEEP_BYTES in all, the least recently used go; the one just
    written always stays."""
    cache.mkdir(parents=True)
    for i in range(6):
        old = cache / f"old{i}.mbw"
        old.write_bytes(b"x" * 1000)
        os.utime(old, ns=(10**9 * (i + 1), 10**9 * (i + 1)))
    if limit == "files":
        monkeypatch.setattr(weight_cache, "KEEP_FILES", 4)
    else:
        monkeypatch.setattr(weight_cache, "KEEP_BYTES", 1)  # less than any record: only the new one stays
    _load(model_dir, "int8")
    left = sorted(p.name for p in cache.glob("*.mbw"))
    new = [n for n in left if not n.startswith("old")]
    assert len(new) == 1
    assert [n for n in left if n.startswith("old")] == (["old3.mbw", "old4.mbw", "old5.mbw"] if limit == "files" else [])


@pytest.mark.skipif(not gemv.available(), reason="no C compiler here: int8 converts in PyTorch, uncached")
def test_generate_twice_reads_the_second_time_and_writes_the_same_audio(tmp_path, model_dir):
    """Through the product: the second `musicbridge generate` says it read the converted weights
    from the cache, and writes the same WAV bytes as the first."""
    env = dict(os.environ, MUSICBRIDGE_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    env.pop("MUSICBRIDGE_WEIGHT_CACHE", None)
    runs = []
    for name in ("a.wav", "b.wav"):
        r = subprocess.run([sys.executable, "-m", "bridge.cli", "generate", "--model", str(model_dir),
                            "--dtype", "int8", "--prompt", "lofi", "--seconds", "0.5", "--seed", "2",
                            "--out", str(tmp_path / name)], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        runs.append(r.stderr)
    assert "from the cache" not in runs[0]
    assert re.search(r"int8 weights (mapped|read) from the cache", runs[1])
    assert (tmp_path / "a.wav").read_bytes() == (tmp_path / "b.wav").read_bytes()



def test_without_the_c_kernels_the_deferred_copies_are_made_before_quantising(cache, model_dir, tmp_path):
    """MUSICBRIDGE_KERNELS=0: PyTorch quantises the weights itself, outside the record's `fill`;
    the fused q/k/v and heads it reads are the checkpoint's, as with the cache off."""
    code = ("import sys, torch; from model.engine import Engine; "
            "e = Engine.load(sys.argv[1], dtype='int8'); "
            "e.weight_writer and e.weight_writer.join(); "
            "torch.save([t.clone() for t in e.lm.buffers() if t.dtype in (torch.int8, torch.uint8)], sys.argv[2])")
    outs = {}
    for label, setting in (("on", str(cache)), ("off", "0")):
        env = {**os.environ, "MUSICBRIDGE_KERNELS": "0", "MUSICBRIDGE_WEIGHT_CACHE": setting}
        subprocess.run([sys.executable, "-c", code, str(model_dir), str(tmp_path / f"{label}.pt")],
                       check=True, env=env, cwd=ROOT)
        outs[label] = torch.load(tmp_path / f"{label}.pt")
    assert len(outs["on"]) == len(outs["off"]) > 0
    for a, b in zip(outs["on"], outs["off"]):
        assert torch.equal(a, b)
