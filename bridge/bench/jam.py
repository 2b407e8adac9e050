"""`musicbridge bench --jam`: does a jam keep up, and how late is it? Measured on the real path.

Why this way: a jam's speed is not the engine's step speed; its chunks, the stream's
re-prefills, the codec, the chain and the output all take their share. So the bench runs the
product's own Jam into the product's own live output (AudioOutputProcess) on a private JACK
dummy server (no sound card needed; `--audio DEVICE` uses a real one instead), with the real
architecture's shapes and random weights (nothing to download), per precision:

- jam realtime factor (audio seconds per generation second of each chunk; < 1 cannot keep up),
- chunk latency (generation time of a chunk) and first audio of a chunk (time to its first piece),
- first audio after start relative to the bar line it was due on (`first_audio_lead`: how long
  before that bar line the first audio was ready; the part starts on the first bar line it can
  make),
- note-to-audio latency: notes change every few seconds on a live source; from a change at the
  input to the first output sample generated under it. Text-only checkpoints cannot follow
  notes, so this is measured with the same decoder shapes plus MusicGen-Melody's chroma input.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bridge.live.jam import Jam
from bridge.live.notes import LiveMelody
from model.types import SamplingParams
from plugin_host.output import OutputError
from plugin_host.output_process import AudioOutputProcess

PROMPT = "lofi hip hop beat with warm piano chords and vinyl crackle"


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    """`name` set to `value` inside the block, as it was after."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


@contextlib.contextmanager
def jack_dummy(rate: int = 48000, period: int = 256) -> Iterator[str]:
    """A private JACK server with the dummy driver, seen by this process's PortAudio through
    JACK_DEFAULT_SERVER; killed on exit."""
    jackd = shutil.which("jackd")
    if jackd is None:
        raise RuntimeError("jackd is not installed (Debian package jackd2); or pass --audio DEVICE")
    name = f"mbbench-{uuid.uuid4().hex[:8]}"
    with _env("JACK_DEFAULT_SERVER", name):
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([jackd, "--no-realtime", "-n", name, "-d", "dummy", "-r", str(rate), "-p", str(period)],
                                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
        try:
            time.sleep(0.5)
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"jackd exited: {log.read().decode(errors='replace')[-300:]}")
            yield name
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()


