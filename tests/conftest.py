"""Session fixtures: tiny checkpoints are built once per test session and shared."""

from __future__ import annotations

import os
import tempfile

import pytest

# Two cores on CI: keep torch from oversubscribing them while pytest runs.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The tests' own converted-weights records (model/memory/weight_cache.py), not in the user's cache.
os.environ.setdefault("MUSICBRIDGE_WEIGHT_CACHE", tempfile.mkdtemp(prefix="musicbridge-test-weights-"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from model.load.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_wide_model_dir(tmp_path_factory):
    """The tiny checkpoint with a 128-wide decoder: the C decode step runs on it (32 is too narrow)."""
    from model.load.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-wide", width=128)


@pytest.fixture(scope="session")
def tiny_melody_dir(tmp_path_factory):
    from model.load.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-melody", melody=True)


@pytest.fixture(scope="session")
def tiny_wide_melody_dir(tmp_path_factory):
    """The tiny melody checkpoint with a 128-wide decoder: the C decode step (and jams sharing its
    passes) runs on it."""
    from model.load.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-wide-melody", melody=True, width=128)


@pytest.fixture(scope="session")
def tiny_stereo_dir(tmp_path_factory):
    from model.load.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-stereo", stereo=True)


@pytest.fixture(scope="session")
def real_shape_codec():
    """`transformers`' EnCodec at MusicGen's 32 kHz shapes, random weights and codebooks
    (nothing to download)."""
    import torch
    from transformers import EncodecModel

    from model.codec.codes import musicgen_32k_config
    from model.load.tiny import randomize_codebooks

    with torch.random.fork_rng():
        torch.manual_seed(0)
        codec = EncodecModel(musicgen_32k_config()).eval()
        randomize_codebooks(codec)
    return codec


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from model.engine import Engine

    return Engine.load(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_melody_engine(tiny_melody_dir):
    from model.engine import Engine

    return Engine.load(str(tiny_melody_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def serve_daemon():
    """The one way tests start the real daemon: `with serve_daemon(base, model_dir, *extra) as (d, c):`
    (tests.bridge.osc_helpers.serving, whose keywords it takes). A session-scoped factory so
    module-scoped fixtures can use it."""
    from tests.bridge.osc_helpers import serving

    return serving
