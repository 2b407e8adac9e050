"""Each rule has one definition, and every way in reaches it: OSC (the real daemon over loopback),
the command line (`musicbridge ...`) and a session file. Each test takes the boundary value from
the rule's own definition, so a layer that keeps a private copy of a rule fails here.

Rules: sampling ranges and the 600 s request limit (model.types), tempo limits and time-signature
denominators (plugin_host.tempo), "a text-only model cannot follow a melody"
(model.types.melody_refusal), bars to seconds (plugin_host.tempo.bars_to_seconds).
"""

from __future__ import annotations

import pytest

from bridge.cli import main
from bridge.osc.udp import OscClient
from model.types import MAX_REQUEST_SECONDS, SAMPLING_RANGES
from plugin_host.tempo import DENOMINATORS, MAX_BPM, MIN_BPM, TimeSignature, bars_to_seconds
from tests.bridge.osc_helpers import DaemonProcess, drain, expect

TEXT_ONLY = "is text-only and cannot follow a melody"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_dir, serve_daemon):
    """A daemon that allows the longest job one request can make (--max-seconds at the rule's bound)."""
    base = tmp_path_factory.mktemp("rules")
    with serve_daemon(base, tiny_model_dir, "--max-seconds", f"{MAX_REQUEST_SECONDS:g}",
                      allow_dir=base) as (d, client):
        yield {"d": d, "c": client, "base": base}


def osc(c: OscClient, address: str, *args) -> tuple[str, list]:
    """Send one message; the first /ok, /error or /job/accepted reply."""
    drain(c, 0.05)
    c.send(address, *args)
    r = c.wait_for(lambda a, _: a in ("/ok", "/error", "/job/accepted"), 10.0)
    assert r is not None, f"no answer to {address}"
    return r


def send_cli(d: DaemonProcess, capsys, address: str, *args: str) -> tuple[int, str]:
    """`musicbridge send` in this process; (exit code, what it printed)."""
    rc = main(["send", "--port", str(d.port), "--wait-reply", "1.0", address, *args])
    return rc, capsys.readouterr().out


def cli_usage_error(capsys, *argv: str) -> str:
    """Run a command whose flags are refused by argparse (before any model loads); its message."""
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    assert e.value.code == 2
    return capsys.readouterr().err


def session_error(tmp_path, text: str) -> str:
    from bridge.state.session_file import SessionFileError, load_session

    p = tmp_path / "s.toml"
    p.write_text(text)
    with pytest.raises(SessionFileError) as e:
        load_session(p)
    return str(e.value)


def load_ok(tmp_path, text: str):
    from bridge.state.session_file import load_session

    p = tmp_path / "ok.toml"
    p.write_text(text)
    return load_session(p)


def toml(tempo: float = 120, signature: str = "4/4", track: str = 'bars = 1') -> str:
    return f'tempo = {tempo}\nsignature = "{signature}"\n\n[[track]]\nname = "a"\nprompt = "x"\n{track}\n'


# ---------------------------------------------------------------- tempo limits


def test_tempo_limits(daemon, capsys, tmp_path):
    d, c = daemon["d"], daemon["c"]
    for ok, bad in ((MAX_BPM, MAX_BPM + 0.5), (MIN_BPM, MIN_BPM - 0.5)):
        assert osc(c, "/transport/tempo", ok)[0] == "/ok"
        addr, args = osc(c, "/transport/tempo", bad)
        assert addr == "/error" and args[0] == "bad_args" and f"[{MIN_BPM:g}, {MAX_BPM:g}]" in args[1]
        rc, out = send_cli(d, capsys, "/transport/tempo", f"f:{bad}")
        assert rc == 1 and "/error bad_args" in out
        rc, out = send_cli(d, capsys, "/transport/tempo", f"f:{ok}")
        assert rc == 0 and out.startswith("/ok")
        assert load_ok(tmp_path, toml(tempo=ok)).tempo == ok
        assert "key 'tempo'" in session_error(tmp_path, toml(tempo=bad))
    osc(c, "/transport/tempo", 120.0)


# ---------------------------------------------------------------- time-signature denominators


