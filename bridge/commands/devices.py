"""`musicbridge devices`: the audio outputs `serve --audio` can open, the MIDI ports a jam can
follow, and where the model can run (`--device`).

Why all three: setting up a live session means picking an audio device (JACK/PipeWire, CoreAudio,
WASAPI, a loopback device) and a MIDI port, and knowing whether the GPU is used; a missing server,
MIDI API or CUDA build is shown as such, not as a traceback, because it is the most common setup
mistake.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import mido


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "devices", help="list audio devices and MIDI ports",
        description="Audio devices come from PortAudio (sounddevice); MIDI ports from every MIDI API "
                    "python-rtmidi was built with (ALSA, JACK, CoreMIDI, WinMM). Start JACK or "
                    "PipeWire before running this: PortAudio looks for host APIs when it starts.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def audio_devices() -> tuple[list[dict[str, Any]], str | None]:
    """Every PortAudio device with its host API and channel counts; (devices, problem or None)."""
    try:
        import sounddevice as sd  # PortAudio scans the host APIs when imported: only once a server may be up
    except OSError as e:  # libportaudio missing
        return [], f"PortAudio is not available ({e}); install libportaudio2"
    try:
        apis = sd.query_hostapis()
        devs = sd.query_devices()
        default_out = sd.default.device[1]
    except sd.PortAudioError as e:
        return [], f"PortAudio could not list devices ({e})"
    out = []
    for d in devs:
        out.append({
            "index": int(d["index"]), "name": str(d["name"]), "hostapi": str(apis[d["hostapi"]]["name"]),
            "inputs": int(d["max_input_channels"]), "outputs": int(d["max_output_channels"]),
            "samplerate": float(d["default_samplerate"]),
            "latency": float(d["default_low_output_latency"]),
            "default_output": int(d["index"]) == default_out,
        })
    return out, None


def compute_devices() -> tuple[list[dict[str, Any]], str | None]:
    """Where the engine can run: the CPU and each CUDA GPU PyTorch sees; (devices, why no GPU or None)."""
    import torch  # torch loads only where this runs

    from model.bench.compare import machine  # torch and transformers load only where this runs

    m = machine()
    out: list[dict[str, Any]] = [{"device": "cpu", "name": m["cpu"], "threads": m["threads"],
                                  "precisions": ["int8", "int4", "bfloat16", "float32"]}]
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"device": f"cuda:{i}", "name": p.name, "memory_gb": p.total_memory / 1e9,
                    "precisions": ["float16", "bfloat16", "float32"]})
    why = None
    if len(out) == 1:
        why = (f"torch {torch.__version__} is a CPU-only build; install a CUDA build for a GPU (README, On a GPU)"
               if torch.version.cuda is None else
               f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
    return out, why


def midi_ports() -> tuple[dict[str, dict[str, list[str]]], dict[str, str]]:
    """{api: {"inputs": [...], "outputs": [...]}} for each usable MIDI API, and {api: problem}."""

    try:
        backend = mido.Backend("mido.backends.rtmidi")
        apis = list(backend.module.get_api_names())
    except Exception as e:  # noqa: BLE001 - python-rtmidi missing or broken
        return {}, {"rtmidi": f"python-rtmidi is not usable ({e})"}
    ports, problems = {}, {}
    for api in apis:
        try:
            b = mido.Backend(f"mido.backends.rtmidi/{api}")
            ports[api] = {"inputs": list(b.get_input_names()), "outputs": list(b.get_output_names())}
        except Exception as e:  # noqa: BLE001 - e.g. no ALSA sequencer, JACK server not running
            problems[api] = " ".join(str(e).split())[:200]
    return ports, problems


def run(args: argparse.Namespace) -> int:
    audio, audio_problem = audio_devices()
    midi, midi_problems = midi_ports()
    compute, no_gpu = compute_devices()
    if args.json:
        json.dump({"audio": audio, "audio_problem": audio_problem, "midi": midi,
                   "midi_problems": midi_problems, "compute": compute, "no_gpu": no_gpu}, sys.stdout, indent=2)
        print()
        return 0
    print("Audio devices (use the index or name with `serve --audio`):")
    if audio_problem:
        print(f"  unavailable: {audio_problem}")
    for d in audio:
        mark = "*" if d["default_output"] else " "
        print(f" {mark}{d['index']:3d}  {d['name']}  [{d['hostapi']}]  in {d['inputs']}, out {d['outputs']}, "
              f"{d['samplerate']:.0f} Hz, {d['latency'] * 1000:.1f} ms")
    if not audio and not audio_problem:
        print("  none found (is the JACK or PipeWire server running?)")
    print("MIDI ports:")
    for api, p in midi.items():
        print(f"  {api}: inputs: {', '.join(p['inputs']) or '-'}; outputs: {', '.join(p['outputs']) or '-'}")
    for api, why in midi_problems.items():
        print(f"  {api}: unavailable: {why}")
    print("Compute (use with `--device`; `auto` takes the first GPU, else the CPU):")
    for c in compute:
        size = f", {c['memory_gb']:.0f} GB" if "memory_gb" in c else f", {c['threads']} threads"
        print(f"  {c['device']}: {c['name']}{size}; --dtype {', '.join(c['precisions'])}")
    if no_gpu:
        print(f"  no GPU: {no_gpu}")
    return 0
