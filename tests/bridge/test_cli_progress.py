"""Long commands show their progress with the time left: a tqdm bar on a terminal (a real pseudo-terminal
here), plain whole lines when the output is a pipe or a file. Real `musicbridge` subprocesses on the
tiny checkpoint; the durations they remember for the next estimate go to a temporary cache."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

from bridge.commands.progress import Progress, Stages, timed
from bridge.stems.render import TrackBars

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                COLUMNS="100")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


def test_generate_through_a_pipe_writes_plain_lines_with_the_time_left(tiny_model_dir, tmp_path):
    out = tmp_path / "a.wav"
    r = subprocess.run(_cli("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                            "--prompt", "x", "--seconds", "20", "--out", str(out), "--seed", "1"),
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "\r" not in err and "\x1b" not in err  # nothing redrawn: every byte is a whole line
    lines = [ln for ln in err.splitlines() if ln.startswith("generating")]
    pcts = [int(m.group(1)) for ln in lines if (m := re.match(r"generating: (\d+)% after [\d.]+ s, about [\d.]+ s left$", ln))]
    assert pcts == sorted(set(pcts)) and len(pcts) >= 5 and all(p % 10 == 0 and 0 < p < 100 for p in pcts), lines
    assert re.match(r"generating: done in [\d.]+ s$", lines[-1]), lines
    assert re.search(rf"loading {re.escape(str(tiny_model_dir))}: done in [\d.]+ s\n", err)
    # the second run knows how long loading took the first time
    r2 = subprocess.run(_cli("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32",
                             "--prompt", "x", "--seconds", "1", "--out", str(tmp_path / "b.wav")),
                        cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0 and re.search(r"loading .*: done in [\d.]+ s \(last time [\d.]+ s\)", r2.stderr), r2.stderr


def test_generate_on_a_terminal_draws_a_bar_with_the_time_left(tiny_model_dir, tmp_path):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a terminal 120 columns wide
    try:
        p = subprocess.Popen(_cli("generate", "--model", str(tiny_model_dir), "--device", "cpu", "--dtype",
                                  "float32", "--prompt", "x", "--seconds", "20", "--out", str(tmp_path / "a.wav")),
                             cwd=ROOT, env=_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            ready, _, _ = select.select([master], [], [], 300)
            if not ready:
                break
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed: the command has exited
                break
            if not data:
                break
            chunks.append(data)
        assert p.wait(60) == 0
    finally:
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\r" in text  # redrawn in place
    assert re.search(r"generating: 100%\|.*\| [\d:]+ spent, [\d:]+ left", text), text[-800:]
    assert "after" not in text  # not the plain lines


def test_tiny_model_and_render_write_plain_lines_through_a_pipe(tiny_model_dir, tmp_path):
    r = subprocess.run(_cli("tiny-model", str(tmp_path / "ckpt")), cwd=ROOT, env=_env(tmp_path),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert re.search(r"^writing the tiny checkpoint: done in [\d.]+ s$", r.stderr, re.M), r.stderr
    session = tmp_path / "song.toml"
    session.write_text(f'model = "{tiny_model_dir}"\ntempo = 120\n\n[[track]]\nname = "drums"\nprompt = "drums"\n'
                       'bars = 8\nseed = 1\n')
    r = subprocess.run(_cli("render", str(session), "--out", str(tmp_path / "stems"), "--device", "cpu", "--dtype",
                            "float32"), cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr
    assert re.search(r"^drums: \d0% after [\d.]+ s, about [\d.]+ s left$", r.stderr, re.M), r.stderr


def test_the_progress_forms_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    s = io.StringIO()
    with Progress("work", parts=2, stream=s, terminal=False) as p:
        for f in (0.1, 0.5, 1.0):
            p(0, f)
            p(1, f)
    lines = s.getvalue().splitlines()
    assert [ln.split("%")[0] for ln in lines[:-1]] == ["work: 10", "work: 30", "work: 50", "work: 70"] and lines[-1].startswith("work: done in")
    s = io.StringIO()
    with Progress("work", stream=s, terminal=True) as p:
        p.to(0.5)
        p.to(1.0)
    assert "100%|" in s.getvalue() and "left" in s.getvalue()
    s = io.StringIO()
    with Stages("bench", 2, stream=s, terminal=False) as st:
        st.log("built tiny with random weights in 0.1 s")
        st.log("memory bandwidth: 3 GB/s")
        st.log("running musicbridge int8 ...")
    out = s.getvalue().splitlines()
    assert out[0].endswith("[bench: step 1 of 2, 0 s spent]") and out[1] == "memory bandwidth: 3 GB/s"
    assert "step 2 of 2" in out[2]
    bars = TrackBars(["a", "bb"], enabled=False, stream=io.StringIO())
    bars.update(0, 0.55)
    bars.update(1, 1.0)
    bars.update(0, 0.56)  # the same tenth: no new line
    assert [ln.split(" after")[0] for ln in bars.stream.getvalue().splitlines()] == ["a: 50%", "bb: done"]
    s = io.StringIO()
    with timed("thinking", "test-key-that-is-not-remembered-anywhere", stream=s, terminal=False):
        pass
    assert re.fullmatch(r"thinking: done in [\d.]+ s\n", s.getvalue())