def test_signature_denominators(daemon, capsys, tmp_path):
    d, c = daemon["d"], daemon["c"]
    top, beyond = max(DENOMINATORS), max(DENOMINATORS) * 2
    assert osc(c, "/transport/signature", 7, top)[0] == "/ok"
    addr, args = osc(c, "/transport/signature", 7, beyond)
    assert addr == "/error" and args[0] == "bad_args" and "denominator" in args[1]
    assert osc(c, "/transport/signature", 4, 3)[1][0] == "bad_args"
    rc, out = send_cli(d, capsys, "/transport/signature", "7", str(beyond))
    assert rc == 1 and "/error bad_args" in out
    rc, out = send_cli(d, capsys, "/transport/signature", "7", str(top))
    assert rc == 0 and out.startswith("/ok")
    assert load_ok(tmp_path, toml(signature=f"7/{top}")).signature == TimeSignature(7, top)
    assert "key 'signature'" in session_error(tmp_path, toml(signature=f"7/{beyond}"))
    osc(c, "/transport/signature", 4, 4)


def test_the_jam_accepts_every_signature_the_protocol_accepts(tiny_engine):
    """The jam used to refuse x/32 while the protocol accepted it."""
    from bridge.live.jam import Jam, JamError
    from plugin_host.output import AudioOutput
    from tests.jack_server import jack_server

    with jack_server(rate=48000, period=256), AudioOutput(samplerate=48000) as out:
        for den in DENOMINATORS:
            Jam(tiny_engine, out, f"t{den}", "p", numerator=7, denominator=den).close()
        with pytest.raises(JamError, match="denominator"):
            Jam(tiny_engine, out, "x", "p", numerator=7, denominator=max(DENOMINATORS) * 2)
        with pytest.raises(JamError, match="tempo"):
            Jam(tiny_engine, out, "x", "p", tempo=MAX_BPM + 0.5)


# ---------------------------------------------------------------- sampling ranges


@pytest.mark.parametrize("key", ["guidance", "temperature", "top_p", "top_k"])
def test_sampling_ranges(daemon, capsys, tmp_path, key):
    d, c = daemon["d"], daemon["c"]
    r = SAMPLING_RANGES[key]
    whole = key == "top_k"
    ok = int(r.hi) if whole else r.hi
    bad = int(r.hi) + 1 if whole else r.hi + 0.5
    assert osc(c, "/track/rules/prompt", "x")[0] == "/ok"
    assert osc(c, "/track/rules/param", key, ok)[0] == "/ok"
    addr, args = osc(c, "/track/rules/param", key, bad)
    assert addr == "/error" and args[0] == "bad_args" and key in args[1] and str(r) in args[1]
    rc, out = send_cli(d, capsys, "/track/rules/param", key, f"{'i' if whole else 'f'}:{bad}")
    assert rc == 1 and "/error bad_args" in out
    flag = "--" + key.replace("_", "-")
    err = cli_usage_error(capsys, "generate", "--prompt", "x", "--out", str(tmp_path / "x.wav"), flag, str(bad))
    assert flag in err and str(r) in err
    assert not (tmp_path / "x.wav").exists()
    fmt = (lambda v: str(v)) if whole else (lambda v: f"{float(v)}")
    assert load_ok(tmp_path, toml(track=f"bars = 1\nparams = {{ {key} = {fmt(ok)} }}")).tracks[0].params[key] == ok
    msg = session_error(tmp_path, toml(track=f"bars = 1\nparams = {{ {key} = {fmt(bad)} }}"))
    assert key in msg and str(r) in msg


# ---------------------------------------------------------------- the 600 s limit


