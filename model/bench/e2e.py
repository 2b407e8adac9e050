"""End to end, as a user runs it: `musicbridge generate` against `transformers` alone.

Each side is a fresh process that loads the checkpoint from disk, generates the same number
of seconds from the same prompt (sampling, top-k 250, guidance 3) and writes a WAV: load,
text encoding, decoding and the codec are all inside the wall time. Peak RSS is each process's
own high-water mark (wait4's rusage), so the two do not mix.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.memory import weight_cache

PROMPT = "lofi hip hop beat with warm piano chords and vinyl crackle"

_REFERENCE = """
import sys, torch, soundfile
from transformers import AutoTokenizer, MusicgenForConditionalGeneration
path, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
model = MusicgenForConditionalGeneration.from_pretrained(path).eval()
tok = AutoTokenizer.from_pretrained(path)
frames = max(1, int(round(seconds * model.config.audio_encoder.frame_rate)))
enc = tok([sys.argv[4]], return_tensors="pt", padding=True)
torch.manual_seed(0)
with torch.inference_mode():
    audio = model.generate(**enc, do_sample=True, top_k=250, guidance_scale=3.0,
                           max_new_tokens=frames + model.decoder.num_codebooks - 1)
soundfile.write(out, audio[0].float().numpy().T, model.config.audio_encoder.sampling_rate)
"""


def _timed(cmd: list[str], env: dict) -> dict:
    """Run `cmd`; wall seconds, peak RSS MB and its stderr."""
    with tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        text = err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {text.strip()[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024.0, "stderr": text}


def compare(model_dir: str, seconds: float, log=print, dtypes: tuple[str, ...] = (), pairs: int = 1) -> dict:
    """Both sides on `model_dir`: ours with default flags, then once with `--dtype D` for each
    of `dtypes` (for the peak memory of each precision), then `transformers` alone; with
    `pairs` > 1, ours with default flags and `transformers` again, alternated, until there are
    `pairs` of each (in the order ABBA...), and the medians are the result (a VM's speed drifts
    over a minute).

    Ours runs first as a checkpoint's first load does (the converted-weights cache off, so it
    converts), then once untimed to record the converted weights, then timed as every later
    load runs (model/memory/weight_cache.py); each run says whether it read them from the cache."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")

    if not weight_cache.enabled():
        env.pop("MUSICBRIDGE_WEIGHT_CACHE")  # on for the timed runs (a folder given there is kept)
    runs = []
    with tempfile.TemporaryDirectory(prefix="musicbridge-e2e-") as tmp:
        def ours(flags: tuple[str, ...], extra_env: dict | None = None, timed: bool = True) -> dict:
            cmd = [sys.executable, "-m", "bridge.cli", "generate", "--model", model_dir, "--prompt", PROMPT,
                   "--seconds", f"{seconds:g}", "--seed", "0", "--out", str(Path(tmp) / "ours.wav"),
                   "--overwrite", *flags]
            r = _timed(cmd, {**env, **(extra_env or {})})
            auto = [ln for ln in r["stderr"].splitlines() if ln.startswith("dtype auto:")]
            how = re.search(r"weights (mapped|read) from the cache", r["stderr"])
            cached = how is not None
            if timed:
                log(f"  {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB"
                    + (f", converted weights {how.group(1)} from the cache" if cached else ""))
            return {"flags": list(flags), "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                    "auto": auto[0] if auto else None, "weights_cached": cached,
                    "weights_mapped": cached and how.group(1) == "mapped"}

        log(f"end to end: musicbridge generate --seconds {seconds:g}, a first load (weight cache off) ...")
        first = ours((), {"MUSICBRIDGE_WEIGHT_CACHE": "0"})
        log("end to end: recording the converted weights (untimed) ...")
        for flags in [()] + [("--dtype", d) for d in dtypes]:
            ours(flags, timed=False)
        for flags in [()] + [("--dtype", d) for d in dtypes]:
            log(f"end to end: musicbridge generate --seconds {seconds:g} {' '.join(flags)}...")
            runs.append(ours(flags))
        defaults, refs = [runs[0]], []

        def reference() -> None:
            log(f"end to end: transformers alone, {seconds:g} s ...")
            ref = _timed([sys.executable, "-c", _REFERENCE, model_dir, f"{seconds:g}", str(Path(tmp) / "ref.wav"),
                          PROMPT], env)
            log(f"  {ref['wall_s']:.1f} s, peak RSS {ref['peak_rss_mb']:.0f} MB")
            refs.append({k: v for k, v in ref.items() if k != "stderr"})

        for i in range(max(1, pairs)):
            if i % 2:  # ours, reference; reference, ours; ...: a steady drift cancels out
                reference()
            if i:
                log(f"end to end: musicbridge generate --seconds {seconds:g} (pair {i + 1} of {pairs}) ...")
                defaults.append(ours(()))
            if not i % 2:
                reference()
    ref = _median(refs)
    runs[0] = best = _median(defaults)
    return {"seconds": seconds, "model": model_dir, "flags": [], "ours": best, "runs": runs, "first_load": first,
            "transformers": ref, "pairs": [[o["wall_s"], r["wall_s"]] for o, r in zip(defaults, refs)],
            "speedup": ref["wall_s"] / best["wall_s"], "first_load_speedup": ref["wall_s"] / first["wall_s"],
            "auto": best["auto"]}


def _median(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one of an even number)."""
    return sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2]


def table(e: dict) -> str:
    t = e["transformers"]
    lines = [f"End to end, {e['seconds']:g} s of audio, load included, one process each:", "",
             "| run | wall s | peak RSS MB | speed-up |", "|---|---|---|---|",
             f"| transformers alone | {t['wall_s']:.1f} | {t['peak_rss_mb']:.0f} | 1.00x |"]
    first = [dict(e["first_load"], label="(default flags, first load: weight cache off)")] if "first_load" in e else []
    for r in first + e.get("runs", [e["ours"]]):
        flags = r.get("label") or " ".join(r.get("flags", [])) or "(default flags)"
        lines.append(f"| musicbridge generate {flags} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} "
                     f"| {t['wall_s'] / r['wall_s']:.2f}x |")
    if len(e.get("pairs", [])) > 1:
        lines += ["", f"Default flags and transformers alternated {len(e['pairs'])} times; the rows above are "
                      "the medians. Each pair (ours / transformers, speed-up): "
                      + ", ".join(f"{o:.1f} / {r:.1f} s ({r / o:.2f}x)" for o, r in e["pairs"])]
    if e.get("auto"):
        lines += ["", e["auto"]]
    return "\n".join(lines)
