"""daw/pd: real Pure Data (`pd -nogui -noaudio -nomidi`, Debian puredata-core) loads musicbridge.pd in a
test patch, drives a real daemon to a finished stem with floats, and its outlet prints /job/done."""

from __future__ import annotations

import shutil
import subprocess
import time

from plugin_host.bwf import read_bext
from tests.bridge.osc_helpers import PLAIN_PRESET, ROOT, DaemonProcess, free_udp_port

PATCH = """#N canvas 0 0 400 300 12;
#X declare -path {abs};
#X obj 20 20 loadbang;
#X obj 20 50 delay 300;
#X msg 20 80 tempo 120;
#X msg 20 110 locate 32;
#X msg 120 80 lofi drums 90;
#X msg 220 80 1 bars;
#X obj 20 200 musicbridge drums {port} {reply};
#X obj 20 230 print reply;
#X obj 220 50 delay 800;
#X connect 1 0 2 0;
#X connect 2 0 6 3;
#X connect 1 0 3 0;
#X connect 3 0 6 3;
#X connect 1 0 4 0;
#X connect 4 0 6 0;
#X connect 0 0 1 0;
#X connect 0 0 8 0;
#X connect 8 0 5 0;
#X connect 5 0 6 1;
#X connect 6 0 7 0;
"""


def test_pd_abstraction_drives_the_daemon_to_a_finished_stem(tmp_path, tiny_model_dir):
    pd = shutil.which("pd") or shutil.which("puredata")
    assert pd, "Pure Data is not installed (Debian package puredata-core; run scripts/setup.sh)"
    reply = free_udp_port()
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "plain.toml").write_text(PLAIN_PRESET)
    # Replies go to the patch, as `serve --reply-to 127.0.0.1:REPLY` in daw/pd/README.md.
    d = DaemonProcess(tiny_model_dir, tmp_path / "session", presets, "--reply-to", f"127.0.0.1:{reply}")
    patch = tmp_path / "drive.pd"
    patch.write_text(PATCH.format(abs=ROOT / "daw" / "pd", port=d.port, reply=reply))
    log = tmp_path / "pd.log"
    try:
        c = d.client()
        # The tiny test model cannot embed "bpm": its track takes a preset with add_bpm = false first.
        # (The /ok goes to the reply port; the session file shows the preset once it is applied.)
        deadline = time.monotonic() + 120
        session = tmp_path / "session" / "session.json"
        while not (session.exists() and '"plain"' in session.read_text()):
            assert d.proc.poll() is None and time.monotonic() < deadline, d.log_text()
            c.send("/track/drums/preset", "plain")
            time.sleep(0.5)
        c.sock.close()
        with open(log, "w") as f:
            p = subprocess.Popen([pd, "-nogui", "-noaudio", "-nomidi", "-stderr", "-open", str(patch)],
                                 stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while "reply: job done" not in log.read_text():
                assert p.poll() is None, log.read_text()
                assert d.proc.poll() is None, d.log_text()
                assert time.monotonic() < deadline, log.read_text() + d.log_text()
                time.sleep(0.2)
        finally:
            p.terminate()
            p.wait(10)
    finally:
        d.stop()
    out = log.read_text()
    assert "reply: error" not in out, out
    done = [ln for ln in out.splitlines() if ln.startswith("reply: job done")][0].split()
    assert done[:4] == ["reply:", "job", "done", "1"], done
    stem = done[4]
    assert stem.endswith(".wav")
    assert read_bext(stem)["time_reference"] == 16 * 48000  # Pd's floats: tempo 120, locate 32 -> bar 9
    assert "reply: ok /transport/tempo" in out and "reply: ok /track/drums/prompt" in out


def test_help_patch_loads_cleanly(tmp_path):
    pd = shutil.which("pd") or shutil.which("puredata")
    assert pd, "Pure Data is not installed (Debian package puredata-core; run scripts/setup.sh)"
    help_patch = (ROOT / "daw" / "pd" / "musicbridge-help.pd").read_text()
    port, reply = free_udp_port(), free_udp_port()  # its own ports, not the 9010/9011 of the example
    patch = tmp_path / "help.pd"
    patch.write_text(help_patch.replace("musicbridge drums 9010 9011", f"musicbridge drums {port} {reply}")
                     .replace("#N canvas 60 60 760 560 12;",
                              f"#N canvas 60 60 760 560 12;\n#X declare -path {ROOT / 'daw' / 'pd'};", 1))
    p = subprocess.Popen([pd, "-nogui", "-noaudio", "-nomidi", "-stderr", "-open", str(patch)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(2.0)
    p.terminate()
    out, _ = p.communicate(timeout=10)
    assert "error" not in out.lower() and "couldn't create" not in out, out
