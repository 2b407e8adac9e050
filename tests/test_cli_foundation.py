"""The foundation: the CLI's user errors, tiny checkpoints, and the real loading path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bridge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    """`python -m bridge.cli ...` on this checkout's code, from whatever folder the test is in
    (without PYTHONPATH a test that chdirs would run the installed copy instead). stdout is a
    block-buffered pipe, as in a user's `| tee`: what the command prints must survive its exit."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, "-m", "bridge.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_tiny_model_is_deterministic(tmp_path):
    from safetensors.numpy import load_file

    assert main(["tiny-model", str(tmp_path / "a")]) == 0
    assert main(["tiny-model", str(tmp_path / "b")]) == 0
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_tiny_model_loads_through_from_pretrained(tiny_model_dir, tiny_melody_dir, tiny_stereo_dir):
    from transformers import (AutoTokenizer, MusicgenForConditionalGeneration,
                              MusicgenMelodyForConditionalGeneration)

    m = MusicgenForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert m.config.decoder.num_codebooks == 4 and m.config.audio_encoder.sampling_rate == 32000
    assert m.config.audio_encoder.frame_rate == 50
    mm = MusicgenMelodyForConditionalGeneration.from_pretrained(tiny_melody_dir)
    assert mm.config.num_chroma == 12
    ms = MusicgenForConditionalGeneration.from_pretrained(tiny_stereo_dir)
    assert ms.config.decoder.audio_channels == 2 and ms.config.decoder.num_codebooks == 8
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(["lofi beat with warm piano"]).input_ids[0]
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids


def test_tiny_model_refuses_nonempty_dir(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["tiny-model", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_generate_writes_two_seconds(tiny_model_dir, tmp_path):
    from audiofile import read_audio

    out = tmp_path / "a.wav"
    r = _run("generate", "--model", str(tiny_model_dir), "--prompt", "lofi beat", "--seconds", "2",
             "--out", str(out), "--seed", "3", "--save-tokens", str(tmp_path / "t.npy"))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out} (2.00 s, 32000 Hz, 1 ch)" in r.stdout
    audio, sr = read_audio(out)
    assert sr == 32000
    assert abs(audio.shape[1] - 64000) <= 640
    assert np.isfinite(audio).all() and np.abs(audio).max() > 1e-4
    codes = np.load(tmp_path / "t.npy")
    assert codes.shape == (4, 100) and codes.dtype == np.int64
    assert codes.min() >= 0 and codes.max() < 64


_ENDING = """
import atexit, sys, threading, time
from pathlib import Path
from bridge.cli import end
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
print("printed before the end")  # stdout is a pipe: block-buffered, still in the buffer
if sys.argv[2] == "thread":
    def late():
        time.sleep(0.3)
        (out / "thread").write_text("finished")
    threading.Thread(target=late).start()
end(int(sys.argv[3]))
"""


@pytest.mark.parametrize("thread", ["none", "thread"])
def test_end_keeps_what_an_exit_must_do(tmp_path, thread):
    """`end` skips the interpreter's teardown, not the exit code, the atexit handlers, the
    buffered output or a running non-daemon thread."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("PYTHONUNBUFFERED", None)
    r = subprocess.run([sys.executable, "-c", _ENDING, str(tmp_path), thread, "3"], capture_output=True,
                       text=True, timeout=60, env=env)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "printed before the end\n"
    assert (tmp_path / "atexit").read_text() == "ran"
    if thread == "thread":
        assert (tmp_path / "thread").read_text() == "finished"


def test_generate_resamples(tiny_model_dir, tmp_path):
    from audiofile import read_audio

    out = tmp_path / "a.flac"
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "pad", "--seconds", "1",
                 "--out", str(out), "--sample-rate", "48000", "--seed", "1"]) == 0
    audio, sr = read_audio(out)
    assert sr == 48000 and audio.shape[1] == 48000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/ckpt"], "does not exist"),
        (["--model", "facebook/musicgen-nonexistent"], "not in the local Hugging Face cache"),
        (["--model", "what is this"], "unknown model"),
        (["--out", "x.mp3"], "expected a .wav or .flac"),
        (["--seconds", "-2"], "expected a positive number"),
        (["--seconds", "nan"], "expected a positive number"),
        (["--top-p", "1.5"], "expected a number in [0, 1]"),
        (["--sample-rate", "12"], "--sample-rate must be between"),
        (["--melody", "tune.mid"], "is text-only and cannot follow a melody; use a MusicGen-Melody checkpoint"),
    ],
)
def test_generate_user_errors_exit_2(args, message, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"--model": str(tiny_model_dir), "--prompt": "x", "--out": str(tmp_path / "o.wav"),
            "--seconds": "1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    argv = [a for kv in base.items() for a in kv]
    r = _run("generate", *argv)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o.wav").exists()


def test_broken_model_dir_is_one_line(tmp_path):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    r = _run("generate", "--model", str(d), "--prompt", "x", "--out", str(tmp_path / "o.wav"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cached_tiny_model_is_rebuilt_when_stale(tmp_path, monkeypatch):
    import json

    from model.load.tiny import TINY_VERSION, cached_tiny_model

    monkeypatch.setenv("MUSICBRIDGE_CACHE", str(tmp_path))
    path = cached_tiny_model()
    marker = json.loads((path / "musicbridge_tiny.json").read_text())
    assert marker["version"] == TINY_VERSION
    marker["version"] = TINY_VERSION - 1  # as an older musicbridge would have left it
    (path / "musicbridge_tiny.json").write_text(json.dumps(marker))
    (path / "stale.txt").write_text("old")
    again = cached_tiny_model()
    assert again == path and not (path / "stale.txt").exists()
    assert json.loads((path / "musicbridge_tiny.json").read_text())["version"] == TINY_VERSION


def test_the_command_line_lists_every_command_without_loading_torch():
    """`musicbridge --help`, `send` and `devices` start in a fraction of a second: building the parser
    (which imports every command module) loads neither torch nor transformers nor Ray."""
    code = ("import sys; from bridge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'ray') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout
