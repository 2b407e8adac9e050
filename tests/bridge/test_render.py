"""Session renders: batching on the engine, exact tempo-locked stems, reproducibility, regeneration
from a sidecar, and errors that name the file, line and key while leaving nothing behind."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from audiofile import read_audio
from bridge.stems.render import TrackBars, regenerate, render_session
from bridge.state.session_file import SessionFileError, load_session
from bridge.stems.output import SidecarError, finish_audio, read_sidecar
from plugin_host.bwf import read_bext, wav_format

SESSION = """\
tempo = 120
signature = "4/4"

[[track]]
name = "drums"
preset = "lofi_drums"
bars = 4
seed = 1

[[track]]
name = "bass"
preset = "synthwave_bass"
bars = 2
start_bar = 3
seed = 2
loop = true

[[track]]
name = "pad"
prompt = "warm ambient pad"
seconds = 1.5
seed = 3
params = { guidance = 2.0, top_k = 50 }
chain = [ { plugin = "Reverb", room_size = 0.6 } ]
"""


@pytest.fixture
def session_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MUSICBRIDGE_PRESETS", str(tmp_path / "no-user-presets"))
    p = tmp_path / "song.toml"
    p.write_text(SESSION)
    return p


@pytest.fixture
def counted(tiny_engine, monkeypatch):
    """The real tiny engine, with its generate() calls recorded (not mocked: it still runs)."""
    calls: list[int] = []
    real = tiny_engine.generate

    def generate(requests, progress=None):
        calls.append(len(requests))
        return real(requests, progress)

    monkeypatch.setattr(tiny_engine, "generate", generate)
    return tiny_engine, calls


def _cli(*args: str) -> int:
    from bridge.cli import main

    return main(list(args))


def test_three_tracks_render_in_one_engine_call_to_exact_stems(session_file, counted, tmp_path):
    engine, calls = counted
    out = tmp_path / "stems"
    out.mkdir()
    bars = TrackBars(["drums", "bass", "pad"], enabled=True, stream=io.StringIO())
    results = render_session(load_session(session_file), engine, out, progress=bars)
    assert calls == [3]  # one batched call, not three
    assert bars.pct == [100, 100, 100]
    assert bars.stream.getvalue().count("100%") >= 3
    paths = {r.name: r.path for r in results}
    assert {n: p.name for n, p in paths.items()} == {"drums": "drums.wav", "bass": "bass.wav", "pad": "pad.wav"}
    drums = wav_format(paths["drums"])  # 4 bars at 120 bpm in 4/4, from the header
    assert (drums["sample_rate"], drums["bits_per_sample"], drums["frames"]) == (48000, 24, 384000)
    assert wav_format(paths["bass"])["frames"] == 192000
    assert wav_format(paths["pad"])["frames"] == 72000
    assert read_bext(paths["drums"])["time_reference"] == 0
    assert read_bext(paths["bass"])["time_reference"] == 4 * 48000  # bar 3 starts at 4.0 s
    side = json.loads(paths["bass"].with_suffix(".json").read_text())
    assert side["seed"] == 2 and side["tempo"] == 120.0 and side["time_signature"] == "4/4"
    assert side["start_bar"] == 3 and side["bars"] == 2 and side["loop"] is True
    assert side["prompt"].endswith(", 120 bpm") and side["preset"]["name"] == "synthwave_bass"
    assert side["model"]["checkpoint_sha256"] and side["engine_version"]
    assert side["batch"]["index"] == 1 and len(side["batch"]["requests"]) == 3
    pad = json.loads(paths["pad"].with_suffix(".json").read_text())
    assert pad["params"]["top_k"] == 50 and pad["params"]["guidance"] == 2.0
    assert pad["render"]["chain"] == [{"plugin": "Reverb", "room_size": 0.6}]


def test_batch_size_splits_engine_calls(session_file, counted, tmp_path):
    engine, calls = counted
    render_session(load_session(session_file), engine, tmp_path, batch_size=2)
    assert calls == [2, 1]


def test_same_file_and_seeds_give_identical_audio(session_file, tiny_engine, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    ra = render_session(load_session(session_file), tiny_engine, a)
    rb = render_session(load_session(session_file), tiny_engine, b)
    assert [r.name for r in ra] == [r.name for r in rb] == ["drums", "bass", "pad"]
    for x, y in zip(ra, rb, strict=True):
        xa, _ = read_audio(x.path)
        ya, _ = read_audio(y.path)
        assert np.array_equal(xa, ya), x.name


def test_sidecar_regenerates_the_same_audio(session_file, tiny_engine, tmp_path):
    results = render_session(load_session(session_file), tiny_engine, tmp_path)
    bass = next(r for r in results if r.name == "bass")
    path, identical = regenerate(bass.path.with_suffix(".json"), tiny_engine)
    assert identical and path.name == "bass-2.wav"
    original, _ = read_audio(bass.path)
    again, _ = read_audio(path)
    assert np.array_equal(original, again)
    assert read_bext(path)["time_reference"] == read_bext(bass.path)["time_reference"]


def test_cli_renders_a_session_with_loop_summary_and_regenerates(session_file, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "rendered"
    model = ["--model", str(tiny_model_dir), "--device", "cpu", "--dtype", "float32"]
    assert _cli("render", str(session_file), "--out", str(out), "--loop", *model) == 0
    summary = json.loads((out / "song.render.json").read_text())
    assert [t["name"] for t in summary["tracks"]] == ["drums", "bass", "pad"]
    assert summary["tempo"] == 120.0 and summary["session_sha256"]
    drums = json.loads((out / "drums.json").read_text())
    assert drums["loop"] is True and drums["render"]["crossfade_samples"] == 16000
    assert wav_format(out / "drums.wav")["frames"] == 384000
    capsys.readouterr()
    assert _cli("render", "--from-sidecar", str(out / "drums.json")) == 0  # recorded model and dtype
    assert "identical to the recorded audio" in capsys.readouterr().out
    a, _ = read_audio(out / "drums.wav")
    b, _ = read_audio(out / "drums-2.wav")
    assert np.array_equal(a, b)


BAD_SESSIONS = [
    ('tempo = 120\ncolour = 1\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\n', 2, "key 'colour': unknown key"),
    ('tempo = 0\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\n', 1, "key 'tempo': expected a tempo"),
    ('tempo = 120\nsignature = "4-4"\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\n', 2, "key 'signature'"),
    ('tempo = 120\n', None, "expected at least one [[track]]"),
    ('tempo = 120\n[[track]]\nname = "a b"\nprompt = "x"\nbars = 1\n', 3, "track 1 ('a b'): key 'name'"),
    ('tempo = 120\n[[track]]\nname = "a"\nbars = 1\n', 2, "track 1 ('a'): key 'prompt'"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\n', 2, "key 'bars': expected exactly one of bars or seconds"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = -2\n', 5, "key 'bars': expected a positive number"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\n[[track]]\nname = "b"\npreset = "nope"\nbars = 1\n',
     8, "track 2 ('b'): key 'preset': unknown preset 'nope'"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\nmelody = "riff.mid"\n', 6, "key 'melody': melody file"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\nparams = { top_k = "x" }\n', 6,
     "key 'params.top_k': expected a whole number"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\nchain = [{ plugin = "Reverb", size = 1 }]\n', 6,
     "key 'chain[0].size': Reverb has no parameter 'size'"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nseconds = 2\nloop = true\n', 6, "key 'loop': a loop needs"),
    ('tempo = 120\n[[track]]\nname = "a"\nprompt = "x"\nbars = 1\n[[track]]\nname = "a"\nprompt = "y"\nbars = 1\n',
     7, "track 2 ('a'): key 'name': track name 'a' is used twice"),
    ('tempo = 120\n[[track]\n', 2, "invalid TOML"),
]


@pytest.mark.parametrize("text, line, match", BAD_SESSIONS)
def test_bad_session_files_name_file_line_and_key(tmp_path, text, line, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SessionFileError) as e:
        load_session(p)
    msg = str(e.value)
    assert msg.startswith(str(p)) and match in msg
    if line is not None:
        assert f"line {line}" in msg


def test_cli_overrides_format_and_rate(session_file, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "flac"
    assert _cli("render", str(session_file), "--out", str(out), "--format", "flac", "--sample-rate", "44100",
                "--model", str(tiny_model_dir), "--dtype", "float32", "--batch-size", "3") == 0
    from pedalboard.io import AudioFile

    with AudioFile(str(out / "drums.flac")) as f:
        assert (f.samplerate, f.frames, f.file_dtype) == (44100, 352800, "int24")
    assert _cli("render", str(session_file), "--sample-rate", "5") == 2
    assert "--sample-rate must be between" in capsys.readouterr().err


def test_bad_session_via_cli_writes_nothing(tmp_path, tiny_model_dir, capsys):
    p = tmp_path / "bad.toml"
    p.write_text(BAD_SESSIONS[8][0])
    out = tmp_path / "out"
    assert _cli("render", str(p), "--out", str(out), "--model", str(tiny_model_dir)) == 2
    err = capsys.readouterr().err
    assert "bad.toml line 8" in err and "unknown preset 'nope'" in err
    assert not out.exists()


def test_melody_on_a_text_only_model_names_the_track_and_writes_nothing(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "riff.mid").write_bytes(b"MThd")
    p = tmp_path / "m.toml"
    p.write_text('tempo = 120\n[[track]]\nname = "lead"\nprompt = "x"\nbars = 1\nmelody = "riff.mid"\n')
    out = tmp_path / "out"
    assert _cli("render", str(p), "--out", str(out), "--model", str(tiny_model_dir), "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert "track 'lead'" in err and "key 'melody'" in err and "text-only" in err
    assert not out.exists()


def test_unwritable_output_folder_is_named_before_anything_runs(session_file, tmp_path, capsys):
    afile = tmp_path / "not-a-folder"
    afile.write_text("")
    assert _cli("render", str(session_file), "--out", str(afile / "stems")) == 2
    assert f"output folder {afile / 'stems'} cannot be created" in capsys.readouterr().err


def test_sidecar_checks(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text('{"kind": "something else"}')
    with pytest.raises(SidecarError, match=r"x\.json: key 'kind'"):
        read_sidecar(bad)
    assert _cli("render", "--from-sidecar", str(tmp_path / "missing.json")) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    assert _cli("render") == 2
    assert "expected a session .toml file" in capsys.readouterr().err


def _render_spec(**kw):
    base = {"tempo": 120.0, "model_samples": 32000 * 8, "crossfade_samples": 0, "loop": False,
            "stretch_to_grid": True, "chain": []}
    return {**base, **kw}


def test_a_drifting_take_is_locked_to_the_grid_at_the_exact_length():
    from plugin_host.tempo import estimate_tempo
    from tests.plugin_host.test_tempo import click_track

    raw = click_track(126.0, 9.5)  # the model played 5 % fast
    audio, report = finish_audio(raw, 32000, _render_spec())
    assert audio.shape == (1, 32000 * 8)
    assert report["grid"]["estimated_bpm"] == pytest.approx(126.0, abs=0.75)
    assert report["grid"]["stretch_factor"] < 1.0
    assert estimate_tempo(audio, 32000, near=120).bpm == pytest.approx(120.0, abs=0.75)


def test_loop_render_wraps_without_a_click_and_chain_runs_before_the_crossfade():

    t = np.arange(32000 * 3) / 32000
    raw = (0.4 * np.sin(2 * np.pi * 331.7 * t)).astype(np.float32)[None, :]
    spec = _render_spec(model_samples=64000, crossfade_samples=8000, loop=True, stretch_to_grid=False,
                        chain=[{"plugin": "Gain", "gain_db": -6.0}])
    audio, _ = finish_audio(raw, 32000, spec)
    assert audio.shape == (1, 64000)
    step = np.abs(np.diff(audio[0])).max()
    assert abs(float(audio[0, 0] - audio[0, -1])) <= step * 1.01
    assert np.abs(audio).max() == pytest.approx(0.4 * 10 ** (-6 / 20), rel=0.02)


def test_a_track_longer_than_the_engine_allows_fails_before_generating(counted, tmp_path):
    engine, calls = counted
    p = tmp_path / "long.toml"
    p.write_text('tempo = 120\n[[track]]\nname = "epic"\nprompt = "x"\nbars = 300\n')
    with pytest.raises(SessionFileError, match=r"track 'epic': key 'bars': 600\.0 s needs .* at most 600 s"):
        render_session(load_session(p), engine, tmp_path)
    assert calls == [] and sorted(x.name for x in tmp_path.iterdir()) == ["long.toml"]