def open_output(device, stack: contextlib.ExitStack, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return stack.enter_context(AudioOutputProcess(device=device))
        except OutputError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def build_melody_model(arch: str, text: tuple | None = None):
    """The arch's decoder shapes with MusicGen-Melody's chroma input, random weights; its codec
    and tokenizer are `text`'s (`build_random_model(arch)`, made here when not given)."""
    import torch  # torch loads only where this runs
    # transformers loads only where this runs
    from transformers import MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration

    from model.bench.compare import build_random_model  # torch and transformers load only where this runs

    text_model, tokenizer = text or build_random_model(arch)
    cfg = text_model.config
    dec = MusicgenMelodyDecoderConfig(**{k: v for k, v in cfg.decoder.to_dict().items()
                                         if k in MusicgenMelodyDecoderConfig().to_dict()})
    config = MusicgenMelodyConfig(text_encoder=cfg.text_encoder.to_dict(), audio_encoder=cfg.audio_encoder.to_dict(),
                                  decoder=dec.to_dict(), num_chroma=12, chroma_length=235)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MusicgenMelodyForConditionalGeneration(config).eval()
    model.audio_encoder.load_state_dict(text_model.audio_encoder.state_dict())
    g = model.generation_config
    g.pad_token_id = g.bos_token_id = g.decoder_start_token_id = cfg.decoder.pad_token_id
    return model, tokenizer


def _engine(folder: Path, dtype: str, compute: str = "cpu"):
    from model.engine import Engine  # torch loads only where this runs

    eng = Engine.load(str(folder), device=compute, dtype=dtype)
    if eng.weight_writer is not None:
        eng.weight_writer.join()
    return eng


def jam_run(engine, out, seconds: float, tempo: float, chunk_bars: int, notes: bool,
            log: Callable[[str], None]) -> dict[str, Any]:
    """One jam for `seconds` of music; with `notes`, a player changes note every 2.5 s."""

    clock = (lambda: out.position / out.samplerate)
    melody = LiveMelody(clock) if notes else None
    latencies: list[float] = []
    stop = threading.Event()

    def player() -> None:
        pitches = [60, 67, 64, 69, 62, 65]
        i = 0
        while not stop.wait(2.5):
            melody.all_off()
            melody.note_on(pitches[i % len(pitches)])
            i += 1

    def on_chunk(entry):
        if notes and entry.get("note_latency") is not None:
            latencies.append(entry["note_latency"])

    list(engine.live_stream(PROMPT, SamplingParams(seed=1), context_seconds=1.0).advance(3))  # warm-up
    clock_start = clock()  # no note the run plays is older than this
    if melody is not None:
        melody.note_on(60)
    t0 = time.monotonic()
    jam = Jam(engine, out, "bench", PROMPT, melody=melody, params=SamplingParams(seed=0),
              tempo=tempo, chunk_bars=chunk_bars, context_seconds=4.0, on_chunk=on_chunk)
    threads = [threading.Thread(target=player, daemon=True)] if notes else []
    with jam:
        jam.start()
        for t in threads:
            t.start()
        first_audio_at = None
        deadline = t0 + max(180.0, 20.0 * seconds)  # a jam 20x slower than real time is reported as such
        while time.monotonic() < deadline and jam.status()["produced_seconds"] < seconds:
            st = jam.status()
            if first_audio_at is None and st["state"] == "playing":
                first_audio_at = time.monotonic() - t0
            if st["state"] == "failed":
                raise RuntimeError(f"the jam failed: {st['error']}")
            time.sleep(0.05)
        stop.set()
        status = jam.status()
        hist = list(jam.history)
        # Bounds of any note-to-audio latency of this run, on the output clock: a change's first
        # sample plays at least the jam's output margin after the read that took it in, and no
        # later than the last sample handed to the output.
        margin = jam._margin()
        track = jam._track
        played_until = (None if track is None else
                        track.start_frame / out.samplerate + jam._fed / engine.sample_rate)
        jam.stop()
        jam.wait(10)
    steady = hist[1:] or hist  # the first chunk includes the first prefill

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    res = {
        "chunks": len(hist), "produced_seconds": status["produced_seconds"],
        "rtf_median": med(h["realtime_factor"] for h in steady),
        "rtf_min": min((h["realtime_factor"] for h in steady), default=None),
        "chunk_latency_median": med(h["generate_seconds"] for h in steady),
        "chunk_first_audio_median": med(h["first_audio_seconds"] for h in steady),
        "first_audio_after_start": first_audio_at,
        "first_audio_lead": status["first_audio_lead"],
        "underruns": status["underruns"], "behind_events": status["behind_events"],
        "prefills": status["prefills"],
        "note_latency_median": statistics.median(latencies) if latencies else None,
        "note_latencies": latencies,
        "note_latency_bounds": [margin, None if played_until is None else played_until - clock_start],
        "codec_stream": type(jam._decoder).__name__,  # which streaming codec served (model/codec/codes.py)
    }
    if not hist:
        log(f"  no chunk finished within {deadline - t0:.0f} s: this precision cannot jam on this machine")
    else:
        log(f"  {len(hist)} chunks, rtf {res['rtf_median']:.2f} (min {res['rtf_min']:.2f}), "
            f"chunk latency {res['chunk_latency_median']:.2f} s, underruns {res['underruns']}"
            + (f", note->audio {res['note_latency_median']:.2f} s" if latencies else ""))
    return res


def run(arch: str, dtypes: list[str], seconds: float, tempo: float, chunk_bars: int, device,
        notes: bool, log: Callable[[str], None], model_dir: str | None = None,
        compute: str = "cpu") -> dict[str, Any]:
    """`model_dir`: the text checkpoint to jam with (default: `arch`'s shapes, random weights).
    `compute`: where the engine runs (cpu, or cuda[:N])."""
    # torch and transformers load only where this runs
    from model.bench.compare import build_random_model, machine, write_checkpoint

    report: dict[str, Any] = {"arch": arch, "seconds": seconds, "tempo": tempo, "chunk_bars": chunk_bars,
                              "machine": machine(), "runs": [], "compute": compute}
    with contextlib.ExitStack() as stack:
        if device == "jack-dummy":
            stack.enter_context(jack_dummy())
            device = None
        out = open_output(device, stack)
        report["device"] = out.device_name
        log(f"output: {out.device_name} ({out.samplerate} Hz)")
        t = time.perf_counter()
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="musicbridge-jam-bench-")))
        # the random checkpoints' converted weights go with them, not into the user's cache
        stack.enter_context(_env("MUSICBRIDGE_WEIGHT_CACHE", str(tmp / "weights")))
        # Checkpoint folders, so the engines load as `musicbridge serve --model` does (our
        # loader, our streaming codec, the weight cache), not from in-memory `transformers`
        # objects, whose codec streams by re-decoding a window (model/codec/codes.py).
        text = Path(model_dir) if model_dir else None
        if text is None or notes:
            model, tok = build_random_model(arch)
            if text is None:
                text = write_checkpoint(model, tok, tmp / "text")
            melody = write_checkpoint(*build_melody_model(arch, (model, tok)), tmp / "melody") if notes else None
            del model
            log(f"wrote {arch} with random weights in {time.perf_counter() - t:.1f} s")
        for dtype in dtypes:
            log(f"{dtype}: text-only jam, {seconds:g} s")
            eng = _engine(text, dtype, compute)
            row = {"dtype": dtype, **jam_run(eng, out, seconds, tempo, chunk_bars, False, log)}
            del eng
            if notes:
                log(f"{dtype}: melody-input jam (note-to-audio latency), {seconds:g} s")
                meng = _engine(melody, dtype, compute)
                m = jam_run(meng, out, seconds, tempo, chunk_bars, True, log)
                row["note_latency_median"] = m["note_latency_median"]
                row["note_latencies"] = m["note_latencies"]
                row["note_latency_bounds"] = m["note_latency_bounds"]
                row["melody_rtf_median"] = m["rtf_median"]
                del meng
            report["runs"].append(row)
    return report


def table(report: dict[str, Any]) -> str:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = ["| dtype | jam RTF (median / min) | chunk latency | chunk first audio | first audio before its bar line "
             "| underruns | behind events | note-to-audio (melody input) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        lines.append(f"| {r['dtype']} | {f(r['rtf_median'])} / {f(r['rtf_min'])} | {f(r['chunk_latency_median'])} s "
                     f"| {f(r['chunk_first_audio_median'])} s | {f(r['first_audio_lead'])} s "
                     f"(after {f(r['first_audio_after_start'])} s) | {r['underruns']} | {r['behind_events']} "
                     f"| {f(r.get('note_latency_median'))} s |")
    return "\n".join(lines)
