"""One name rule for tracks, presets and stem file names: ASCII letters, digits, '_' and '-',
matched over the whole string. `^...$` let "drums\\n" through (`$` matches before a final
newline), and Unicode look-alikes ("ｄrums", Cyrillic "а") name a different track than the one
a person reads."""

from __future__ import annotations

import json

import pytest

from bridge.osc import protocol as P
from bridge.state import rules as R
from tests.bridge.osc_helpers import drain, expect

BAD = ["drums\n", "drums\r", "drums\r\n", "dr\x00ums", "\ndrums", "dr\tums", "drums ", "ｄrums", "ａ",
       "bаss",  # Cyrillic а
       "drums\u200b", "ß", "١", ""]
GOOD = ["drums", "A-b_9", "x" * R.MAX_TRACK_NAME, "0"]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused_by_every_way_in(name, tmp_path):
    assert not R.is_name(name) and not R.is_name(name, R.MAX_PRESET_NAME)
    with pytest.raises(P.ProtocolError) as e:
        P.parse(f"/track/{name}/prompt", ["pad"])
    assert e.value.code in ("bad_track", "bad_address") if name == "" else e.value.code == "bad_track"
    if name:
        with pytest.raises(P.ProtocolError) as e:
            P.parse("/track/ok/preset", [name])
        assert e.value.code == "bad_args"
        with pytest.raises(P.ProtocolError) as e:
            P.parse("/jam/start", [name])
        assert e.value.code in ("bad_track", "bad_args")

    from bridge.state.session_check import check_session_data

    data = {"version": 1, "transport": {"tempo": 120.0, "numerator": 4, "denominator": 4, "playing": False,
                                       "position": 0.0},
            "tracks": {name: {"prompt": "pad", "preset": "", "params": {}, "melody": None, "continuation": None}}}
    with pytest.raises(ValueError, match="track name"):
        check_session_data(data)

    from bridge.state.session_file import SessionFileError, load_session

    toml = tmp_path / "song.toml"
    toml.write_text(f'tempo = 120\n\n[[track]]\nname = {json.dumps(name)}\nprompt = "pad"\nbars = 1\n',
                    encoding="utf-8")
    with pytest.raises(SessionFileError, match="'name'"):
        load_session(toml)


def test_names_have_their_length_limits():
    assert not R.is_name("x" * (R.MAX_TRACK_NAME + 1)) and R.is_name("x" * (R.MAX_TRACK_NAME + 1), R.MAX_PRESET_NAME)
    assert not R.is_name("x" * (R.MAX_PRESET_NAME + 1), R.MAX_PRESET_NAME)
    with pytest.raises(P.ProtocolError) as e:
        P.parse(f"/track/{'x' * (R.MAX_TRACK_NAME + 1)}/prompt", ["pad"])
    assert e.value.code == "bad_track"


@pytest.mark.parametrize("name", GOOD)
def test_good_names_pass(name):
    assert R.is_name(name) and R.track_name(name) == name
    assert P.parse(f"/track/{name}/prompt", ["pad"]).track == name


def test_the_patterns_match_the_whole_string():
    """fullmatch, not match: nothing may follow the name, a final newline included."""
    assert R._TRACK_NAME.match("drums\n") is not None  # what a prefix match would let through
    assert not R.is_name("drums\n")


def test_a_track_name_with_a_newline_gets_bad_track_from_the_real_daemon(tmp_path, tiny_model_dir, serve_daemon):
    with serve_daemon(tmp_path, tiny_model_dir, allow_dir=tmp_path) as (d, c):
        for name in ("drums\n", "drums\r", "ｄrums", "bаss"):
            drain(c, 0.0)
            c.send(f"/track/{name}/prompt", "pad")
            err = expect(c, "/error")
            assert err[0] == "bad_track" and err[2] == f"/track/{name}/prompt", err
        c.send("/tracks")
        assert expect(c, "/tracks") == []  # nothing was created
        assert "\nbass" not in d.log_text() and "drums\n/" not in d.log_text()  # names are quoted in the log
