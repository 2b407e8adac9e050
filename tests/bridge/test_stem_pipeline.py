"""One stem pipeline: a stem made over OSC (the real daemon, loopback UDP) and one rendered from a
session file are planned, fitted to the bar grid, placed (BWF time reference) and recorded the
same way, and `musicbridge render --from-sidecar` makes either again, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from audiofile import read_audio
from bridge.cli import main
from bridge.osc.udp import OscClient
from plugin_host.bwf import read_bext
from tests.bridge.osc_helpers import drain, expect

DEVICE = ("--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_dir, serve_daemon):
    base = tmp_path_factory.mktemp("pipe")
    with serve_daemon(base, tiny_model_dir, allow_dir=base) as (d, c):
        yield d, c, base


def ok(c: OscClient, address: str, *args) -> None:
    drain(c, 0.05)
    c.send(address, *args)
    r = c.wait_for(lambda a, _: a in ("/ok", "/error"), 10.0)
    assert r is not None and r[0] == "/ok", r


def done_paths(c: OscClient, jobs: list[int], timeout: float = 180.0) -> dict[int, str]:
    out: dict[int, str] = {}
    seen: list = []
    while len(out) < len(jobs):
        r = c.wait_for(lambda a, v: a in ("/job/done", "/error") and bool(v), timeout, seen)
        assert r is not None and r[0] == "/job/done", (r, seen)
        out[r[1][0]] = r[1][1]
    return out


def generate(c: OscClient, address: str, *args) -> int:
    c.send(address, *args)
    return expect(c, "/job/accepted", 30.0)[0]


def regenerate_cli(sidecar: str, capsys) -> Path:
    """`musicbridge render --from-sidecar` must say the audio is identical (exit 0); the new stem."""
    rc = main(["render", "--from-sidecar", sidecar])
    out = capsys.readouterr().out
    assert rc == 0 and "identical to the recorded audio" in out, out
    return Path(out.split("wrote ", 1)[1].split(" (", 1)[0])


def same_stem(a: str | Path, b: str | Path) -> None:
    """Bit for bit: the same samples at the same rate, and the same BWF time reference."""
    xa, ra = read_audio(a)
    xb, rb = read_audio(b)
    assert ra == rb and xa.shape == xb.shape and np.array_equal(xa, xb)
    assert read_bext(a)["time_reference"] == read_bext(b)["time_reference"]


def sidecar(path: str | Path) -> dict:
    return json.loads(Path(path).with_suffix(".json").read_text())


def test_osc_stems_regenerate_bit_for_bit_batched_or_alone(daemon, capsys):
    d, c, base = daemon
    for track in ("slow", "a", "b"):
        ok(c, f"/track/{track}/preset", "plain")
    ok(c, "/track/b/param", "seed", 7)
    ok(c, "/transport/tempo", 120.0)
    slow = generate(c, "/track/slow/generate", 2, "bars")  # keeps the worker busy ...
    a = generate(c, "/track/a/generate", 1.0)  # ... so these two share one engine call
    b = generate(c, "/track/b/generate", 1.0)
    paths = done_paths(c, [slow, a, b])
    side_a, side_b = sidecar(paths[a]), sidecar(paths[b])
    assert side_a["kind"] == side_b["kind"] == "musicbridge.stem" and side_a["job"] == a
    assert len(side_a["batch"]["requests"]) == 2 and side_a["batch"]["requests"] == side_b["batch"]["requests"]
    assert side_b["seed"] == 7 and side_a["seed"] is not None  # a's seed came from its preset
    for job in (slow, a, b):
        again = regenerate_cli(str(Path(paths[job]).with_suffix(".json")), capsys)
        assert again != Path(paths[job]) and again.parent == Path(paths[job]).parent
        same_stem(paths[job], again)


def test_a_drawn_seed_and_a_continuation_regenerate_too(daemon, capsys):
    from audiofile import write_audio

    d, c, base = daemon
    take = base / "take.wav"
    t = np.arange(44100, dtype=np.float32) / 44100
    write_audio(take, (0.3 * np.sin(2 * np.pi * 220 * t))[None, :], 44100)
    ok(c, "/track/free/prompt", "warm pad")  # no preset, no seed: one is drawn and recorded
    ok(c, "/track/more/preset", "plain")
    free = generate(c, "/track/free/generate", 1.0)
    more = generate(c, "/track/more/continue", str(take), 1.0)
    paths = done_paths(c, [free, more])
    assert isinstance(sidecar(paths[free])["seed"], int)
    assert sidecar(paths[more])["continuation"]["sha256"]
    for job in (free, more):
        same_stem(paths[job], regenerate_cli(str(Path(paths[job]).with_suffix(".json")), capsys))
    take.write_bytes(take.read_bytes()[:-2] + b"\x00\x01")  # the take changed: refused, not silently different
    assert main(["render", "--from-sidecar", str(Path(paths[more]).with_suffix(".json"))]) == 2
    assert "has changed since it was recorded" in capsys.readouterr().err


def test_a_session_file_stem_regenerates_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("MUSICBRIDGE_PRESETS", str(tmp_path / "none"))
    song = tmp_path / "song.toml"
    song.write_text('tempo = 96\nsignature = "3/4"\n\n[[track]]\nname = "keys"\nprompt = "soft piano"\n'
                    'bars = 2\nstart_bar = 2\n\n[[track]]\nname = "pad"\nprompt = "pad"\nseconds = 1.0\nloop = false\n')
    assert main(["render", str(song), "--model", str(tiny_model_dir), *DEVICE, "--out", str(tmp_path / "st")]) == 0
    capsys.readouterr()
    for name in ("keys", "pad"):
        stem = tmp_path / "st" / f"{name}.wav"
        same_stem(stem, regenerate_cli(str(stem.with_suffix(".json")), capsys))


def test_osc_stems_get_the_grid_length_and_placement_of_rendered_ones(daemon, tmp_path, tiny_model_dir,
                                                                     monkeypatch, capsys):
    """The same track asked over OSC (transport at bar 3 of 6/8) and in a session file
    (start_bar = 3): same plan, so the same samples, length and BWF time reference."""
    d, c, base = daemon
    ok(c, "/track/six/preset", "plain")
    ok(c, "/transport/tempo", 120.0)
    ok(c, "/transport/signature", 6, 8)
    ok(c, "/transport/locate", 6.0)  # quarter notes: a 6/8 bar is 3 of them, so bar 3 starts here
    job = generate(c, "/track/six/generate", 2, "bars")
    osc_stem = done_paths(c, [job])[job]
    ok(c, "/transport/signature", 4, 4)
    ok(c, "/transport/locate", 0.0)
    monkeypatch.setenv("MUSICBRIDGE_PRESETS", str(base / "presets"))
    song = tmp_path / "six.toml"
    song.write_text('tempo = 120\nsignature = "6/8"\n\n[[track]]\nname = "six"\npreset = "plain"\n'
                    'bars = 2\nstart_bar = 3\n')
    assert main(["render", str(song), "--model", str(tiny_model_dir), *DEVICE, "--out", str(tmp_path / "st")]) == 0
    rendered = tmp_path / "st" / "six.wav"
    osc_side, file_side = sidecar(osc_stem), sidecar(rendered)
    assert read_bext(osc_stem)["time_reference"] == 3 * 48000  # 2 bars of 6/8 at 120 bpm = 3.0 s
    assert osc_side["file"]["samples"] == file_side["file"]["samples"] == 3 * 48000
    assert "grid" in osc_side["result"] and osc_side["render"] == file_side["render"]
    assert osc_side["batch"]["requests"] == file_side["batch"]["requests"]
    same_stem(osc_stem, rendered)
