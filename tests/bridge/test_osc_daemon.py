"""The real daemon (`python -m bridge.cli serve`) driven over loopback UDP with the tiny checkpoint.

One daemon serves the whole module (it replies to a fixed --reply-to port, as a DAW would
have it); the last test stops it with SIGTERM and restarts on the same session folder.
Generation uses a preset with add_bpm = false: the tiny checkpoint's text encoder cannot
embed the word "bpm" (see the report on model/load/tiny.py); bpm appending is tested in test_jobs.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys

import pytest
import soundfile as sf

from bridge.osc.udp import OscClient, encode
from tests.bridge.osc_helpers import ROOT, drain, expect


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, serve_daemon):
    base = tmp_path_factory.mktemp("oscd")
    allowed = base / "allowed"
    allowed.mkdir()
    (allowed / "tune.mid").write_bytes(b"MThd")
    (allowed / "escape.wav").symlink_to("/etc/hostname")
    outside = base / "outside"
    outside.mkdir()
    (outside / "take.wav").write_bytes(b"RIFF")
    # (the last test stops this daemon itself, with SIGTERM, and restarts on its session folder)
    with serve_daemon(base, tiny_model_dir, "--max-seconds", "30", "--max-queued", "3", allow_dir=allowed,
                      reply_to=True) as (d, client):
        yield {"d": d, "c": client, "base": base, "allowed": allowed, "outside": outside,
               "model": tiny_model_dir}


def state(c: OscClient, track: str) -> dict:
    drain(c, 0.1)
    c.send(f"/track/{track}/state")
    return json.loads(expect(c, f"/track/{track}/state")[0])


def run_job(c: OscClient, address: str, *args) -> tuple[int, list, list]:
    """Send a generate; return (job id, progress fractions, final reply)."""
    c.send(address, *args)
    job_id, track = expect(c, "/job/accepted")
    fractions, seen = [], []
    while True:
        r = c.wait_for(lambda a, v: a in ("/job/progress", "/job/done", "/job/cancelled", "/error")
                       and v and (v[0] == job_id or (a == "/error" and v[-1] == job_id)), 60.0, seen)
        assert r is not None, f"job {job_id} never finished; replies: {seen}"
        if r[0] == "/job/progress":
            fractions.append(r[1][1])
            continue
        return job_id, fractions, r


def test_generate_round_trip_writes_the_stem(env):
    c, d = env["c"], env["d"]
    drain(c, 0.1)
    c.send("/track/drums/preset", "plain")
    assert expect(c, "/ok") == ["/track/drums/preset"]
    c.send("/transport/tempo", 120.0)
    expect(c, "/ok")
    job_id, fractions, (address, args) = run_job(c, "/track/drums/generate", 4, "bars")
    assert address == "/job/done", args
    assert args[0] == job_id and job_id >= 1
    assert fractions and all(0.0 <= f <= 1.0 for f in fractions) and fractions == sorted(fractions)
    path = args[1]
    stems = (d.session_dir / "stems").resolve()
    assert str(path).startswith(str(stems)) and path.endswith(".wav")
    info = sf.info(path)
    assert (info.samplerate, info.frames, info.subtype) == (48000, 384000, "PCM_24")  # 4 bars at 120 = 8.0 s
    side = json.loads(open(path[:-4] + ".json").read())
    assert side["job"] == job_id and side["track"] == "drums" and side["bars"] == 4
    assert side["prompt"] == "lofi drums" and side["seconds"] == 8.0
    assert side["params"]["seed"] == 1 and side["params"]["top_k"] == 50
    c.send(f"/job/{job_id}/status")
    assert expect(c, "/job/status") == [job_id, "done", 1.0, path]


def test_continue_a_recorded_take(env):
    import numpy as np

    from audiofile import write_audio

    c = env["c"]
    take = env["allowed"] / "take.wav"
    if not take.exists():
        t = np.arange(44100, dtype=np.float32) / 44100
        write_audio(take, (0.3 * np.sin(2 * np.pi * 220 * t))[None, :], 44100)
    drain(c, 0.1)
    c.send("/track/keys/preset", "plain")
    expect(c, "/ok")
    job_id, _, (address, args) = run_job(c, "/track/keys/continue", str(take), 1.5)
    assert address == "/job/done", args
    assert sf.info(args[1]).frames == 72000
    side = json.loads(open(args[1][:-4] + ".json").read())
    assert side["continuation"] == {"path": str(take.resolve()), "seconds": 1.5,
                                    "sha256": hashlib.sha256(take.read_bytes()).hexdigest()}
    assert state(c, "keys")["continuation"] == {"path": str(take.resolve()), "seconds": 1.5}


def test_cancel_a_queued_and_a_running_job(env):
    c, d = env["c"], env["d"]
    drain(c, 0.1)
    c.send("/track/slow/preset", "plain")
    c.send("/track/short/preset", "plain")
    c.send("/track/slow/generate", 20.0)
    c.send("/track/short/generate", 3.0)  # another length: it cannot share the first job's batch
    first = expect(c, "/job/accepted")[0]
    second = expect(c, "/job/accepted")[0]
    c.send(f"/job/{second}/cancel")
    c.send(f"/job/{first}/cancel")
    ended = {}
    seen: list = []
    while len(ended) < 2:
        r = c.wait_for(lambda a, v: a in ("/job/cancelled", "/job/done", "/error") and v and
                       (v[0] in (first, second) or v[-1] in (first, second)), 60.0, seen)
        assert r is not None, seen
        ended[r[1][0] if r[0] != "/error" else r[1][-1]] = r[0]
    assert ended[second] == "/job/cancelled"
    assert ended[first] == "/job/cancelled"
    assert not list((d.session_dir / "stems").glob("short*")) and not list((d.session_dir / "stems").glob("slow*"))
    c.send(f"/job/{second}/status")
    assert expect(c, "/job/status")[:2] == [second, "cancelled"]
    c.send(f"/job/{second}/cancel")  # already finished: an error, nothing else
    assert expect(c, "/error")[0] == "bad_args"


def _bad_messages(env) -> list[tuple[str, tuple, str]]:
    allowed, outside = env["allowed"], env["outside"]
    stems = env["d"].session_dir / "stems"
    nan_chroma = struct.pack("<12f", *([float("nan")] + [0.0] * 11))
    return [
        ("/nope", (), "bad_address"),
        ("/track/drums", (), "bad_address"),
        ("/track/drums/explode", (), "bad_address"),
        ("/job/abc/cancel", (), "bad_address"),
        ("/track/bad.name/prompt", ("x",), "bad_track"),
        ("/track/" + "a" * 33 + "/prompt", ("x",), "bad_track"),
        ("/track/drums/prompt", (), "bad_args"),
        ("/track/drums/prompt", (3,), "bad_args"),
        ("/track/drums/prompt", ("a", "b"), "bad_args"),
        ("/track/drums/prompt", ("", ), "bad_args"),
        ("/track/drums/prompt", ("x" * 2000,), "limit"),
        ("/ping", (1,), "bad_args"),
        ("/transport/tempo", (float("nan"),), "bad_args"),
        ("/transport/tempo", (float("inf"),), "bad_args"),
        ("/transport/tempo", (1e30,), "bad_args"),
        ("/transport/tempo", ("fast",), "bad_args"),
        ("/transport/signature", (4, 5), "bad_args"),
        ("/track/drums/generate", (1e9,), "limit"),
        ("/track/drums/generate", (31.0,), "limit"),
        ("/track/drums/generate", (100, "bars"), "limit"),
        ("/track/drums/generate", (-2.0,), "bad_args"),
        ("/track/drums/generate", (4, "beats"), "bad_args"),
        ("/track/drums/generate", (4.0, "bars", 99), "bad_args"),
        ("/track/nobody/generate", (4.0,), "not_found"),
        ("/track/drums/param", ("volume", 1.0), "bad_args"),
        ("/track/drums/param", ("guidance", 0.0), "bad_args"),
        ("/track/drums/param", ("top_k", 2.5), "bad_args"),
        ("/track/drums/preset", ("no_such_preset",), "not_found"),
        ("/track/drums/preset", ("../../etc/passwd",), "bad_args"),
        ("/track/drums/melody/midi", ("/etc/passwd",), "bad_path"),
        ("/track/drums/melody/midi", (str(allowed / ".." / "outside" / "take.wav"),), "bad_path"),
        ("/track/drums/melody/audio", (str(allowed / "escape.wav"),), "bad_path"),
        ("/track/drums/melody/midi", ("tune.mid",), "bad_path"),
        ("/track/drums/melody/midi", (str(allowed / "missing.mid"),), "not_found"),
        ("/track/drums/melody/midi", (str(allowed / "tune.mid"),), "model"),  # the tiny model is text-only
        ("/track/drums/continue", (str(outside / "take.wav"), 4.0), "bad_path"),
        ("/track/drums/continue", (str(stems / "none.wav"), 4.0), "not_found"),
        ("/track/drums/melody/chroma", (b"\x00" * 47, 7.8125), "bad_args"),
        ("/track/drums/melody/chroma", (nan_chroma, 7.8125), "bad_args"),
        ("/track/drums/melody/chroma", (b"\x00" * 60_048, 7.8125), "limit"),
        ("/track/drums/melody/notes", (60, 0.0), "bad_args"),
        ("/track/drums/melody/notes", (200, 0.0, 1.0), "bad_args"),
        ("/job/999999/cancel", (), "not_found"),
        ("/job/999999/status", (), "not_found"),
        ("/track/ghost/delete", (), "not_found"),
        ("/jam/start", ("drums",), "unavailable"),
    ]


def test_every_bad_input_answers_error_and_changes_nothing(env):
    c, d = env["c"], env["d"]
    c.send("/track/drums/preset", "plain")
    expect(c, "/ok")
    before = state(c, "drums")
    file_before = (d.session_dir / "session.json").read_bytes()
    for address, args, code in _bad_messages(env):
        drain(c, 0.05)
        c.send(address, *args)
        err = expect(c, "/error")
        assert err[0] == code, (address, args, err)
        assert isinstance(err[1], str) and err[1], (address, err)
    c.send_raw(b"garbage that is not OSC")
    assert expect(c, "/error")[0] == "bad_packet"
    assert state(c, "drums") == before
    assert (d.session_dir / "session.json").read_bytes() == file_before
    c.send("/tracks")
    assert "ghost" not in expect(c, "/tracks")


def test_full_queue_answers_busy(env):
    c = env["c"]
    drain(c, 0.1)
    c.send("/track/busy/preset", "plain")
    expect(c, "/ok")
    for i in range(6):  # lengths differ, so no two share a batch: at most 1 running + 3 queued
        c.send("/track/busy/generate", 20.0 + i)
    accepted, seen = [], []
    busy = 0
    for _ in range(6):
        r = c.wait_for(lambda a, v: a == "/job/accepted" or (a == "/error" and v[0] == "busy"), 10.0, seen)
        assert r is not None, seen
        if r[0] == "/job/accepted":
            accepted.append(r[1][0])
        else:
            busy += 1
    assert busy >= 1 and len(accepted) <= 4
    for j in accepted:
        c.send(f"/job/{j}/cancel")
    left = set(accepted)
    while left:
        r = c.wait_for(lambda a, v: a in ("/job/cancelled", "/job/done") and v[0] in left, 60.0)
        assert r is not None
        left.discard(r[1][0])


def test_variations_param_makes_numbered_takes_in_one_pass(env):
    """/track/<name>/param variations 3: one generate queues three takes, each with its own seed
    (the track's, +1, +2), batched into one engine pass, each written as its own stem."""
    c, d = env["c"], env["d"]
    drain(c, 0.1)
    c.send("/track/keys/preset", "plain")
    expect(c, "/ok")
    c.send("/track/keys/param", "variations", 3)
    assert expect(c, "/ok") == ["/track/keys/param"]
    c.send("/track/keys/generate", 0.5)
    ids = [expect(c, "/job/accepted")[0] for _ in range(3)]
    assert len(set(ids)) == 3
    done, seen = {}, []
    while len(done) < 3:
        r = c.wait_for(lambda a, v: a in ("/job/done", "/error") and v and v[0] in ids, 120.0, seen)
        assert r is not None and r[0] == "/job/done", seen
        done[r[1][0]] = r[1][1]
    paths = [done[i] for i in ids]
    assert len(set(paths)) == 3
    sides = [json.loads(open(p[:-4] + ".json").read()) for p in paths]
    assert [s["params"]["seed"] for s in sides] == [1, 2, 3]  # the preset's seed 1, then +1, +2
    audio = [sf.read(p)[0] for p in paths]
    assert not (audio[0] == audio[1]).all() and not (audio[1] == audio[2]).all()
    assert f"running jobs {ids[0]}, {ids[1]}, {ids[2]} on the engine" in d.log_text()
    # More takes than the queue has room for: refused whole, nothing queued.
    c.send("/track/keys/param", "variations", 4)
    expect(c, "/ok")
    c.send("/track/keys/generate", 0.5)
    err = expect(c, "/error")
    assert err[0] == "busy" and "4 variations" in err[1]
    c.send("/track/keys/param", "variations", 17)
    err = expect(c, "/error")
    assert err[0] == "bad_args" and "variations" in err[1]
    c.send("/track/keys/param", "variations")  # reset
    expect(c, "/ok")


def test_still_answers_after_a_burst_of_malformed_packets(env):
    c, d = env["c"], env["d"]
    before = state(c, "drums")
    c.send("/tracks")
    tracks_before = set(expect(c, "/tracks"))
    rng = random.Random(1234)
    templates = [encode("/track/fz/prompt", ["pad"]), encode("/transport/tempo", [128.0]),
                 encode("/track/fz/melody/chroma", [b"\x00" * 96, 7.8125]),
                 encode("/track/fz/melody/notes", [60, 0.0, 1.0]), b"#bundle\x00" + b"\x00" * 8]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        for i in range(3000):
            kind = i % 3
            if kind == 0:
                data = rng.randbytes(rng.randint(0, 200))
            elif kind == 1:
                t = rng.choice(templates)
                data = t[: rng.randint(0, len(t))]
            else:
                t = bytearray(rng.choice(templates))
                for _ in range(rng.randint(1, 4)):
                    t[rng.randrange(len(t))] = rng.randrange(256)
                data = bytes(t)
            s.sendto(data, ("127.0.0.1", d.port))
    assert d.proc.poll() is None
    for _ in range(20):  # the burst's error replies share this port: look past them for the pong
        c.send("/ping")
        if c.wait_for(lambda a, _: a == "/pong", 2.0):
            break
    else:
        raise AssertionError("no /pong after the burst")
    drain(c, 0.5)
    c.send("/transport/tempo", 120.0)
    expect(c, "/ok")
    assert state(c, "drums") == before
    c.send("/tracks")
    for name in set(expect(c, "/tracks")) - tracks_before:  # byte flips can make valid track names
        c.send(f"/track/{name}/delete")
        expect(c, "/ok")


def test_third_party_client_oscsend(env):
    c = env["c"]
    oscsend = shutil.which("oscsend")
    assert oscsend, "liblo-tools (oscsend) is not installed; run scripts/setup.sh"
    drain(c, 0.1)
    port = str(env["d"].port)
    subprocess.run([oscsend, "localhost", port, "/track/liblo/prompt", "s", "ambient pad"], check=True, timeout=10)
    assert expect(c, "/ok") == ["/track/liblo/prompt"]
    subprocess.run([oscsend, "localhost", port, "/track/liblo/param", "sf", "temperature", "0.5"],
                   check=True, timeout=10)
    assert expect(c, "/ok") == ["/track/liblo/param"]
    subprocess.run([oscsend, "localhost", port, "/transport/signature", "ii", "6", "8"], check=True, timeout=10)
    expect(c, "/ok")
    subprocess.run([oscsend, "localhost", port, "/transport/tempo", "s", "fast"], check=True, timeout=10)
    assert expect(c, "/error")[0] == "bad_args"
    st = state(c, "liblo")
    assert st["prompt"] == "ambient pad" and st["params"] == {"temperature": 0.5}
    c.send("/status")
    status = expect(c, "/status")
    assert status[6] == "6/8" and status[5] == 120.0
    assert status[4] == -1  # --audio none: no live output, no xrun count


def test_positions_are_quarter_notes_in_and_both_units_out(env):
    """/transport/locate takes quarter notes; /transport/state and /status answer in signature beats
    and, last, in quarter notes: in 6/8, quarter note 3 is beat 6, the first beat of bar 2."""
    c = env["c"]
    drain(c, 0.1)
    for address, args in (("/transport/signature", (6, 8)), ("/transport/stop", ()), ("/transport/locate", (3.0,))):
        c.send(address, *args)
        expect(c, "/ok")
    c.send("/transport/state")
    st = expect(c, "/transport/state")
    assert st[2:5] == [6, 8, 0]
    assert st[5] == pytest.approx(6.0) and st[7] == pytest.approx(3.0)
    c.send("/status")
    status = expect(c, "/status")
    assert status[8] == pytest.approx(6.0) and status[13] == pytest.approx(3.0)
    c.send("/transport/signature", 4, 4)
    expect(c, "/ok")


def test_restart_restores_the_session(env, serve_daemon):
    c, d = env["c"], env["d"]
    drain(c, 0.1)
    c.send("/track/keep1/prompt", "warm pad")
    c.send("/track/keep2/preset", "plain")
    c.send("/track/keep2/param", "seed", 5)
    for _ in range(3):
        expect(c, "/ok")
    c.send("/transport/signature", 3, 4)
    expect(c, "/ok")
    c.send("/transport/tempo", 96.0)
    expect(c, "/ok")
    c.send("/tracks")
    tracks = expect(c, "/tracks")
    states = {t: state(c, t) for t in tracks}
    assert {"keep1", "keep2"} <= set(tracks)
    assert states["keep2"]["params"] == {"seed": 5} and states["keep1"]["prompt"] == "warm pad"
    assert d.stop(signal.SIGTERM) == 0
    next_id = json.loads((d.session_dir / "session.json").read_text())["next_job_id"]
    assert "stopped" in d.log_text()

    with serve_daemon(env["base"], env["model"], "--grace", "0", session_dir=d.session_dir,
                      allow_dir=env["allowed"]) as (d2, c2):
        c2.send("/tracks")
        assert expect(c2, "/tracks") == tracks
        assert {t: state(c2, t) for t in tracks} == states
        c2.send("/status")
        assert expect(c2, "/status")[5:7] == [96.0, "3/4"]
        c2.send("/track/keep2/generate", 20.0)  # runs first: the next job waits, silent, behind it
        ahead = expect(c2, "/job/accepted")[0]
        # the project's own client, replies to the sender: 2 bars at 96 bpm in 3/4 = 3.75 s.
        # A short --wait-reply: while queued it polls /job/<id>/status instead of giving up.
        out = subprocess.run([sys.executable, "-m", "bridge.cli", "send", "--port", str(d2.port),
                              "/track/keep2/generate", "i:2", "bars", "--wait-reply", "0.3"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0].startswith("/job/accepted ") and lines[-1].startswith("/job/done ")
        job_id = int(lines[0].split()[1])
        assert ahead == next_id and job_id == next_id + 1  # ids continue across the restart
        path = lines[-1].split(" ", 2)[2]
        assert sf.info(path).frames == 180000

        # SIGINT with --grace 0: the running and the queued job are cancelled, the daemon exits 0
        with d2.client() as c3:
            assert c3.prove()  # a socket of its own: its job events need its address proved (docs/osc.md)
            c3.send("/track/keep2/generate", 30.0)
            c3.send("/track/keep2/generate", 29.0)
            first = expect(c3, "/job/accepted")[0]
            second = expect(c3, "/job/accepted")[0]
            expect(c3, "/job/progress")
            d2.proc.send_signal(signal.SIGINT)
            ended = {}
            while len(ended) < 2:
                r = c3.wait_for(lambda a, v: a in ("/job/cancelled", "/job/done"), 60.0)
                assert r is not None, d2.log_text()
                ended[r[1][0]] = r[0]
            assert ended == {first: "/job/cancelled", second: "/job/cancelled"}
            assert d2.proc.wait(60) == 0
        assert len(list((d.session_dir / "stems").glob("keep2*.wav"))) == 2  # 20 s and 2 bars, no more
