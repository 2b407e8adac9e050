"""`musicbridge bench --jam` (bridge/bench/jam.py) jams through the product's own loading path."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_bench_jam_loads_a_checkpoint_as_serve_does_and_reports_each_field(tmp_path, tiny_model_dir):
    """With --model the text jam runs on that checkpoint, loaded by our loader: its codec streams
    with the decoder's state carried (StatefulDecoder), not by re-decoding a window, as
    `musicbridge serve --model DIR` would stream it."""
    out = tmp_path / "jam.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--jam", "--arch", "tiny", "--dtype", "float32",
                        "--jam-seconds", "3", "--no-notes", "--model", str(tiny_model_dir), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| float32 |" in r.stdout
    (run,) = json.loads(out.read_text())["runs"]
    assert run["codec_stream"] == "StatefulDecoder"
    assert run["chunks"] >= 1 and run["produced_seconds"] >= 3
    assert math.isfinite(run["rtf_median"]) and run["rtf_median"] > 0


def test_bench_jam_writes_random_checkpoints_for_both_jams_by_default(tmp_path):
    """Without --model the bench writes --arch's shapes with random weights (text and melody) and
    loads them the same way; the melody run measures note-to-audio latency."""
    out = tmp_path / "jam.json"
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "bench", "--jam", "--arch", "tiny", "--dtype", "float32",
                        "--jam-seconds", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (run,) = json.loads(out.read_text())["runs"]
    assert run["codec_stream"] == "StatefulDecoder"
    assert run["melody_rtf_median"] > 0
    # The note-to-audio column is a number, between what the jam guarantees: a change plays at
    # least the output margin after the read that took it in, and within what was played.
    row = next(line for line in r.stdout.splitlines() if line.startswith("| float32 |"))
    cell = row.strip(" |").split("|")[-1].strip()
    assert cell.endswith(" s") and math.isfinite(float(cell[:-2]))
    lats, (lo, hi) = run["note_latencies"], run["note_latency_bounds"]
    assert lats and 0 < lo < hi
    assert lo - 1e-3 <= min(lats) <= run["note_latency_median"] <= max(lats) <= hi + 1e-3
    assert abs(float(cell[:-2]) - run["note_latency_median"]) <= 0.005
