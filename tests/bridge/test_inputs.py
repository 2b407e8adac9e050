"""bridge.osc.input_files in-process: reads come from the checked descriptor, stop on cancel, and never block on a FIFO."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from bridge.osc.input_files import InputLimits, open_input, pinned, read_audio
from bridge.osc.paths import PathPolicy
from bridge.osc.protocol import ProtocolError


def _take(path, seconds=3.0, rate=8000):
    from audiofile import write_audio

    write_audio(path, np.full((1, int(seconds * rate)), 0.1, np.float32), rate)


def test_read_audio_reads_the_whole_take_and_stops_when_cancelled(tmp_path):
    take = tmp_path / "take.wav"
    _take(take)
    policy = PathPolicy([tmp_path])
    audio, rate = read_audio(take, policy, InputLimits())
    assert rate == 8000 and audio.shape == (1, 24000)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ProtocolError, match="cancelled"):
        read_audio(take, policy, InputLimits(), cancel)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # nobody writes: a blocking open would wait forever
    with pytest.raises(ProtocolError, match="FIFO"):
        with open_input(fifo, PathPolicy([tmp_path])):
            pass


def test_pinned_name_keeps_reading_the_checked_file_after_a_swap(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "tune.mid").write_bytes(b"inside")
    (outside / "secret.mid").write_bytes(b"outside")
    with pinned(root / "tune.mid", PathPolicy([root])) as p:
        assert p.suffix == ".mid"
        (root / "tune.mid").unlink()
        (root / "tune.mid").symlink_to(outside / "secret.mid")
        assert p.read_bytes() == b"inside"
    with pytest.raises(ProtocolError, match="outside the allowed folders") as e:
        with pinned(root / "tune.mid", PathPolicy([root])):
            pass
    assert e.value.code == "bad_path"
