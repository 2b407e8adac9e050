"""The daemon in-process on the tiny melody model, over real loopback UDP: melody messages and jobs."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import soundfile as sf

from bridge.daemon import Daemon, DaemonConfig
from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import PLAIN_PRESET, expect


@pytest.fixture
def daemon(tmp_path, monkeypatch, tiny_melody_engine):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    monkeypatch.setenv("MUSICBRIDGE_PRESETS", str(presets))
    (tmp_path / "session" / "stems").mkdir(parents=True)
    with Daemon(tiny_melody_engine, DaemonConfig(port=0, session_dir=tmp_path / "session", grace=0.0)) as d:
        with OscClient("127.0.0.1", d.server.port) as c:
            assert c.prove()  # job events reach a host that proved its address (docs/osc.md)
            yield d, c


def state(c, track):
    c.send(f"/track/{track}/state")
    return json.loads(expect(c, f"/track/{track}/state")[0])


def test_melody_messages_set_the_track_and_a_chroma_job_follows_it(daemon):
    d, c = daemon
    c.send("/track/lead/preset", "plain")
    expect(c, "/ok")
    c.send("/track/lead/melody/notes", 60, 0.0, 1.0, 64, 1.0, 1.0)
    assert expect(c, "/ok") == ["/track/lead/melody/notes"]
    assert state(c, "lead")["melody"] == {"kind": "notes", "notes": 2}
    chroma = np.eye(12, dtype="<f4")[[0, 4, 7] * 8]  # 24 frames
    c.send("/track/lead/melody/chroma", chroma.tobytes(), 8.0)
    expect(c, "/ok")
    assert state(c, "lead")["melody"] == {"kind": "chroma", "frame_rate": 8.0, "frames": 24}
    c.send("/track/lead/generate", 1.0)
    job = expect(c, "/job/accepted")[0]
    done = expect(c, "/job/done", timeout=60)
    assert done[0] == job and sf.info(done[1]).frames == 48000
    side = json.loads(open(done[1][:-4] + ".json").read())
    assert side["melody"]["kind"] == "chroma" and side["melody"]["frames"] == 24
    _regenerates(d, done[1])
    c.send("/track/lead/melody/clear")
    expect(c, "/ok")
    assert state(c, "lead")["melody"] is None
    c.send("/track/lead/melody/chroma", struct.pack("<12f", *[float("nan")] * 12), 8.0)
    assert expect(c, "/error")[0] == "bad_args"
    assert state(c, "lead")["melody"] is None


def test_a_notes_melody_job_follows_its_notes(daemon):
    d, c = daemon
    c.send("/track/lead/preset", "plain")
    c.send("/track/lead/melody/notes", 60, 0.0, 2.0)
    c.send("/track/lead/generate", 1.0)
    job = expect(c, "/job/accepted")[0]
    done = expect(c, "/job/done", timeout=60)
    assert done[0] == job
    side = json.loads(open(done[1][:-4] + ".json").read())
    assert side["melody"] == {"kind": "notes", "notes": [[60, 0.0, 2.0]], "tempo": 120.0}
    _regenerates(d, done[1])


def _regenerates(d, stem: str) -> None:
    """The stem's sidecar makes the same audio again (the sidecar holds the whole melody)."""
    from audiofile import read_audio
    from bridge.stems.render import regenerate

    path, identical = regenerate(stem[:-4] + ".json", d.engine)
    assert identical and np.array_equal(read_audio(path)[0], read_audio(stem)[0])