def test_request_seconds_limit(daemon, capsys, tmp_path):
    c = daemon["c"]
    limit = MAX_REQUEST_SECONDS
    assert osc(c, "/track/long/preset", "plain")[0] == "/ok"
    addr, args = osc(c, "/track/long/generate", limit + 0.5)
    assert addr == "/error" and args[0] == "limit" and f"{limit:g}" in args[1]
    addr, args = osc(c, "/track/long/generate", limit)  # accepted (the daemon allows the rule's bound) ...
    assert addr == "/job/accepted"
    c.send(f"/job/{args[0]}/cancel")  # ... and not worth running here
    expect(c, "/job/cancelled", 60.0)
    for argv in (["serve", "--max-seconds", f"{limit + 0.5:g}"],
                 ["generate", "--prompt", "x", "--out", str(tmp_path / "x.wav"), "--seconds", f"{limit + 0.5:g}"]):
        assert f"at most {limit:g} seconds" in cli_usage_error(capsys, *argv)
    assert load_ok(tmp_path, toml(track=f"seconds = {limit:g}")).tracks[0].seconds == limit
    assert "key 'seconds'" in session_error(tmp_path, toml(track=f"seconds = {limit + 0.5:g}"))


# ---------------------------------------------------------------- text-only models and melodies


def test_a_text_only_model_cannot_follow_a_melody(daemon, capsys, tmp_path, tiny_model_dir):
    from tests.bridge.test_render_melody import write_riff

    d, c = daemon["d"], daemon["c"]
    riff = daemon["base"] / "riff.mid"
    write_riff(riff)
    assert osc(c, "/track/tune/prompt", "x")[0] == "/ok"
    for address, args in (("/track/tune/melody/notes", (60, 0.0, 1.0)), ("/track/tune/melody/midi", (str(riff),))):
        addr, reply = osc(c, address, *args)
        assert addr == "/error" and reply[0] == "model" and TEXT_ONLY in reply[1]
    rc, out = send_cli(d, capsys, "/track/tune/melody/notes", "60", "0.0", "1.0")
    assert rc == 1 and TEXT_ONLY in out
    out_wav = tmp_path / "g.wav"
    assert main(["generate", "--model", str(tiny_model_dir), "--device", "cpu", "--prompt", "x", "--seconds", "1",
                 "--melody", str(riff), "--out", str(out_wav)]) == 2
    assert TEXT_ONLY in capsys.readouterr().err and not out_wav.exists()
    song = tmp_path / "song.toml"
    song.write_text(toml(track=f'bars = 1\nmelody = "{riff}"'))
    assert main(["render", str(song), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path / "stems")]) == 2
    err = capsys.readouterr().err
    assert TEXT_ONLY in err and "key 'melody'" in err and not (tmp_path / "stems").exists()


# ---------------------------------------------------------------- bars to seconds


def test_bars_follow_the_time_signature_everywhere(daemon, tmp_path, tiny_model_dir):
    """2 bars of 6/8 at 120 bpm are 3.0 s as a live transport, an OSC job and a rendered stem."""
    import json

    from audiofile import read_audio
    from bridge.state.session import Transport

    expected = bars_to_seconds(2, 120.0, TimeSignature(6, 8))
    assert expected == 3.0
    assert Transport(tempo=120.0, time_signature=TimeSignature(6, 8)).bars_to_seconds(2) == expected
    c = daemon["c"]
    assert osc(c, "/transport/tempo", 120.0)[0] == "/ok"
    assert osc(c, "/transport/signature", 6, 8)[0] == "/ok"
    assert osc(c, "/track/six/preset", "plain")[0] == "/ok"
    addr, (job, _) = osc(c, "/track/six/generate", 2, "bars")
    assert addr == "/job/accepted"
    done = c.wait_for(lambda a, v: a in ("/job/done", "/error") and v and v[0] == job or a == "/error", 120.0)
    assert done is not None and done[0] == "/job/done", done
    audio, rate = read_audio(done[1][1])
    assert audio.shape[1] == round(expected * rate)
    osc(c, "/transport/signature", 4, 4)
    song = tmp_path / "six.toml"
    song.write_text(toml(signature="6/8", track="bars = 2\nseed = 1"))
    assert main(["render", str(song), "--model", str(tiny_model_dir), "--device", "cpu",
                 "--out", str(tmp_path / "stems")]) == 0
    stem, rate = read_audio(tmp_path / "stems" / "a.wav")
    assert stem.shape[1] == round(expected * rate)
    assert json.loads((tmp_path / "stems" / "a.json").read_text())["render"]["seconds"] == expected
