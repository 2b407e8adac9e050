"""Presets: the shipped set, user overrides, validation errors, and rendering each with the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import presets
from presets import PresetError, list_presets, load_preset, preset_files, user_dir

SHIPPED = {"lofi_drums", "ambient_pad", "synthwave_bass", "acoustic_guitar", "orchestral_strings",
           "techno_lead"}


@pytest.fixture
def user_presets(tmp_path, monkeypatch):
    folder = tmp_path / "user-presets"
    folder.mkdir()
    monkeypatch.setenv("MUSICBRIDGE_PRESETS", str(folder))
    return folder


def test_every_shipped_preset_loads_with_prompt_params_and_chain(user_presets):
    loaded = {p.name: p for p in list_presets()}
    assert SHIPPED <= set(loaded)
    for p in loaded.values():
        assert p.source.parent == presets.SHIPPED_DIR
        assert p.prompt and p.description
        assert p.chain, f"{p.name} has no effect chain"
        assert len(p.build_chain()) == len(p.chain)
        assert p.sampling_params(seed=1).seed == 1


def test_user_folder_overrides_shipped_presets_by_name(user_presets):
    (user_presets / "lofi_drums.toml").write_text('prompt = "my own drums"\nadd_bpm = false\n')
    (user_presets / "my_bells.toml").write_text(
        'description = "bells"\nprompt = "tubular bells"\n[params]\ntop_k = 50\n'
        '[[chain]]\nplugin = "Reverb"\nroom_size = 0.5\n')
    assert preset_files()["lofi_drums"] == user_presets / "lofi_drums.toml"
    mine = load_preset("lofi_drums")
    assert mine.prompt == "my own drums" and mine.chain == ()
    assert mine.prompt_for(120) == "my own drums"  # add_bpm = false
    bells = load_preset("my_bells")
    assert bells.params == {"top_k": 50} and bells.prompt_for(97.5) == "tubular bells, 97.5 bpm"
    assert bells.sampling_params().top_k == 50 and bells.sampling_params(top_k=10).top_k == 10


def test_user_dir_defaults_to_the_config_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MUSICBRIDGE_PRESETS", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert user_dir() == tmp_path / "musicbridge" / "presets"


def test_a_preset_can_be_loaded_from_a_path(tmp_path, user_presets):
    f = tmp_path / "one_off.toml"
    f.write_text('prompt = "glitchy breakbeat"\n')
    assert load_preset(str(f)).name == "one_off"


@pytest.mark.parametrize("text, match", [
    ('prompt = "x"\ncolour = "red"\n', r"unknown key 'colour'"),
    ('description = "no prompt"\n', r"key 'prompt': expected non-empty text"),
    ('prompt = ""\n', r"key 'prompt'"),
    ('prompt = "x"\nadd_bpm = "yes"\n', r"key 'add_bpm': expected true or false"),
    ('prompt = "x"\n[params]\ntop_k = 2.5\n', r"key 'params.top_k': expected a whole number"),
    ('prompt = "x"\n[params]\nguidance = "high"\n', r"key 'params.guidance': expected a number"),
    ('prompt = "x"\n[params]\ngreedy = 1\n', r"key 'params.greedy': expected true or false"),
    ('prompt = "x"\n[params]\nwarmth = 1\n', r"key 'params.warmth': unknown parameter"),
    ('prompt = "x"\n[params]\ntemperature = 0\n', r"key 'params': temperature must be in \(0, 10\]"),
    ('prompt = "x"\n[[chain]]\nplugin = "Reverb"\nroom = 0.3\n', r"key 'chain\[0\]\.room': Reverb has no parameter"),
    ('prompt = "x"\n[[chain]]\nplugin = "Reverbb"\n', r"key 'chain\[0\]\.plugin': unknown plugin 'Reverbb'"),
    ('prompt = "x"\nchain = "Reverb"\n', r"key 'chain': expected an array of tables"),
    ('prompt = "x\n', r"invalid TOML: .*line 1"),
])
def test_bad_presets_name_the_file_and_key(user_presets, text, match):
    (user_presets / "broken.toml").write_text(text)
    with pytest.raises(PresetError, match=match) as e:
        load_preset("broken")
    assert str(user_presets / "broken.toml") in str(e.value)


def test_unknown_preset_lists_the_known_ones(user_presets):
    with pytest.raises(PresetError, match=r"unknown preset 'nope'; expected one of .*lofi_drums"):
        load_preset("nope")
    with pytest.raises(PresetError, match=r"preset file .*missing\.toml does not exist"):
        load_preset("/tmp/missing.toml")


def test_presets_command_lists_shipped_and_reports_bad_user_files(user_presets, capsys):
    from bridge.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in SHIPPED:
        assert name in out
    assert main(["presets", "synthwave_bass"]) == 0
    assert "LadderFilter" in capsys.readouterr().out
    assert main(["presets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert SHIPPED <= {p["name"] for p in listed["presets"]} and listed["errors"] == []
    (user_presets / "broken.toml").write_text('prompt = "x"\n[params]\ntop_k = "many"\n')
    assert main(["presets"]) == 2
    captured = capsys.readouterr()
    assert "lofi_drums" in captured.out
    assert "broken.toml: key 'params.top_k'" in captured.err
    assert main(["presets", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_every_shipped_preset_renders_with_the_tiny_checkpoint(tiny_engine, tmp_path, user_presets):
    from bridge.stems.render import render_session
    from bridge.state.session_file import load_session
    from plugin_host.bwf import wav_format

    names = sorted(p.name for p in list_presets())
    lines = ["tempo = 240", 'signature = "4/4"']
    for i, name in enumerate(names):  # one bar at 240 bpm: 1.0 s each
        lines += ["[[track]]", f'name = "{name}"', f'preset = "{name}"', "bars = 1", f"seed = {i}"]
    session_file = tmp_path / "all.toml"
    session_file.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    results = render_session(load_session(session_file), tiny_engine, out)
    assert [r.name for r in results] == names
    for r in results:
        assert wav_format(r.path)["frames"] == 48000
        meta = json.loads(r.path.with_suffix(".json").read_text())
        preset = load_preset(r.name)
        assert meta["preset"]["name"] == r.name and meta["render"]["chain"] == [dict(c) for c in preset.chain]
        assert meta["prompt"] == preset.prompt_for(240)
        from audiofile import read_audio

        audio, _ = read_audio(r.path)
        assert np.isfinite(audio).all() and np.abs(audio).max() > 0


@pytest.mark.parametrize("stem", ["lead\n", "lead\r", "léad", "ｌｅａｄ"])
def test_a_preset_file_name_outside_the_rule_is_refused_and_not_listed(tmp_path, user_presets, stem):
    (user_presets / "lead.toml").write_text('prompt = "a lead"\n')
    odd = user_presets / f"{stem}.toml"
    odd.write_text('prompt = "an odd lead"\n')
    with pytest.raises(PresetError, match="preset file names must match"):
        presets.load_preset_file(odd)
    assert stem not in preset_files() and "lead" in preset_files()
