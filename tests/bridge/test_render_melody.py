"""Session tracks that follow a melody file (MusicGen-Melody): recorded, hashed, reproducible.

Needs model.conditioning.melody.load_melody (issue: melody input, helper A) and the tiny melody checkpoint.
"""

from __future__ import annotations

import json

import mido
import numpy as np
import pytest

from bridge.stems.render import regenerate, render_session
from bridge.state.session_file import SessionFileError, load_session
from audiofile import read_audio


def write_riff(path) -> None:
    mid = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("track_name", name="lead", time=0))
    for note in (60, 64, 67, 72, 67, 64, 60, 62):
        track.append(mido.Message("note_on", note=note, velocity=90, time=0))
        track.append(mido.Message("note_off", note=note, velocity=0, time=480))
    mid.tracks.append(track)
    mid.save(str(path))


@pytest.fixture
def melody_session(tmp_path):
    write_riff(tmp_path / "riff.mid")
    p = tmp_path / "m.toml"
    p.write_text('tempo = 120\n[[track]]\nname = "lead"\nprompt = "synth lead"\nbars = 1\nseed = 5\n'
                 'melody = "riff.mid"\nmelody_track = "lead"\n'
                 '[[track]]\nname = "bed"\nprompt = "pad"\nbars = 1\nseed = 6\n')
    return p


def test_melody_track_is_recorded_and_regenerates(melody_session, tiny_melody_engine, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    results = render_session(load_session(melody_session), tiny_melody_engine, out)
    lead = results[0].path
    side = json.loads(lead.with_suffix(".json").read_text())
    assert side["melody"]["source"] == str((tmp_path / "riff.mid").resolve())
    assert side["melody"]["track"] == "lead" and len(side["melody"]["sha256"]) == 64
    assert json.loads(results[1].path.with_suffix(".json").read_text())["melody"] is None
    path, identical = regenerate(lead.with_suffix(".json"), tiny_melody_engine)
    assert identical
    assert np.array_equal(read_audio(lead)[0], read_audio(path)[0])
    (tmp_path / "riff.mid").write_bytes((tmp_path / "riff.mid").read_bytes() + b"\0")
    with pytest.raises(SessionFileError, match=r"riff\.mid has changed since it was recorded"):
        regenerate(lead.with_suffix(".json"), tiny_melody_engine)
