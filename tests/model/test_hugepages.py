"""model/memory/hugepages.py: the decoder's weights packed into one huge-page arena and caches on
2 MB-aligned memory, without changing a value or a tensor's identity."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from model.memory import hugepages


def test_large_tensors_are_2mb_aligned_and_small_ones_plain():
    for _ in range(3):  # memory handed back and taken again comes back zero
        big = hugepages.zeros((3, 1 << 20), torch.bfloat16)
        assert big.data_ptr() % hugepages.HUGE == 0
        assert big.shape == (3, 1 << 20) and big.dtype == torch.bfloat16 and not big.any()
        big.fill_(7)
        del big
    small = hugepages.zeros((10,), torch.float32)
    assert small.shape == (10,) and not small.any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are asked for on Linux only")
def test_the_kernel_accepts_the_huge_page_advice_here():
    big = hugepages.empty((4 << 20,), torch.uint8)
    assert hugepages._advise(big.data_ptr(), big.data_ptr() + big.numel(), hugepages._MADV_HUGEPAGE)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_huge_bytes_reads_the_kernels_account_of_the_arena():
    """What the engine logs: the bytes of the arena on huge pages, as /proc/self/smaps says, and
    never more than the areas holding the tensors."""
    big = hugepages.zeros((16 << 20,), torch.uint8)
    big.fill_(1)  # pages are made on first write, after the advice
    got = hugepages.huge_bytes([big])
    assert 0 <= got <= big.numel() + 2 * hugepages.HUGE
    mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    if "[never]" not in mode:  # the kernel offers them: a fresh 16 MB arena gets some
        assert got > 0, mode
    # A tensor covering a quarter of the area is counted for its quarter, not for the whole area.
    assert hugepages.huge_bytes([big[: 4 << 20]]) <= (4 << 20) * got / big.numel() + 4096


def test_pack_moves_tensors_into_one_arena_keeping_values_and_identity():
    torch.manual_seed(0)
    mods = nn.ModuleList([nn.Linear(1024, 1024, bias=False), nn.LayerNorm(1024), nn.Linear(1024, 3000)])
    mods[2].register_buffer("q", torch.randint(-127, 127, (3000, 1024), dtype=torch.int8))
    before = {n: t.clone() for n, t in [*mods.named_parameters(), *mods.named_buffers()]}
    ids = {n: id(t) for n, t in [*mods.named_parameters(), *mods.named_buffers()]}
    total = hugepages.pack(mods)
    tensors = dict([*mods.named_parameters(), *mods.named_buffers()])
    assert total >= sum(t.numel() * t.element_size() for t in tensors.values())
    assert {n: id(t) for n, t in tensors.items()} == ids  # the same Parameter / buffer objects
    for n, t in tensors.items():
        assert torch.equal(t, before[n]), n
    starts = sorted(t.data_ptr() for t in tensors.values())
    assert starts[0] % hugepages.HUGE == 0 and starts[-1] - starts[0] < total  # one arena, in order
    assert isinstance(mods[0].weight, nn.Parameter)
    y = mods[0](torch.ones(2, 1024))
    assert torch.allclose(y, torch.ones(2, 1024) @ before["0.weight"].T)


def test_the_log_line_is_left_out_for_weights_smaller_than_one_huge_page():
    assert hugepages.report([torch.zeros(1000)]) is None
    big = hugepages.zeros((4 << 20,), torch.uint8)
    line = hugepages.report([big])
    assert line is not None and line.startswith("decoder weights on huge pages:") and "of 4 MB" in line


def test_an_arena_hands_out_aligned_pieces_in_order_until_full():
    arena = hugepages.Arena(4 << 20)
    a = arena.take((1000, 3), torch.int8)
    b = arena.take((512, 1024), torch.bfloat16)
    assert a.data_ptr() % hugepages.HUGE == 0 and b.data_ptr() == a.data_ptr() + 3008  # next 64-byte line
    assert arena.take((4 << 20,), torch.uint8) is None  # no room left: the caller falls back
    with hugepages.weights_into(arena):
        c = hugepages.for_weights((1024,), torch.float32)
        assert c.data_ptr() == b.data_ptr() + b.numel() * 2
        d = hugepages.for_weights((4 << 20,), torch.uint8)  # too big: a mapping of its own
        assert d.data_ptr() % hugepages.HUGE == 0 and not arena._buf.data_ptr() <= d.data_ptr() < arena._buf.data_ptr() + (4 << 20)
    assert hugepages.for_weights((64,), torch.float32).shape == (64,)  # outside the block: plain
    mods = nn.ModuleList([nn.Linear(4, 4)])
    mods[0].register_buffer("q", b)
    values = b.clone()
    hugepages.pack(mods)
    assert mods[0].q.data_ptr() == b.data_ptr() and torch.equal(mods[0].q, values)  # left where it was


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_the_weight_arena_is_sized_to_what_the_layout_makes(tiny_model_dir, dtype):
    """Engine._lay_out sizes the arena from the spec (model.engine._weight_bytes) before any
    weight is converted; it must equal what the conversion then makes, or weights spill out of
    it (a copy more) or leave part of it unused."""
    from model.engine import Engine, _decoder_spec, _weight_bytes

    eng = Engine.load(str(tiny_model_dir), dtype=dtype)
    made = [m.weight for m in [*eng.lm.layers.modules(), eng.lm.heads] if hasattr(m, "weight") and m.weight.dim() == 2
            and m.weight.dtype in (torch.uint8, torch.int8, torch.bfloat16)]
    assert made
    assert _weight_bytes(_decoder_spec(eng.hf), dtype) == sum(-(-t.numel() * t.element_size() // 64) * 64 for t in made)
    # ... and they were made in it: one storage, back to back in module order, 64-byte aligned
    # (the tiny model's arena is under one huge page, so `pack` leaves it as it is).
    assert len({t.untyped_storage().data_ptr() for t in made}) == 1
    for a, b in zip(made, made[1:]):
        assert b.data_ptr() == a.data_ptr() + -(-a.numel() * a.element_size() // 64) * 64
