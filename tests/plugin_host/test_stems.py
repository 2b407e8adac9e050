"""Stem files: exact length and format from the header, BWF time reference, sidecars, atomicity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pedalboard.io import AudioFile

from audiofile import read_audio
from plugin_host.bwf import read_bext, wav_format
from plugin_host.chain import build_chain, process_chunks
from plugin_host.stems import StemError, audio_sha256, sidecar_path, write_stem
from plugin_host.tempo import TimeSignature, bars_to_samples

SR = 32000
ROOT = Path(__file__).resolve().parents[2]


def tone(seconds: float, channels: int = 1) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    x = 0.3 * np.sin(2 * np.pi * 220.0 * t) + 0.05 * np.random.default_rng(0).standard_normal(t.size)
    return np.repeat(x[None, :].astype(np.float32), channels, axis=0)


def test_four_bar_stem_at_120_bpm_is_exactly_8_seconds_24_bit_48k(tmp_path):
    n = bars_to_samples(4, 120, TimeSignature(4, 4), 48000)
    path = write_stem(tone(8.0, 2), SR, tmp_path, "drums", {"prompt": "drums, 120 bpm", "seed": 7},
                      samples=n)
    assert path == tmp_path / "drums.wav"
    fmt = wav_format(path)  # straight from the RIFF header
    assert fmt["sample_rate"] == 48000 and fmt["bits_per_sample"] == 24 and fmt["channels"] == 2
    assert fmt["frames"] == 384000
    assert fmt["frames"] / fmt["sample_rate"] == 8.0
    with AudioFile(str(path)) as f:
        assert f.frames == 384000 and f.samplerate == 48000 and f.file_dtype == "int24"


def test_bext_time_reference_is_the_start_sample_at_the_stem_rate(tmp_path):
    path = write_stem(tone(1.0), SR, tmp_path, "bass", {"prompt": "synth bass", "seed": 3},
                      start_seconds=4.0)
    bext = read_bext(path)
    assert bext["time_reference"] == 4 * 48000
    assert bext["description"] == "synth bass" and bext["originator"] == "musicbridge"
    assert bext["version"] == 1
    raw = path.read_bytes()
    assert raw[12:16] == b"bext" and raw.index(b"bext") < raw.index(b"fmt ") < raw.index(b"data")
    assert int.from_bytes(raw[4:8], "little") == len(raw) - 8  # RIFF size stays right
    audio, rate = read_audio(path)  # other readers still see plain PCM
    assert rate == 48000 and audio.shape == (1, 48000)


def test_audio_survives_the_round_trip_at_24_bit(tmp_path):
    x = tone(0.5)
    path = write_stem(x, SR, tmp_path, "same-rate", {}, target_rate=SR)
    y, rate = read_audio(path)
    assert rate == SR
    assert np.abs(y - x).max() < 2.0 ** -22  # 24-bit quantisation, nothing else


def test_flac_stems_are_24_bit_and_carry_the_same_sidecar(tmp_path):
    path = write_stem(tone(1.0), SR, tmp_path, "pad", {"prompt": "pad"}, fmt="flac")
    assert path.name == "pad.flac"
    with AudioFile(str(path)) as f:
        assert f.samplerate == 48000 and f.frames == 48000 and f.file_dtype == "int24"
    meta = json.loads(sidecar_path(path).read_text())
    assert meta["file"]["format"] == "flac" and meta["file"]["name"] == "pad.flac"


def test_sidecar_holds_the_request_and_describes_the_file(tmp_path):
    x = tone(2.0)
    info = {"model": {"label": "tiny"}, "prompt": "lofi drums, 90 bpm", "preset": "lofi_drums",
            "params": {"guidance": 3.0}, "seed": 11, "tempo": 90.0, "time_signature": "4/4",
            "start_bar": 5, "melody": None}
    path = write_stem(x, SR, tmp_path, "drums", info, start_seconds=10.0 + 2.0 / 3.0)
    meta = json.loads((tmp_path / "drums.json").read_text())
    for k, v in info.items():
        assert meta[k] == v
    f = meta["file"]
    assert f["name"] == path.name and f["samples"] == 96000 and f["sample_rate"] == 48000
    assert f["bit_depth"] == 24 and f["time_reference"] == 512000
    assert f["source_sha256"] == audio_sha256(x) and f["source_samples"] == x.shape[1]
    assert 0.3 < f["peak"] < 0.6


def test_names_are_numbered_and_nothing_is_overwritten(tmp_path):
    first = write_stem(tone(0.2), SR, tmp_path, "lead", {"take": 1})
    before = first.read_bytes()
    second = write_stem(tone(0.3), SR, tmp_path, "lead", {"take": 2})
    (tmp_path / "lead-3.json").write_text("{}")  # a stray sidecar also blocks its number
    third = write_stem(tone(0.2), SR, tmp_path, "lead", {"take": 3}, fmt="flac")
    assert [first.name, second.name, third.name] == ["lead.wav", "lead-2.wav", "lead-4.flac"]
    assert first.read_bytes() == before
    assert json.loads((tmp_path / "lead-2.json").read_text())["take"] == 2
    assert json.loads((tmp_path / "lead-3.json").read_text()) == {}
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporaries left


def test_chain_is_applied_block_by_block_before_resampling(tmp_path):
    specs = [{"plugin": "Reverb", "room_size": 0.7}, {"plugin": "Gain", "gain_db": -3.0}]
    x = tone(1.0)
    path = write_stem(x, SR, tmp_path, "wet", {}, target_rate=SR, chain=build_chain(specs), block=777)
    expected = process_chunks(build_chain(specs), x, SR, block=4096)
    y, _ = read_audio(path)
    assert np.abs(y - expected).max() < 2.0 ** -21
    assert np.abs(y - x).max() > 0.05  # the chain did something


@pytest.mark.parametrize("kwargs, match", [
    ({"audio": np.zeros((1, 0), np.float32)}, "at least one sample"),
    ({"audio": np.full((1, 10), np.nan, np.float32)}, "NaN"),
    ({"audio": np.zeros((2, 2, 10), np.float32)}, "channels, samples"),
    ({"fmt": "mp3"}, "wav, flac"),
    ({"basename": "../evil"}, "stem name"),
    ({"basename": ".hidden"}, "stem name"),
    ({"target_rate": 12.5}, "target_rate"),
    ({"start_seconds": -1.0}, "start_seconds"),
    ({"start_seconds": "soon"}, "start_seconds"),
    ({"samples": 0}, "samples"),
    ({"sidecar": {"bad": object()}}, "not plain JSON"),
    ({"sidecar": {"x": float("nan")}}, "not plain JSON"),
])
def test_bad_requests_are_refused_and_write_nothing(tmp_path, kwargs, match):
    args = {"audio": tone(0.1), "sidecar": {}, "basename": "x", **kwargs}
    audio, sidecar, basename = args.pop("audio"), args.pop("sidecar"), args.pop("basename")
    with pytest.raises(StemError, match=match):
        write_stem(audio, SR, tmp_path, basename, sidecar, **args)
    assert os.listdir(tmp_path) == []


def test_missing_or_unwritable_folders_are_named(tmp_path):
    with pytest.raises(StemError, match=r"output folder .*nowhere does not exist"):
        write_stem(tone(0.1), SR, tmp_path / "nowhere", "x", {})
    afile = tmp_path / "file.txt"
    afile.write_text("")
    with pytest.raises(StemError, match=r"output folder .*file\.txt is not a folder"):
        write_stem(tone(0.1), SR, afile, "x", {})
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    target = locked if os.geteuid() != 0 else Path("/sys/fs")  # root ignores permission bits
    try:
        with pytest.raises(StemError, match=rf"output folder {target} is not writable"):
            write_stem(tone(0.1), SR, target, "x", {})
    finally:
        locked.chmod(0o700)
    assert os.listdir(locked) == []


_KILL_SCRIPT = """
import sys, numpy as np
from plugin_host.stems import write_stem
x = (np.random.default_rng(0).standard_normal((2, 32000 * 120)) * 0.1).astype(np.float32)
write_stem(x, 32000, sys.argv[1], "long", {"prompt": "long"})
print("finished", flush=True)
"""


def test_killed_mid_write_leaves_nothing_under_the_final_name(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            parts = [p for p in tmp_path.iterdir() if p.name.startswith(".long.") and p.stat().st_size > 1 << 20]
            if parts:  # the temporary audio file is being written
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "long.wav" not in names and "long.json" not in names
    assert all(n.startswith(".long.") and ".part" in n for n in names)  # only hidden temporaries


@pytest.mark.parametrize("name", ["take\n", "take\r", "ta\0ke", ".hidden", "-dash", "ｔａｋｅ"])
def test_a_stem_name_with_a_control_character_or_look_alike_is_refused_and_nothing_is_written(tmp_path, name):
    with pytest.raises(StemError, match="stem name"):
        write_stem(tone(0.1), SR, tmp_path, name, {})
    assert list(tmp_path.iterdir()) == []
