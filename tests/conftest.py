"""Session fixtures: tiny checkpoints are built once per test session and shared."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

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


@contextlib.contextmanager
def _serve(base: Path, model_dir: Path, *extra: str, session_dir: Path | None = None,
           allow_dir: Path | None = None, reply_to: bool = False, exit_code: int | None = 0):
    """`musicbridge serve` on `base`/session (or `session_dir`) with the plain preset in `base`/presets;
    yields (DaemonProcess, OscClient) once it answers /ping.

    allow_dir: passed as the first --allow-dir. reply_to: the client's port is given as --reply-to
    (a DAW's fixed reply port) instead of replies going to the sender. However the block ends, the
    daemon is stopped (SIGTERM, then SIGKILL), reaped and the client's socket closed; when the block
    ended without an error, the daemon's exit status must be `exit_code` (None: not checked).
    """
    from bridge.osc.udp import OscClient
    from tests.bridge.osc_helpers import PLAIN_PRESET, DaemonProcess

    presets = base / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    args = [*(("--allow-dir", str(allow_dir)) if allow_dir is not None else ())]
    client = OscClient("127.0.0.1", 0) if reply_to else None
    if client is not None:
        args += ["--reply-to", f"127.0.0.1:{client.port}"]
    try:
        d = DaemonProcess(model_dir, session_dir or base / "session", presets, *args, *extra)
    except BaseException:
        if client is not None:
            client.sock.close()
        raise
    if client is None:
        client = d.client()
    else:
        client.target = ("127.0.0.1", d.port)
    try:
        d.wait_ready(client)
        yield d, client
    finally:
        rc = d.stop()
        client.sock.close()
    if exit_code is not None:
        assert rc == exit_code, f"the daemon exited {rc}, not {exit_code}:\n{d.log_text()[-3000:]}"


@pytest.fixture(scope="session")
def serve_daemon():
    """The one way tests start the real daemon: `with serve_daemon(base, model_dir, *extra) as (d, c):`
    (see `_serve` for the keywords). A session-scoped factory so module-scoped fixtures can use it."""
    return _serve
