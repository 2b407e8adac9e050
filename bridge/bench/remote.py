"""`bench --remote URL`: N jams and M offline jobs at once against a remote engine's replicas.

Each jam is a real `RemoteLiveStream` (one WebSocket held by one replica) driven chunk by chunk as a
jam drives it, its codes decoded here by the codec the daemon uses; the offline jobs are one
`generate_tokens` call (one HTTP request each, batched by Serve on the replicas). Nothing plays:
this measures the engine and the network, not an audio device.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from model.remote.client import RemoteEngine
from model.types import GenerationRequest, SamplingParams


def run(url: str, key: str | None, model: str, jams: int, jobs: int, jam_seconds: float, job_seconds: float,
        chunk_seconds: float = 2.0, log: Callable[[str], None] = print, ca_file: str | None = None,
        codec: bool = True) -> dict[str, Any]:
    """`codec`: decode each jam's codes here as the daemon does (False: measure the engine alone,
    where this machine's cores would otherwise decode for every jam at once)."""
    import torch  # torch loads only where this runs

    engine = RemoteEngine.connect(url, key, model, ca_file=ca_file)
    results: dict[str, Any] = {"url": url, "model": engine.info.label, "device": engine.info.device,
                               "dtype": engine.info.dtype, "jams": [], "jobs": None}
    chunk = engine.frames_for(chunk_seconds)
    errors: list[str] = []

    def jam(i: int) -> None:
        try:
            rec: dict[str, Any] = {"index": i, "chunks": []}
            t_open = time.monotonic()
            with engine.live_stream(f"bench jam {i}", SamplingParams(seed=100 + i), context_seconds=4.0) as s:
                dec = engine.streaming_decoder() if codec else None
                first_audio = None
                decode_s = 0.0
                while s.frames < engine.frames_for(jam_seconds):
                    t0 = time.monotonic()
                    first_piece = None
                    for codes in s.advance(s.frames + chunk, 25, 10):
                        if first_piece is None:
                            first_piece = time.monotonic() - t0
                        if dec is None:
                            continue
                        t1 = time.monotonic()
                        with torch.inference_mode():
                            audio = dec.push(torch.from_numpy(codes))
                        decode_s += time.monotonic() - t1
                        if first_audio is None and audio.shape[1]:
                            first_audio = time.monotonic() - t_open
                    rec["chunks"].append({"seconds": time.monotonic() - t0, "first_piece": first_piece,
                                          "replica_steps": s.replica_steps, "live_steps": s.replica_live_steps,
                                          "passes": s.replica_passes})
                rec.update(first_audio=first_audio, decode_seconds=decode_s, frames=s.frames,
                           replica=s.served_by.replica if s.served_by else None, interruptions=s.interruptions)
            results["jams"].append(rec)
        except Exception as e:  # noqa: BLE001 - reported in the table, the other clients go on
            errors.append(f"jam {i}: {type(e).__name__}: {e}")

    def offline() -> None:
        try:
            reqs = [GenerationRequest("bench job", job_seconds, SamplingParams(seed=7 + j)) for j in range(jobs)]
            t0 = time.monotonic()
            codes = engine.generate_tokens(reqs)
            wall = time.monotonic() - t0
            results["jobs"] = {"n": jobs, "seconds_each": job_seconds, "wall": wall,
                               "audio_per_second": jobs * job_seconds / wall,
                               "frames": [int(c.shape[1]) for c in codes if c is not None]}
        except Exception as e:  # noqa: BLE001
            errors.append(f"offline: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=jam, args=(i,)) for i in range(jams)]
    if jobs:
        threads.append(threading.Thread(target=offline))
    log(f"bench --remote {url}: {jams} jam(s) of {jam_seconds:g} s and {jobs} offline job(s) of {job_seconds:g} s")
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["wall"] = time.monotonic() - t0
    results["errors"] = errors
    for rec in results["jams"]:
        made = rec["frames"] / engine.frame_rate
        gen = sum(c["seconds"] for c in rec["chunks"])
        lat = [c["seconds"] for c in rec["chunks"]]
        rec["realtime_factor"] = made / gen if gen else float("inf")
        rec["chunk_latency_median"] = statistics.median(lat)
        rec["chunk_latency_max"] = max(lat)
        rec["first_piece_median"] = statistics.median(c["first_piece"] for c in rec["chunks"])
        rec["codec_realtime_factor"] = made / rec["decode_seconds"] if rec["decode_seconds"] else None
        rec["steps_per_pass"] = _steps_per_pass(rec["chunks"])
        # What crossed for this jam: 14 bytes of header per piece and int16 codes.
        rec["code_bytes_per_second"] = engine.num_codebooks * 2 * engine.frame_rate
    results["audio_bytes_per_second"] = engine.sample_rate * engine.channels * 4  # float32, were audio sent
    return results


def _steps_per_pass(chunks: list[dict[str, Any]]) -> float | None:
    """Live steps per decoder pass on the jam's replica between its first and last chunk: above 1
    where jams there stepped together (None: nothing counted between them, as with one chunk, or
    counters that went back, as on a new replica)."""
    a, b = chunks[0], chunks[-1]
    if a["passes"] is None or b["passes"] is None:
        return None
    steps, passes = b["live_steps"] - a["live_steps"], b["passes"] - a["passes"]
    return steps / passes if passes > 0 and steps > 0 else None


def table(r: dict[str, Any]) -> str:
    lines = [f"engine {r['model']} on {r['device']} in {r['dtype']} at {r['url']}; all clients at once: "
             f"{r['wall']:.1f} s", "",
             "| client | replica | realtime factor | chunk latency median / max (s) | first piece median (s) | "
             "first audio (s) | codec here (x real time) | replica's jam steps per decoder pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def num(v, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for j in sorted(r["jams"], key=lambda j: j["index"]):
        lines.append(f"| jam {j['index']} | {j['replica']} | {j['realtime_factor']:.2f} | "
                     f"{j['chunk_latency_median']:.2f} / {j['chunk_latency_max']:.2f} | {j['first_piece_median']:.3f} | "
                     f"{num(j['first_audio'], '.2f')} | {num(j['codec_realtime_factor'], '.1f')} | "
                     f"{num(j['steps_per_pass'], '.2f')} |")
    if r["jobs"]:
        o = r["jobs"]
        lines.append(f"| {o['n']} offline x {o['seconds_each']:g} s | (Serve's choice) | "
                     f"{o['audio_per_second']:.2f} s of audio per s | {o['wall']:.1f} s in all | | | | |")
    if r["jams"]:
        lines += ["", f"crossing the network per jam: {r['jams'][0]['code_bytes_per_second']:.0f} B/s of codes "
                      f"(audio would be {r['audio_bytes_per_second']:,} B/s as float32)"]
    lines += [f"error: {e}" for e in r["errors"]]
    return "\n".join(lines)
