"""Protocol v1 parsing: valid messages become frozen commands; every bad one a stable error code."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from bridge.osc import protocol as P
from bridge.osc.paths import PathPolicy
from bridge.osc.protocol import Limits, ProtocolError, parse


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "tune.mid").write_bytes(b"MThd")
    (root / "take.wav").write_bytes(b"RIFF")
    (root / "link.wav").symlink_to(tmp_path / "outside.wav")
    (tmp_path / "outside.wav").write_bytes(b"RIFF")
    return root, PathPolicy([root])


def code_of(address, args, **kw) -> str:
    with pytest.raises(ProtocolError) as e:
        parse(address, args, **kw)
    assert e.value.message
    return e.value.code


def test_valid_messages_become_frozen_commands(roots):
    root, policy = roots
    cmd = parse("/track/drums/prompt", [" dusty drums "])
    assert cmd == P.SetPrompt("/track/drums/prompt", "drums", "dusty drums")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.text = "x"  # type: ignore[misc]
    assert parse("/track/a/generate", [8]) == P.Generate("/track/a/generate", "a", 8.0, None, 0)
    assert parse("/track/a/generate", [4, "bars", 3]) == P.Generate("/track/a/generate", "a", None, 4, 3)
    assert parse("/track/a/generate", [2.5, "seconds"]).seconds == 2.5
    assert parse("/track/a/param", ["seed", -1]).value is None
    assert parse("/track/a/param", ["greedy", True]).value is True
    assert parse("/track/a/param", ["top_k"]).value is None
    assert parse("/transport/signature", [6, 8]) == P.SetSignature("/transport/signature", 6, 8)
    assert parse("/transport/play", []).quarter_notes is None
    assert parse("/job/12/cancel", []) == P.CancelJob("/job/12/cancel", 12)
    assert parse("/jam/status", ["lead"]) == P.JamStatus("/jam/status", "lead")
    midi = parse("/track/a/melody/midi", [str(root / "tune.mid")], paths=policy)
    assert midi.path == (root / "tune.mid").resolve()
    notes = parse("/track/a/melody/notes", [60, 0.0, 1.0, 64, 1, 0.5])
    assert notes.notes == ((60, 0.0, 1.0), (64, 1.0, 0.5))
    chroma = parse("/track/a/melody/chroma", [struct.pack("<24f", *range(24)), 7.8125])
    assert chroma.frames == 2 and chroma.frame_rate == 7.8125


@pytest.mark.parametrize("address,args,code", [
    ("ping", [], "bad_address"),
    ("/pingg", [], "bad_address"),
    ("/track/a", [], "bad_address"),
    ("/job/0/cancel", [], "bad_address"),
    ("/job/1/explode", [], "bad_address"),
    ("/track/a b/prompt", ["x"], "bad_track"),
    ("/track//prompt", ["x"], "bad_track"),
    ("/track/" + "x" * 33 + "/prompt", ["x"], "bad_track"),
    ("/jam/start", ["no/slash"], "bad_track"),
    ("/track/a/prompt", [], "bad_args"),
    ("/track/a/prompt", [b"bytes"], "bad_args"),
    ("/track/a/prompt", ["bell\x07"], "bad_args"),
    ("/track/a/prompt", ["x" * 1025], "limit"),
    ("/transport/tempo", [True], "bad_args"),
    ("/transport/tempo", [float("nan")], "bad_args"),
    ("/transport/tempo", [float("-inf")], "bad_args"),
    ("/transport/tempo", [10.0], "bad_args"),
    ("/transport/tempo", [2**40], "bad_args"),
    ("/transport/signature", [4, 3], "bad_args"),
    ("/transport/signature", [0, 4], "bad_args"),
    ("/track/a/generate", [], "bad_args"),
    ("/track/a/generate", [0.0], "bad_args"),
    ("/track/a/generate", [121.0], "limit"),
    ("/track/a/generate", [4, "bars", 10], "bad_args"),
    ("/track/a/generate", [4, "bars", 1, 2], "bad_args"),
    ("/track/a/generate", [1.5, "bars"], "bad_args"),
    ("/track/a/param", ["temperature", 0.0], "bad_args"),
    ("/track/a/param", ["top_p", 1.5], "bad_args"),
    ("/track/a/param", ["seed", 2**64], "bad_args"),
    ("/track/a/param", ["bogus", 1], "bad_args"),
    ("/track/a/preset", ["../x"], "bad_args"),
    ("/track/a/melody/notes", [], "bad_args"),
    ("/track/a/melody/notes", [60, 0.0, 0.0], "bad_args"),
    ("/track/a/melody/notes", [60, -1.0, 1.0], "bad_args"),
    ("/track/a/melody/notes", [60, 0.0, 1.0] * 2049, "limit"),
    ("/track/a/melody/chroma", ["x", 1.0], "bad_args"),
    ("/track/a/melody/chroma", [b"\x00" * 48, 0.0], "bad_args"),
    ("/track/a/melody/chroma", [struct.pack("<12f", *[float("inf")] * 12), 1.0], "bad_args"),
    ("/track/a/melody/chroma", [b"\x00" * 60048, 1.0], "limit"),
    ("/track/a/clear", [1], "bad_args"),
])
def test_bad_messages_have_stable_codes(address, args, code):
    assert code_of(address, args) == code


def test_paths_must_resolve_under_a_root(roots, tmp_path):
    root, policy = roots
    assert code_of("/track/a/melody/midi", [str(root / "tune.mid")]) == "bad_path"  # no roots at all
    assert code_of("/track/a/melody/midi", ["tune.mid"], paths=policy) == "bad_path"
    assert code_of("/track/a/melody/audio", [str(root / "link.wav")], paths=policy) == "bad_path"
    assert code_of("/track/a/melody/audio", [str(root / ".." / "outside.wav")], paths=policy) == "bad_path"
    assert code_of("/track/a/melody/audio", [str(root / "nope.wav")], paths=policy) == "not_found"
    assert code_of("/track/a/melody/midi", [str(root / "take.wav")], paths=policy) == "bad_args"
    assert code_of("/track/a/continue", [str(root / "take.wav"), float("nan")], paths=policy) == "bad_args"
    assert parse("/track/a/continue", [str(root / "take.wav"), 4.0, 2], paths=policy).priority == 2


def test_limits_are_configurable():
    small = Limits(max_string=8, max_seconds=5.0, max_notes=1)
    assert code_of("/track/a/prompt", ["123456789"], limits=small) == "limit"
    assert code_of("/track/a/generate", [6.0], limits=small) == "limit"
    assert code_of("/track/a/melody/notes", [60, 0.0, 1.0, 62, 1.0, 1.0], limits=small) == "limit"
    assert parse("/track/a/generate", [5.0], limits=small).seconds == 5.0


def test_osc_codec_round_trip_and_refuses_dropped_types():
    from bridge.osc.udp import OscDecodeError, decode, encode

    args = [1, 2**40, 2.5, "text", b"\x00\x01", True, False, None]
    assert decode(encode("/a/b", args)) == [("/a/b", args)]
    symbol = b"/a\x00\x00,S\x00\x00drums\x00\x00\x00"  # liblo `oscsend ... S drums`
    with pytest.raises(OscDecodeError, match="'S'"):
        decode(symbol)


def test_commands_are_valid_from_birth():
    """A command checks its own fields when built, whoever builds it, not only inside parse()."""
    with pytest.raises(ProtocolError) as e:
        P.SetTempo("/transport/tempo", 500.0)
    assert e.value.code == "bad_args" and "[20, 400]" in e.value.message
    with pytest.raises(ProtocolError) as e:
        P.SetPrompt("/track/a b/prompt", "a b", "x")
    assert e.value.code == "bad_track"
    with pytest.raises(ProtocolError):
        P.Generate("/track/a/generate", "a", 4.0, 2, 0)  # both seconds and bars
    with pytest.raises(ProtocolError):
        P.SetParam("/track/a/param", "a", "guidance", 0.0)
    with pytest.raises(ProtocolError):
        P.MelodyNotes("/track/a/melody/notes", "a", ((60, 0.0, 0.0),))
    with pytest.raises(ProtocolError):
        P.SetSignature("/transport/signature", 4, 64)
    assert P.SetTempo("/transport/tempo", 90).bpm == 90.0 and isinstance(P.SetTempo("/t", 90).bpm, float)
    assert P.Generate("/g", "a", 8, None).seconds == 8.0


def test_every_command_has_a_builder_and_a_daemon_handler():
    """The two tables a new message is added to: bridge.osc.protocol.BUILDERS and Daemon.HANDLERS (@handles)."""
    from bridge.daemon import Daemon

    def leaves(cls):
        subs = cls.__subclasses__()
        return [c for s in subs for c in leaves(s)] if subs else [cls]

    commands = set(leaves(P.Command))
    assert commands == set(P.BUILDERS)
    assert commands == set(Daemon.HANDLERS)
    patterns = [c.pattern for c in commands]
    assert len(set(patterns)) == len(patterns) and all(p.startswith("/") for p in patterns)
