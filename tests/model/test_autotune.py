"""`--dtype auto` on the CPU, driven through `musicbridge generate` and `musicbridge bench`.

The measurement itself is timing, so no test asserts which precision is fastest; they check
what the product does with a measurement: it is made once and cached per machine/shape, the
pick is the fastest precision within the quality bound, and the log says what and why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from model.decode.precision import CPU_CANDIDATES, within_bound


def _env(cache_home) -> dict:
    env = dict(os.environ)
    env.pop("MUSICBRIDGE_CACHE", None)
    env["XDG_CACHE_HOME"] = str(cache_home)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _generate(model_dir, out, cache_home, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", "generate", "--model", str(model_dir), "--prompt", "lofi beat",
         "--seconds", "0.2", "--out", str(out), "--seed", "1", *extra],
        capture_output=True, text=True, timeout=300, env=_env(cache_home))


def _auto_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("dtype auto:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _key(model_dir) -> str:
    """The cache key the subprocess computes (same CPU, torch, thread count, shapes)."""
    code = ("import torch; torch.set_num_threads(1); from transformers import MusicgenForConditionalGeneration as M;"
            "from model.decode.decoder import DecoderSpec; from model.decode.autotune import cache_key;"
            f"print(cache_key(DecoderSpec.of_hf(M.from_pretrained({str(model_dir)!r}))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=_env("/nonexistent"))
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_generate_auto_measures_once_then_reads_the_cache(tmp_path, tiny_model_dir):
    r = _generate(tiny_model_dir, tmp_path / "a.wav", tmp_path / "xdg")
    assert r.returncode == 0, r.stderr
    first = _auto_line(r.stderr)
    assert "measured now" in first
    cache = tmp_path / "xdg" / "musicbridge" / "autotune.json"
    data = json.loads(cache.read_text())
    (key, entry), = data["entries"].items()
    import torch

    assert torch.__version__ in key and "d32-h4-f64-l2-k4-v64" in key
    assert set(entry["timings_ms"]) == set(CPU_CANDIDATES)
    assert all(v > 0 for v in entry["timings_ms"].values())
    picked = first.split()[2]
    assert picked in CPU_CANDIDATES and within_bound(picked)

    r2 = _generate(tiny_model_dir, tmp_path / "b.wav", tmp_path / "xdg")
    assert r2.returncode == 0, r2.stderr
    second = _auto_line(r2.stderr)
    assert "cached measurement" in second and second.split()[2] == picked
    assert json.loads(cache.read_text()) == data  # not measured again
    assert (tmp_path / "b.wav").stat().st_size > 0


@pytest.mark.parametrize("fastest_allowed", [p for p in CPU_CANDIDATES if within_bound(p)])
def test_auto_picks_the_fastest_precision_within_the_bound(tmp_path, tiny_model_dir, fastest_allowed):
    """Planted measurements: the pick follows them, and never crosses the quality bound."""
    timings = {p: 10.0 + i for i, p in enumerate(CPU_CANDIDATES)}
    timings[fastest_allowed] = 2.0
    for p in CPU_CANDIDATES:  # anything over the bound is made faster still: it must be skipped
        if not within_bound(p):
            timings[p] = 1.0
    cache = tmp_path / "xdg" / "musicbridge" / "autotune.json"
    cache.parent.mkdir(parents=True)
    cache.write_text(json.dumps({"version": 1, "entries": {_key(tiny_model_dir): {"timings_ms": timings}}}))
    r = _generate(tiny_model_dir, tmp_path / "a.wav", tmp_path / "xdg")
    assert r.returncode == 0, r.stderr
    line = _auto_line(r.stderr)
    assert line.startswith(f"dtype auto: {fastest_allowed} - ") and "cached measurement" in line
    for p in CPU_CANDIDATES:
        if not within_bound(p):
            assert "over the bound: " in line and p in line.split("over the bound:")[1]


def test_a_corrupt_cache_is_measured_again(tmp_path, tiny_model_dir):
    cache = tmp_path / "xdg" / "musicbridge" / "autotune.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    r = _generate(tiny_model_dir, tmp_path / "a.wav", tmp_path / "xdg")
    assert r.returncode == 0, r.stderr
    assert "measured now" in _auto_line(r.stderr)
    assert json.loads(cache.read_text())["version"] == 1


def test_explicit_dtype_does_not_measure(tmp_path, tiny_model_dir):
    r = _generate(tiny_model_dir, tmp_path / "a.wav", tmp_path / "xdg", "--dtype", "int8")
    assert r.returncode == 0, r.stderr
    assert "dtype auto" not in r.stderr
    assert not (tmp_path / "xdg" / "musicbridge" / "autotune.json").exists()


def test_bench_prints_the_auto_decision(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--seconds", "0.2",
                        "--dtype", "auto", "--compare", "none", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, env=_env(tmp_path / "xdg"))
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    picked = report["auto"]["dtype"]
    assert within_bound(picked)
    assert f"dtype auto on this machine: **{picked}**" in r.stdout
    assert [x["dtype"] for x in report["results"]] == [picked]
    assert _auto_line(r.stderr).split()[2] == picked
