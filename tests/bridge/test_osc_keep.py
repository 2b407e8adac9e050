"""Keeping one take of a track (`/track/<name>/keep i:job`): the rule on the wire and in session.json is
one rule, and through a real `musicbridge serve --model tiny` over UDP the kept take is recorded in the
session, reported by `/track/<name>/state`, refused with a clear error for an unknown job, another
track's job or a job not done, and still kept after the daemon restarts; no take's file is deleted.
"""

from __future__ import annotations

import json
import signal

import pytest

from bridge.osc import protocol as P
from bridge.state import rules as R
from bridge.state.rules import ProtocolError
from bridge.state.session import KeptTake, LiveSession
from bridge.state.session_check import check_session_data
from tests.bridge.osc_helpers import drain, expect, finished


def _session(kept) -> dict:
    return {"version": 1, "transport": {"tempo": 120.0, "numerator": 4, "denominator": 4, "playing": False,
                                       "position": 0.0},
            "tracks": {"t": {"prompt": "pad", "preset": "", "params": {}, "melody": None, "continuation": None,
                             "kept": kept}},
            "next_job_id": 3}


@pytest.mark.parametrize("job", [0, -1, R.MAX_JOB_ID + 1, True, 2.5, "3"])
def test_a_job_id_the_wire_refuses_the_loader_refuses(job):
    with pytest.raises(ProtocolError) as wire:
        P.parse("/track/t/keep", [job])
    assert wire.value.code == "bad_args", wire.value.message
    with pytest.raises(ValueError) as file:
        check_session_data(_session({"job": job, "path": "/stems/t.wav"}))
    assert "tracks.t.kept.job" in str(file.value), str(file.value)


@pytest.mark.parametrize("kept,says", [
    ({"job": 3}, "tracks.t.kept.path"),
    ({"job": 3, "path": ""}, "tracks.t.kept.path"),
    ({"job": 3, "path": "/a\x00b.wav"}, "tracks.t.kept.path"),
    ([3, "/stems/t.wav"], "tracks.t.kept must be an object"),
])
def test_the_loader_refuses_a_malformed_kept_take(kept, says):
    with pytest.raises(ValueError) as e:
        check_session_data(_session(kept))
    assert says in str(e.value), str(e.value)


def test_what_the_wire_accepts_the_session_saves_and_loads(tmp_path):
    cmd = P.parse("/track/t/keep", [R.MAX_JOB_ID])
    assert cmd.job_id == R.MAX_JOB_ID and P.parse("/track/t/keep", []).job_id is None
    assert P.parse("/track/t/keep", [7.0]).job_id == 7  # a whole float, as every job id
    s = LiveSession(tmp_path)
    s.update_track("t", prompt="pad")
    s.update_track("t", kept=KeptTake(cmd.job_id, "/stems/t-1.wav"))
    check_session_data(json.loads(s.path.read_text()))
    again = LiveSession(tmp_path)
    assert again.track("t").kept == KeptTake(R.MAX_JOB_ID, "/stems/t-1.wav")
    assert again.track("t").to_json()["kept"] == {"job": R.MAX_JOB_ID, "path": "/stems/t-1.wav"}
    again.clear_track("t")  # /track/<name>/clear forgets the kept take with the other settings
    assert LiveSession(tmp_path).track("t").kept is None


def _state(c, track: str) -> dict:
    drain(c, 0.1)
    c.send(f"/track/{track}/state")
    return json.loads(expect(c, f"/track/{track}/state")[0])


def _error(c, address: str, *args) -> list:
    drain(c, 0.1)
    c.send(address, *args)
    return expect(c, "/error")


def test_keep_a_take_over_osc_and_after_a_restart(serve_daemon, tiny_model_dir, tmp_path):
    with serve_daemon(tmp_path, tiny_model_dir, "--grace", "0", reply_to=True) as (d, c):
        for address, args in (("/track/keys/preset", ("plain",)), ("/track/keys/param", ("variations", 3)),
                              ("/track/bass/preset", ("plain",))):
            c.send(address, *args)
            assert expect(c, "/ok") == [address]
        c.send("/track/keys/generate", 0.5)
        ids = [expect(c, "/job/accepted")[0] for _ in range(3)]
        done = finished(c, ids)
        c.send("/track/bass/generate", 30.0)  # a long job: still queued or running when it is asked for
        busy = expect(c, "/job/accepted")[0]
        assert _state(c, "keys")["kept"] is None

        # the errors, each naming why, and none changes the session
        before = (d.session_dir / "session.json").read_bytes()
        err = _error(c, "/track/keys/keep", 999)
        assert err[0] == "not_found" and "no job 999" in err[1], err
        err = _error(c, "/track/bass/keep", ids[0])
        assert err[0] == "bad_args" and "take of track 'keys', not of 'bass'" in err[1] and err[3] == ids[0], err
        err = _error(c, "/track/bass/keep", busy)
        assert err[0] == "bad_args" and "not done" in err[1] and err[3] == busy, err
        err = _error(c, "/track/nobody/keep", ids[0])
        assert err[0] == "not_found" and "no track 'nobody'" in err[1], err
        err = _error(c, "/track/keys/keep", "2")
        assert err[0] == "bad_args" and "job id" in err[1], err
        assert (d.session_dir / "session.json").read_bytes() == before
        c.send(f"/job/{busy}/cancel")
        expect(c, "/job/cancelled")

        # keep the second take: saved, reported, and every take's file stays
        drain(c, 0.1)
        c.send("/track/keys/keep", ids[1])
        assert expect(c, "/ok") == ["/track/keys/keep"]
        kept = {"job": ids[1], "path": str(done[ids[1]])}
        assert _state(c, "keys")["kept"] == kept
        assert json.loads((d.session_dir / "session.json").read_text())["tracks"]["keys"]["kept"] == kept
        assert all(p.is_file() for p in done.values())
        c.send("/track/keys/keep", ids[2])  # another take of the same request: it replaces the first
        expect(c, "/ok")
        assert _state(c, "keys")["kept"]["job"] == ids[2]
        gone = done[ids[0]].with_suffix(".moved")  # a stem moved away by hand since its job finished
        done[ids[0]].rename(gone)
        err = _error(c, "/track/keys/keep", ids[0])
        assert err[0] == "not_found" and "no longer on disk" in err[1], err
        gone.rename(done[ids[0]])
        c.send("/track/keys/keep", ids[0])
        expect(c, "/ok")
        assert "track keys: keeps the take of job" in d.log_text()
        assert d.stop(signal.SIGTERM) == 0

    with serve_daemon(tmp_path, tiny_model_dir, "--grace", "0", session_dir=d.session_dir) as (d2, c2):
        assert _state(c2, "keys")["kept"] == {"job": ids[0], "path": str(done[ids[0]])}  # restored from session.json
        # this run's job queue does not know the last run's jobs: keeping one again is refused, naming why
        err = _error(c2, "/track/keys/keep", ids[1])
        assert err[0] == "not_found" and f"no job {ids[1]}" in err[1], err
        assert _state(c2, "keys")["kept"]["job"] == ids[0]
        c2.send("/track/keys/keep")  # no argument: the track keeps no take, and the files stay
        assert expect(c2, "/ok") == ["/track/keys/keep"]
        assert _state(c2, "keys")["kept"] is None
        assert all(p.is_file() for p in done.values())
