"""The benchmark runs end to end (on the tiny architecture) and reports every field."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def test_bench_tiny_reports_every_field(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--seconds", "0.3",
                        "--dtype", "float32,int8", "--quality", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| transformers.generate |" in r.stdout and "vs transformers" in r.stdout
    report = json.loads(out.read_text())
    from model.kernels import gemv  # the report names whose threads ran the kernels' regions

    if gemv.available():
        assert report["machine"]["kernel_threads"] == ("own pool" if gemv.own_pool() else "OpenMP runtime")
        assert report["machine"]["int_kernels"] == gemv.int_arch()
    names = [(x["name"], x["dtype"]) for x in report["results"]]
    assert names == [("transformers.generate", "float32"), ("musicbridge", "float32"), ("musicbridge", "int8")]
    for res in report["results"]:
        for key in ("ms_per_step_median", "wall_s", "rtf", "peak_rss_mb"):
            assert math.isfinite(res[key]) and res[key] > 0, key
    for res in report["results"][1:]:
        assert res["steps"] == 15 + 3  # frames + delay steps
        for key in ("ttfa_s", "first_chunk_decode_ms", "last_chunk_decode_ms", "floor_ms_per_step"):
            assert res[key] is not None and math.isfinite(res[key]) and res[key] > 0, key
    (q,) = report["quality"]
    assert q["dtype"] == "int8" and 0 < q["max_rel_error"] < 1 and 0 < q["argmax_agreement"] <= 1
    assert report["bandwidth_gbs"] > 0


def test_bench_rejects_unknown_dtype():
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--dtype", "int3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "int3" in r.stderr and "Traceback" not in r.stderr


def test_bench_names_the_precisions_this_device_runs():
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--dtype", "float16"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unsupported on the CPU: float16" in r.stderr and "int8" in r.stderr


def test_bench_on_a_missing_gpu_is_a_usage_error():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("this machine has a CUDA GPU: there `--device cuda` runs (tests/model/test_cuda_step.py)")
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--device", "cuda"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--device: device 'cuda' asked for, but torch sees no CUDA GPU" in r.stderr


def test_bench_variations_and_both_quality_proxies(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--seconds", "0.2",
                        "--dtype", "int8,int4", "--compare", "none", "--variations", "1,2", "--together", "1,3", "--quality",
                        "--proxy-steps", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert [v["n"] for v in report["variations"]] == [1, 2]
    assert report["variations"][0]["vs_one"] == 1.0 and report["variations"][1]["vs_one"] > 0
    assert [(v["n"], v["dtype"]) for v in report["together"]] == [(1, "int8"), (3, "int8")]
    assert report["together"][0]["vs_one"] == 1.0 and report["together"][1]["ms_per_pass_median"] > 0
    rows = {(q["proxy"], q["dtype"]) for q in report["quality"]}
    assert rows == {("random", "int8"), ("random", "int4"), ("trained", "int8"), ("trained", "int4")}
    for q in report["quality"]:
        assert 0 <= q["topk250_kl"] < 10 and 0 <= q["greedy_agreement"] <= 1 and 0 < q["max_rel_error"] < 1
    assert report["proxy"]["steps"] == 3 and math.isfinite(report["proxy"]["final_loss"])
    assert "| trained | int8 |" in r.stdout and "| variations (one batched pass) |" in r.stdout
    assert "| jams stepping together (one decoder pass) |" in r.stdout


def test_bench_end_to_end_against_transformers(tmp_path):
    out = tmp_path / "e2e.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--arch", "tiny", "--e2e", "0.2",
                        "--e2e-dtype", "int8", "--e2e-pairs", "2", "--json", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    e = json.loads(out.read_text())["e2e"]
    for side in ("ours", "transformers"):
        assert e[side]["peak_rss_mb"] > 50
    assert e["auto"] and e["auto"].startswith("dtype auto: ")  # default flags: auto was decided
    assert "| transformers alone |" in r.stdout and "| musicbridge generate (default flags) |" in r.stdout
    assert [x["flags"] for x in e["runs"]] == [[], ["--dtype", "int8"]]
    # Two alternated pairs; the reported ones are their medians (the lower of two).
    assert len(e["pairs"]) == 2 and e["ours"]["wall_s"] == min(o for o, _ in e["pairs"])
    assert e["transformers"]["wall_s"] == min(r for _, r in e["pairs"])
    assert "alternated 2 times" in r.stdout
    # A first load first: the converted-weights cache off, so nothing was read from it; the
    # timed int8 run after the untimed recording reads them (where the C kernels convert).
    assert e["first_load"]["weights_cached"] is False
    # the reported speedups are the transformers run's time over these runs' times
    t = e["transformers"]["wall_s"]
    assert e["speedup"] == pytest.approx(t / e["ours"]["wall_s"])
    assert e["first_load_speedup"] == pytest.approx(t / e["first_load"]["wall_s"])
    from model.kernels import gemv

    assert e["runs"][1]["weights_cached"] is gemv.available()
    assert "| musicbridge generate (default flags, first load: weight cache off) |" in r.stdout
    assert e["runs"][1]["auto"] is None and e["runs"][1]["peak_rss_mb"] > 50


def test_the_floor_counts_what_a_step_reads(tiny_engine):
    """Cross-attention's key and value projections run once on the text, not each step; with
    folding its query and output projections give way to the folded keys and values."""
    from model.bench.compare import weight_bytes

    lm = tiny_engine.lm

    def size(part: str) -> int:
        return sum(t.nbytes for layer in lm.layers for t in [*getattr(layer, part).parameters(),
                                                              *getattr(layer, part).buffers()])

    every = sum(t.nbytes for n, t in [*lm.named_parameters(), *lm.named_buffers()]
                if n not in ("positions", "offsets") and not n.startswith("embed"))
    assert weight_bytes(lm) == every - size("cross_k") - size("cross_v")
    assert weight_bytes(lm, 1000) == weight_bytes(lm) - size("cross_q") - size("cross_out") + 1000
