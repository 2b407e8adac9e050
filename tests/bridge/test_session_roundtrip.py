"""One model of the session: whatever the daemon accepts over OSC it saves, and whatever it saves
it loads again.

Every track parameter and transport setting is set at its extreme valid values through the real
daemon over loopback UDP, the daemon is restarted on the same session folder, and every value
reads back identical. The extremes come from the rules' own definitions (model.types,
plugin_host.tempo, bridge.state.rules), so a layer that keeps a private, narrower copy fails here.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
from pythonosc.osc_message_builder import OscMessageBuilder

from bridge.state import rules as R
from bridge.osc.udp import OscClient
from model.types import MAX_VARIATIONS, SAMPLING_RANGES
from plugin_host.tempo import DENOMINATORS, MAX_BPM, MAX_NUMERATOR, MIN_BPM
from tests.bridge.osc_helpers import ROOT, drain, expect

SMALLEST = 5e-324  # the smallest positive double: the open lower bound of (0, x] ranges, as near as it gets


def typed(address: str, *args: tuple[str, object]) -> bytes:
    """An OSC message with explicit type tags (doubles keep every bit of a value)."""
    b = OscMessageBuilder(address)
    for tag, v in args:
        b.add_arg(v, tag)
    return b.build().dgram


def ok(c: OscClient, data: bytes) -> None:
    drain(c, 0.0)
    c.send_raw(data)
    r = c.wait_for(lambda a, _: a in ("/ok", "/error"), 10.0)
    assert r is not None and r[0] == "/ok", r


def chroma(frames: int) -> bytes:
    return struct.pack(f"<{frames * 12}f", *[float(i % 12 == k % 12) for k in range(frames) for i in range(12)])


# Track -> (key, OSC type tag, value): every parameter at both ends of its range.
G, T = SAMPLING_RANGES["guidance"], SAMPLING_RANGES["temperature"]
K, P, S = SAMPLING_RANGES["top_k"], SAMPLING_RANGES["top_p"], SAMPLING_RANGES["seed"]
LOW = [("guidance", "d", SMALLEST), ("temperature", "d", SMALLEST), ("top_k", "i", int(K.lo)),
       ("top_p", "d", P.lo), ("seed", "i", int(S.lo)), ("greedy", "F", False), ("variations", "i", 1)]
HIGH = [("guidance", "d", G.hi), ("temperature", "d", T.hi), ("top_k", "i", int(K.hi)),
        ("top_p", "d", P.hi), ("seed", "h", int(S.hi)), ("greedy", "T", True),
        ("variations", "i", MAX_VARIATIONS)]
TRACKS = ("lo", "hi", "chroma_lo", "chroma_hi", "notes")


def _read_back(c: OscClient) -> dict:
    drain(c, 0.0)
    c.send("/pad", b"\0" * 8000)  # earns the reply credit the states below cost (docs/osc.md, Reply budget)
    c.send("/tracks")
    names = expect(c, "/tracks")
    states = {}
    for n in names:
        c.send(f"/track/{n}/state")
        states[n] = json.loads(expect(c, f"/track/{n}/state")[0])
    c.send("/transport/state")
    clock, tempo, num, den, playing, beat, _age, _quarter_notes = expect(c, "/transport/state")
    return {"tracks": states, "transport": (clock, tempo, num, den, playing)}


def test_extreme_values_set_over_osc_survive_a_restart(tmp_path, tiny_melody_dir, serve_daemon):
    with serve_daemon(tmp_path, tiny_melody_dir) as (d, c):
        for name, params in (("lo", LOW), ("hi", HIGH)):
            ok(c, typed(f"/track/{name}/prompt", ("s", f"extremes {name}\twith a tab\nand a newline")))
            for key, tag, value in params:
                ok(c, typed(f"/track/{name}/param", ("s", key), (tag, value)))
        ok(c, typed("/track/hi/preset", ("s", "plain")))
        ok(c, typed("/track/chroma_lo/melody/chroma", ("b", chroma(3)), ("d", 1e-10)))  # the loader once wanted 1e-9
        ok(c, typed("/track/chroma_lo/param", ("s", "guidance"), ("d", SMALLEST)))
        ok(c, typed("/track/chroma_hi/melody/chroma", ("b", chroma(R.CHROMA_FRAME_BYTES)),
                    ("d", R.CHROMA_RATE.hi)))
        ok(c, typed("/track/notes/melody/notes", ("i", 0), ("d", 0.0), ("d", SMALLEST),
                    ("i", 127), ("d", R.MAX_NOTE_BEAT), ("d", R.MAX_NOTE_BEAT)))
        # the transport at its low end
        ok(c, typed("/transport/tempo", ("d", MIN_BPM)))
        ok(c, typed("/transport/signature", ("i", 1), ("i", min(DENOMINATORS))))
        ok(c, typed("/transport/stop", ("d", 0.0)))
        first = _read_back(c)
        saved = json.loads((d.session_dir / "session.json").read_text())

    with serve_daemon(tmp_path, tiny_melody_dir) as (d, c):  # restarted on the same session
        again = _read_back(c)
        assert again == first
        assert json.loads((d.session_dir / "session.json").read_text()) == saved
        assert set(again["tracks"]) == set(TRACKS)
        for name, params in (("lo", LOW), ("hi", HIGH)):
            assert again["tracks"][name]["params"] == {k: v for k, _, v in params}, name
        assert again["tracks"]["chroma_lo"]["melody"] == {"kind": "chroma", "frame_rate": 1e-10, "frames": 3}
        assert saved["tracks"]["notes"]["melody"]["notes"] == [[0, 0.0, SMALLEST],
                                                             [127, R.MAX_NOTE_BEAT, R.MAX_NOTE_BEAT]]
        assert again["transport"] == ("typed", MIN_BPM, 1, min(DENOMINATORS), 0)

        # the transport at its high end: the furthest position, playing
        ok(c, typed("/transport/tempo", ("d", MAX_BPM)))
        ok(c, typed("/transport/signature", ("i", MAX_NUMERATOR), ("i", max(DENOMINATORS))))
        ok(c, typed("/transport/play", ("d", R.MAX_BEAT_POSITION)))
        saved = json.loads((d.session_dir / "session.json").read_text())
        assert saved["transport"] == {"tempo": MAX_BPM, "numerator": MAX_NUMERATOR,
                                      "denominator": max(DENOMINATORS), "playing": True,
                                      "position": R.MAX_BEAT_POSITION}
        first = _read_back(c)

    with serve_daemon(tmp_path, tiny_melody_dir) as (d, c):
        assert _read_back(c) == first
        assert json.loads((d.session_dir / "session.json").read_text()) == saved


def test_values_just_outside_the_rules_are_refused_over_osc(tmp_path, tiny_model_dir, serve_daemon):
    """The other side of each edge: refused over the wire, so never saved."""
    with serve_daemon(tmp_path, tiny_model_dir) as (d, c):
        bad = [typed("/track/x/param", ("s", "temperature"), ("d", math.nextafter(T.hi, math.inf))),
               typed("/track/x/param", ("s", "guidance"), ("d", 0.0)),
               typed("/track/x/param", ("s", "variations"), ("i", MAX_VARIATIONS + 1)),
               typed("/track/x/param", ("s", "variations"), ("i", 0)),
               typed("/transport/locate", ("d", math.nextafter(R.MAX_BEAT_POSITION, math.inf))),
               typed("/transport/tempo", ("d", math.nextafter(MAX_BPM, math.inf)))]
        for data in bad:
            drain(c, 0.0)
            c.send_raw(data)
            err = expect(c, "/error")
            assert err[0] in ("bad_args", "limit"), err
        c.send("/tracks")
        assert expect(c, "/tracks") == []


def test_a_followed_position_beyond_the_limit_is_never_saved(tmp_path, tiny_model_dir, serve_daemon):
    """`/beat/str s 9999999.1.00` once saved 39,999,992 beats, which the next start refused."""
    with serve_daemon(tmp_path, tiny_model_dir, "--follow", "osc") as (d, c):
        last_bar = int(R.MAX_BEAT_POSITION // 4) + 1  # bar 2,500,001 of 4/4 starts at the furthest position
        with OscClient("127.0.0.1", d.port) as daw:
            daw.send("/beat/str", "9999999.1.00")
            daw.send("/beat/str", f"{last_bar}.1.00")
        c.send("/ping")
        expect(c, "/pong")
        path, position = d.session_dir / "session.json", None
        for _ in range(100):  # the hub copies the followed clock into the session every 0.1 s
            if path.exists():
                position = json.loads(path.read_text())["transport"]["position"]
                if position == R.MAX_BEAT_POSITION:
                    break
            c.wait_for(lambda a, _: False, 0.1)
        assert position == R.MAX_BEAT_POSITION, d.log_text()[-2000:]
    with serve_daemon(tmp_path, tiny_model_dir, "--follow", "osc") as (d, c):  # and it loads again
        assert json.loads((d.session_dir / "session.json").read_text())["transport"]["position"] \
            == R.MAX_BEAT_POSITION


def _serve_on(session_dir, model_dir) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(model_dir), "--port", "0",
                           "--audio", "none", "--session-dir", str(session_dir)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def _session(**track) -> dict:
    return {"version": 1, "transport": {"tempo": 120.0, "numerator": 4, "denominator": 4, "playing": False,
                                       "position": 0.0},
            "tracks": {"t": {"prompt": "pad", "preset": "", "params": {}, "melody": None, "continuation": None,
                             **track}},
            "next_job_id": 3}


def test_a_hand_edited_temperature_of_20_is_refused_at_load_naming_key_and_range(tmp_path, tiny_model_dir):
    session = tmp_path / "session"
    session.mkdir()
    (session / "session.json").write_text(json.dumps(_session(params={"temperature": 20})))
    out = _serve_on(session, tiny_model_dir)
    assert out.returncode != 0, out.stderr
    assert "tracks.t.params.temperature" in out.stderr and str(T) in out.stderr, out.stderr
    assert "session.json" in out.stderr


@pytest.mark.parametrize("change,says", [
    ({"params": {"guidance": 20.5}}, "params.guidance"),
    ({"params": {"variations": MAX_VARIATIONS + 1}}, "params.variations"),
    ({"params": {"variations": True}}, "params.variations"),
    ({"melody": {"kind": "chroma", "data": "AAAA", "frame_rate": 1.0}}, "melody.data"),
    ({"melody": {"kind": "chroma", "data": "", "frame_rate": 0.0}}, "melody.data"),
    ({"melody": {"kind": "notes", "notes": [[0, 0.0, R.MAX_NOTE_BEAT * 2]]}}, "note 1 length"),
    ({"prompt": "a\x00b"}, "prompt contains control characters"),
    ({"preset": "plain\n"}, "preset"),
    ({"continuation": {"path": "/x.wav", "seconds": 1e6}}, "continuation.seconds"),
])
def test_the_loader_refuses_what_the_wire_refuses(change, says):
    from bridge.state.session_check import check_session_data

    with pytest.raises(ValueError, match=None) as e:
        check_session_data(_session(**change))
    assert says in str(e.value), str(e.value)


def test_the_loader_accepts_what_the_wire_accepts_at_the_edges():
    from bridge.state.session_check import chroma_to_text
    from bridge.state.session_check import check_session_data

    data = _session(params={"variations": MAX_VARIATIONS, "temperature": T.hi, "guidance": G.hi,
                            "seed": int(S.hi), "top_k": int(K.hi), "top_p": P.hi, "greedy": True},
                    melody={"kind": "chroma", "data": chroma_to_text(chroma(1)), "frame_rate": 1e-10})
    data["transport"].update(position=R.MAX_BEAT_POSITION, tempo=MAX_BPM, numerator=MAX_NUMERATOR,
                             denominator=max(DENOMINATORS))
    data["next_job_id"] = R.MAX_JOB_ID
    check_session_data(data)  # nothing raised
