"""Input files named over OSC, against the real daemon: limits before decoding, odd file types,
and a path swapped for a symlink after the message was accepted (checked again where it is opened)."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import drain, expect


def wav_header(frames: int, rate: int = 44100, channels: int = 2) -> bytes:
    """A 16-bit PCM WAV header declaring `frames` frames."""
    data = frames * channels * 2
    return (b"RIFF" + struct.pack("<I", min(36 + data, 2**32 - 1)) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * channels * 2, channels * 2, 16) +
            b"data" + struct.pack("<I", min(data, 2**32 - 1)))


def write_take(path, seconds: float = 1.0, rate: int = 32000) -> None:
    from audiofile import write_audio

    t = np.arange(int(rate * seconds), dtype=np.float32) / rate
    write_audio(path, (0.3 * np.sin(2 * np.pi * 220 * t))[None, :], rate)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_melody_dir, serve_daemon):
    base = tmp_path_factory.mktemp("inputs")
    allowed = base / "allowed"
    allowed.mkdir()
    with serve_daemon(base, tiny_melody_dir, "--max-take-seconds", "60", allow_dir=allowed) as (d, c):
        c.send("/track/t/preset", "plain")
        expect(c, "/ok")
        yield {"d": d, "c": c, "allowed": allowed, "base": base}


ANSWER_GUARD = 30.0  # seconds: only a daemon that stopped answering waits this long (not a speed claim)
READ_BOUND = 1 << 20  # bytes the daemon may read while refusing a file: the files here are 2 MB and 1 GB


def refused(c: OscClient, address: str, *args) -> list:
    """Send `address`, then /ping. The replies are one /error and then the /pong, nothing between:
    the message was refused where it was read (the receive thread handles one datagram after the
    other), no job was queued for it, and the daemon went on reading. The /error's arguments."""
    drain(c, 0.05)
    c.send(address, *args)
    c.send("/ping")
    seen: list = []
    assert c.wait_for(lambda a, _: a == "/pong", ANSWER_GUARD, seen) is not None, f"{address}: no /pong; {seen}"
    assert [a for a, _ in seen] == ["/error"], f"{address}: {seen}"
    return seen[0][1]


def test_a_1gb_declared_sparse_wav_is_refused_without_reading_it(env):
    c, d, allowed = env["c"], env["d"], env["allowed"]
    big = allowed / "huge.wav"
    frames = (2**30 - 44) // 4  # ~1 GB of 16-bit stereo, about 6,087 s at 44.1 kHz
    with open(big, "wb") as f:
        f.write(wav_header(frames))
        f.truncate(44 + frames * 4)  # sparse: the daemon used to read all of it
    for address, args in [("/track/t/continue", (str(big), 2.0)), ("/track/t/melody/audio", (str(big),))]:
        before = d.io()["rchar"]
        err = refused(c, address, *args)
        assert err[0] == "limit" and "MB" in err[1], err
        read = d.io()["rchar"] - before
        print(f"\n{address}: refused a 1 GB file, {read} bytes read meanwhile")
        assert read < READ_BOUND, f"{address}: the daemon read {read} bytes while refusing it"
    # the same header on a small file: the declared length is over --max-take-seconds 60
    liar = allowed / "liar.wav"
    liar.write_bytes(wav_header(44100 * 120) + b"\0" * 4096)
    err = refused(c, "/track/t/continue", str(liar), 2.0)
    assert err[0] == "limit" and "declares 120 s" in err[1] and "--max-take-seconds" in err[1], err


def test_fifos_directories_and_devices_are_refused(env):
    c, allowed = env["c"], env["allowed"]
    fifo = allowed / "pipe.wav"
    os.mkfifo(fifo)
    folder = allowed / "folder.wav"
    folder.mkdir()
    for path, kind in [(fifo, "FIFO"), (folder, "directory")]:
        for address, args in [("/track/t/continue", (str(path), 2.0)), ("/track/t/melody/audio", (str(path),))]:
            err = refused(c, address, *args)  # a FIFO opened for reading would block: no /pong
            assert err[0] == "bad_args" and kind in err[1] and "regular file" in err[1], err
    dev = allowed / "zero.wav"
    dev.symlink_to("/dev/zero")  # a device, and outside the allowed folders
    err = refused(c, "/track/t/continue", str(dev), 2.0)
    assert err[0] == "bad_path", err


def test_midi_limits(env):
    c, d, allowed = env["c"], env["d"], env["allowed"]
    big = allowed / "big.mid"
    with open(big, "wb") as f:
        f.write(b"MThd")
        f.truncate(2 * 1024 * 1024)
    before = d.io()["rchar"]
    err = refused(c, "/track/t/melody/midi", str(big))
    assert err[0] == "limit" and "MB" in err[1], err
    read = d.io()["rchar"] - before
    print(f"\nrefused a 2 MB MIDI file, {read} bytes read meanwhile")
    assert read < READ_BOUND, f"the daemon read {read} bytes while refusing a 2 MB file"

    import mido

    busy = allowed / "busy.mid"
    mid = mido.MidiFile()
    track = mido.MidiTrack()
    for i in range(60_000):
        track.append(mido.Message("note_on", note=60, velocity=64, time=1))
        track.append(mido.Message("note_off", note=60, velocity=0, time=1))
    mid.tracks.append(track)
    mid.save(busy)
    assert busy.stat().st_size < 1024 * 1024
    drain(c, 0.05)
    c.send("/track/t/melody/midi", str(busy))
    expect(c, "/ok")  # only the size is checked on the OSC thread; events are counted by the job
    c.send("/track/t/generate", 1.0)
    job = expect(c, "/job/accepted")[0]
    err = c.wait_for(lambda a, v: a == "/error" and v[-1] == job, 60.0)
    assert err is not None and err[1][0] == "limit" and "120001 events" in err[1][1], err
    c.send("/track/t/melody/clear")
    expect(c, "/ok")


def test_a_symlink_swapped_in_after_acceptance_is_bad_path(env):
    c, allowed, base = env["c"], env["allowed"], env["base"]
    take = allowed / "swap.wav"
    write_take(take)
    secret = base / "secret.wav"  # outside every allowed folder
    write_take(secret)
    drain(c, 0.05)
    c.send("/track/t/generate", 30.0)  # runs first, so the continuation waits in the queue
    blocker = expect(c, "/job/accepted")[0]
    c.send("/track/t/continue", str(take), 1.0)
    job = expect(c, "/job/accepted")[0]
    take.unlink()
    take.symlink_to(secret)
    c.send(f"/job/{blocker}/cancel")
    err = c.wait_for(lambda a, v: (a == "/error" and v[-1] == job) or (a == "/job/done" and v[0] == job), 60.0)
    assert err is not None and err[0] == "/error", err
    assert err[1][0] == "bad_path" and "outside the allowed folders" in err[1][1], err
