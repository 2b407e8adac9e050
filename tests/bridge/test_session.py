"""The daemon session: every change is saved atomically, a restart restores it, a failed save changes nothing."""

from __future__ import annotations

import json

import pytest

from bridge.osc.protocol import ProtocolError
from bridge.state.session import LiveSession, SessionError
from bridge.state.session_check import chroma_from_text, chroma_to_text
from plugin_host.tempo import TimeSignature


def test_changes_persist_and_restore(tmp_path):
    s = LiveSession(tmp_path / "sess")
    s.update_track("drums", prompt="dusty drums", preset="lofi_drums", params={"seed": 3, "top_k": 50})
    s.update_track("keys", prompt="piano", melody={"kind": "chroma", "data": chroma_to_text(b"\x00" * 48),
                                                   "frame_rate": 7.8125})
    s.update_transport(tempo=97.5, time_signature=TimeSignature(6, 8), playing=True, position=16.0)
    first = s.take_job_id()
    r = LiveSession(tmp_path / "sess")
    assert r.tracks == s.tracks and r.transport == s.transport
    assert r.track("drums").params_dict() == {"seed": 3, "top_k": 50}
    assert chroma_from_text(r.track("keys").melody_dict()["data"]) == b"\x00" * 48
    assert r.take_job_id() == first + 1
    assert r.transport.bars_to_seconds(4) == pytest.approx(4 * 3 * 60 / 97.5)
    assert not list((tmp_path / "sess").glob(".session.*"))  # no temporary files left behind


def test_bars_to_seconds():
    from bridge.state.session import Transport

    assert Transport(tempo=120.0).bars_to_seconds(4) == 8.0
    assert Transport(tempo=90.0, time_signature=TimeSignature(3, 4)).bars_to_seconds(2) == 4.0
    assert Transport(tempo=120.0, time_signature=TimeSignature(6, 8)).bars_to_seconds(1) == 1.5


def test_clear_delete_and_track_limit(tmp_path):
    s = LiveSession(tmp_path, max_tracks=2)
    s.update_track("a", prompt="x")
    s.update_track("b", prompt="y")
    with pytest.raises(ProtocolError) as e:
        s.update_track("c", prompt="z")
    assert e.value.code == "limit" and "c" not in LiveSession(tmp_path).tracks
    s.update_track("a", prompt="changed")  # existing tracks can still change
    s.clear_track("a")
    assert LiveSession(tmp_path).track("a").prompt == ""
    s.delete_track("b")
    assert sorted(LiveSession(tmp_path).tracks) == ["a"]
    with pytest.raises(ProtocolError) as e:
        s.delete_track("b")
    assert e.value.code == "not_found"


def test_a_failed_save_changes_nothing(tmp_path):
    s = LiveSession(tmp_path)
    s.update_track("a", prompt="kept")
    saved = (tmp_path / "session.json").read_bytes()
    (tmp_path / "session.json").unlink()
    (tmp_path / "session.json").mkdir()  # the rename onto it now fails
    with pytest.raises(ProtocolError) as e:
        s.update_track("a", prompt="lost")
    assert e.value.code == "failed"
    assert s.track("a").prompt == "kept"
    with pytest.raises(ProtocolError):
        s.update_transport(tempo=140.0)
    assert s.transport.tempo == 120.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".session.")]
    (tmp_path / "session.json").rmdir()
    (tmp_path / "session.json").write_bytes(saved)
    assert LiveSession(tmp_path).track("a").prompt == "kept"


@pytest.mark.parametrize("text", ["{not json", "[]", json.dumps({"version": 99}),
                                  json.dumps({"version": 1, "transport": {}, "tracks": {}}),
                                  json.dumps({"version": 1, "transport": {"tempo": 120, "numerator": 4,
                                              "denominator": 4, "playing": False, "position": 0},
                                              "tracks": {"bad name": {}}})])
def test_a_broken_session_file_is_named(tmp_path, text):
    (tmp_path / "session.json").write_text(text)
    with pytest.raises(SessionError, match="session.json"):
        LiveSession(tmp_path)


def test_changes_saved_together_are_one_write_and_undone_together_when_it_fails(tmp_path, monkeypatch):
    """The daemon handles packets waiting at once as a group: one save at the end, all or nothing."""
    import json

    import pytest

    from bridge.osc.protocol import ProtocolError
    from bridge.state.session import LiveSession

    s = LiveSession(tmp_path)
    s.update_track("a", prompt="one")
    writes = []
    real = s._write
    monkeypatch.setattr(s, "_write", lambda data: (writes.append(data), real(data)))
    with s.saved_together():
        s.update_track("a", prompt="two")
        s.update_transport(tempo=90.0)
        assert s.unsaved() and writes == []
    assert len(writes) == 1 and not s.unsaved()
    assert json.loads((tmp_path / "session.json").read_text())["tracks"]["a"]["prompt"] == "two"

    def full(data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(s, "_write", full)
    with pytest.raises(ProtocolError, match="No space left") as e:
        with s.saved_together():
            s.update_track("a", prompt="three")
            s.update_transport(tempo=100.0)
    assert e.value.code == "failed"
    assert s.track("a").prompt == "two" and s.transport.tempo == 90.0  # both undone
