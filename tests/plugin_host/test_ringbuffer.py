"""The lock-free SPSC ring: exact order across wrap-around, under two real threads, without allocating on read."""

from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest

from plugin_host.ringbuffer import RingBuffer


def test_wraps_around_and_keeps_order():
    rb = RingBuffer(10, 2)
    out = np.zeros((10, 2), np.float32)
    seq = np.arange(60, dtype=np.float32).reshape(30, 2)
    got = []
    pos = 0
    for size in (7, 3, 8, 5, 7):
        pos += rb.write(seq[pos:pos + size])
        n = rb.read_into(out, 6)
        got.append(out[:n].copy())
    while rb.readable:
        n = rb.read_into(out, 4)
        got.append(out[:n].copy())
    np.testing.assert_array_equal(np.concatenate(got), seq[:pos])
    assert pos == 30 and rb.frames_read == 30 and rb.readable == 0


def test_full_and_empty_edges():
    rb = RingBuffer(4, 1)
    assert rb.write(np.ones((6, 1), np.float32)) == 4
    assert rb.writable == 0 and rb.write(np.ones((1, 1), np.float32)) == 0
    out = np.full((8, 1), 7.0, np.float32)
    assert rb.read_into(out, 8) == 4
    assert rb.read_into(out, 8) == 0
    assert out[4:].tolist() == [[7.0]] * 4  # what was not read stays untouched
    rb.write(np.arange(3, dtype=np.float32)[:, None])
    assert rb.skip(2) == 2 and rb.read_into(out, 8) == 1 and out[0, 0] == 2.0


def test_producer_and_consumer_threads_lose_and_duplicate_nothing():
    total = 200_000
    seq = np.arange(total, dtype=np.float32)[:, None]
    rb = RingBuffer(1000, 1)
    received = np.full(total, -1.0, np.float32)

    def produce():
        rng = np.random.default_rng(1)
        pos = 0
        while pos < total:
            pos += rb.write(seq[pos:pos + int(rng.integers(1, 700))])

    def consume():
        rng = np.random.default_rng(2)
        out = np.zeros((700, 1), np.float32)
        pos = 0
        while pos < total:
            n = rb.read_into(out, int(rng.integers(1, 700)))
            received[pos:pos + n] = out[:n, 0]
            pos += n

    threads = [threading.Thread(target=produce), threading.Thread(target=consume)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    np.testing.assert_array_equal(received, seq[:, 0])


def test_read_side_allocates_no_sample_memory():
    rb = RingBuffer(48000, 2)
    rb.write(np.ones((48000, 2), np.float32))
    out = np.zeros((512, 2), np.float32)
    rb.read_into(out, 512)
    tracemalloc.start()
    for _ in range(50):
        rb.read_into(out, 512)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 512 * 2 * 4  # less than one block of samples: no copies, only view objects


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="capacity"):
        RingBuffer(0, 1)
    with pytest.raises(ValueError, match="channels"):
        RingBuffer(10, 0)
    with pytest.raises(ValueError, match=r"\(frames, 2\)"):
        RingBuffer(10, 2).write(np.zeros(5, np.float32))
