"""daw/reaper: the import ReaScript under a real Lua interpreter (Debian lua5.4) with a stand-in `reaper`
table, fed by a real daemon's done list; and the pattern file sends only what musicbridge follows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from bridge.clock.osc_dialects import ADDRESSES
from plugin_host.bwf import read_bext
from tests.bridge.clock.helpers import following_daemon
from tests.bridge.osc_helpers import ROOT, drain, expect

REAPER = ROOT / "daw" / "reaper"


def _lua() -> str:
    lua = shutil.which("lua5.4")
    assert lua, "lua5.4 is not installed (Debian package lua5.4; run scripts/setup.sh)"
    return lua


def _stem(c) -> str:
    drain(c, 0.05)
    c.send("/track/keys/generate", 1, "bars")
    job, _ = expect(c, "/job/accepted")
    r = c.wait_for(lambda a, v: a in ("/job/done", "/error") and v and (v[0] == job or v[-1] == job), 120)
    assert r is not None and r[0] == "/job/done", r
    return r[1][1]


def test_finished_stem_becomes_insert_media_at_its_bwf_offset(tmp_path, tiny_model_dir):
    done = tmp_path / "done.txt"
    with following_daemon(tiny_model_dir, tmp_path, "--done-list", str(done)) as (d, c):
        c.send("/track/keys/preset", "plain")
        expect(c, "/ok")
        c.send("/transport/locate", 32.0)
        expect(c, "/ok")
        before = _stem(c)  # finished before the script starts: not imported again
        lua = subprocess.Popen([_lua(), str(Path(__file__).with_name("reaper_standin.lua")),
                                str(REAPER / "musicbridge_import.lua"), str(done), "60", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert lua.stdout.readline().strip() == "READY"
            path = _stem(c)
            out, err = lua.communicate(timeout=90)
        finally:
            if lua.poll() is None:
                lua.kill()
                lua.wait()
    assert lua.returncode == 0, err
    calls = [ln.split("\t") for ln in out.splitlines()]
    inserts = [cl for cl in calls if cl[0] == "InsertMedia"]
    assert inserts == [["InsertMedia", path, str(1 + 4096)]], calls
    assert int(inserts[0][2]) & 4096  # at the file's BWF start offset
    assert ["GetSetMediaTrackInfo_String", "new-track", "P_NAME", "musicbridge keys", "true"] in calls
    assert before != path and calls[-1] == ["END", "1"]
    assert read_bext(path)["time_reference"] > 0  # the offset REAPER will use: bar 9


def test_script_waits_for_whole_lines_and_a_new_done_list(tmp_path):
    done = tmp_path / "done.txt"
    done.write_text("1\told\t/stems/old.wav\n")
    script = tmp_path / "feed.lua"  # appends half a line, then the rest, then replaces the file
    script.write_text(f"""
dofile({str(REAPER / 'musicbridge_import.lua')!r})
local function append(s) local f = io.open({str(done)!r}, "ab"); f:write(s); f:close() end
append("2\\tbass\\t/stems/ba")
local step = 0
local inner = reaper.defer
reaper.defer = function(fn)
  step = step + 1
  if step == 2 then append("ss.wav\\n") end
  if step == 4 then local f = io.open({str(done)!r}, "wb"); f:write("1\\tnew\\t/other/new.wav\\n"); f:close() end
  inner(fn)
end
""")
    r = subprocess.run([_lua(), str(Path(__file__).with_name("reaper_standin.lua")), str(script), str(done),
                        "10", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    inserts = [ln.split("\t")[1] for ln in r.stdout.splitlines() if ln.startswith("InsertMedia")]
    assert inserts == ["/stems/bass.wav", "/other/new.wav"], r.stdout


def test_pattern_file_sends_only_what_musicbridge_follows():
    sent = {}
    for line in (REAPER / "musicbridge.ReaperOSC").read_text().splitlines():
        words = line.split()
        if not words or line.startswith("#") or words[0].startswith("DEVICE_"):
            continue
        sent[words[0]] = [w.split("/", 1)[1] for w in words[1:]]
    assert set(sent) == {"TEMPO", "PLAY", "STOP", "BEAT"}, sent  # no TIME, SAMPLES, FRAMES, tracks, FX
    addresses = {"/" + p for ps in sent.values() for p in ps}
    assert addresses == {"/tempo/raw", "/play", "/stop", "/beat/str"}
    assert addresses <= set(ADDRESSES)
