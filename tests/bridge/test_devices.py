"""`musicbridge devices` against a real JACK server: its audio device and a JACK MIDI port are listed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.jack_server import jack_server


def _devices(*extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "devices", *extra], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ))


def test_lists_jack_audio_device_and_midi_port():
    import mido

    with jack_server():
        port = mido.Backend("mido.backends.rtmidi/UNIX_JACK").open_output("mb-keys", virtual=True)
        try:
            res = _devices("--json")
            text = _devices()
        finally:
            port.close()
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    jack_devs = [d for d in data["audio"] if d["hostapi"].startswith("JACK")]
    assert jack_devs and jack_devs[0]["outputs"] == 2 and jack_devs[0]["samplerate"] == 48000
    assert any("mb-keys" in name for name in data["midi"]["UNIX_JACK"]["inputs"])
    assert text.returncode == 0 and "JACK Audio Connection Kit" in text.stdout and "mb-keys" in text.stdout


def test_without_a_server_it_says_so_instead_of_failing():
    env = dict(os.environ, JACK_DEFAULT_SERVER="mb-no-such-server", JACK_NO_START_SERVER="1")
    res = subprocess.run([sys.executable, "-m", "bridge.cli", "devices"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0
    assert "none found" in res.stdout or "unavailable" in res.stdout
    assert "UNIX_JACK: unavailable" in res.stdout
    assert "Traceback" not in res.stderr


def test_lists_where_the_model_can_run():
    """The CPU always, each CUDA GPU torch sees, and why there is none where there is none."""
    import torch

    env = dict(os.environ, JACK_DEFAULT_SERVER="mb-no-such-server", JACK_NO_START_SERVER="1")
    res = subprocess.run([sys.executable, "-m", "bridge.cli", "devices", "--json"], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    cpu = data["compute"][0]
    assert cpu["device"] == "cpu" and cpu["threads"] >= 1 and "int8" in cpu["precisions"]
    gpus = [c["device"] for c in data["compute"][1:]]
    assert gpus == [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if not gpus:
        assert torch.__version__ in data["no_gpu"] and ("CPU-only build" in data["no_gpu"] or "sees no GPU" in data["no_gpu"])
    text = subprocess.run([sys.executable, "-m", "bridge.cli", "devices"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert "Compute (use with `--device`" in text.stdout and "  cpu: " in text.stdout
