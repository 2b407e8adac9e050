"""The panel live, in a real headless Chromium against a real `musicbridge serve` with the tiny models:
the page's controls start a generate and a jam (seen in the daemon's own replies), a job's progress
bar moves and its stem's waveform appears, and during a jam on a JACK dummy server the meters move
and the conditioning chroma strip follows an OSC note. Each state is saved as a screenshot in
docs/panel/ (docs/panel.md shows them).
"""

from __future__ import annotations

from tests.jack_server import jack_server
from tests.panel.browser import attribute, chromium, panel_url, replies, screenshot, wait_until


def _js(browser, script: str):
    return browser.execute_script(script)


def _control(browser, element: str, value: str | None = None) -> None:
    el = browser.find_element("id", element)
    if value is not None:
        el.clear()
        el.send_keys(value)
    else:
        el.click()


def test_the_controls_start_a_job_whose_progress_bar_moves_and_whose_stem_appears(serve_daemon, tiny_model_dir,
                                                                                    tmp_path):
    with serve_daemon(tmp_path, tiny_model_dir, "--panel", "127.0.0.1:0") as (d, c), chromium() as browser:
        browser.get(panel_url(d.log_text))
        wait_until("the page connects", lambda: browser.find_element("id", "conn").text == "live")
        _control(browser, "c-track", "drums")
        _control(browser, "c-prompt", "lofi drums, dusty")
        _control(browser, "c-set-prompt")
        wait_until("the daemon's /ok for the prompt", lambda: any(r.startswith("/ok \"/track/drums/prompt\"")
                                                                   for r in replies(browser)))
        wait_until("the track shows", lambda: browser.find_element("css selector", "[data-track=drums]"))
        assert "lofi drums, dusty" in browser.find_element("css selector", "[data-track=drums]").text
        _control(browser, "c-bars", "10")  # 10 bars at 120 bpm in 4/4: a 20 s job
        _control(browser, "c-generate")
        wait_until("the daemon accepts the job", lambda: any(r.startswith("/job/accepted 1 \"drums\"")
                                                            for r in replies(browser)))
        # read in one script call: the page rebuilds the job list on every update, so an element
        # found in one call may be gone by the next
        state = "const e = document.querySelector(\"[data-job='1']\"); return e && e.dataset.state;"
        wait_until("the job runs or is done", lambda: _js(browser, state) in ("running", "done"))
        if _js(browser, state) == "running":
            screenshot(browser, "job-running")
        wait_until("the job is done", lambda: _js(browser, state) == "done", timeout=120)
        seen = _js(browser, "return window.panelSeen[1];")
        moving = [f for f in seen if 0.0 < f < 1.0]
        assert moving, f"the bar never showed a fraction between 0 and 1: {seen}"
        assert seen == sorted(seen) and seen[-1] == 1.0, seen  # it only moves forward, and ends full
        wave = "[data-stem='1'] canvas.wave"
        wait_until("the stem's waveform is drawn", lambda: attribute(browser, wave, "data-drawn") == "1")
        assert int(attribute(browser, wave, "data-columns")) == 240
        assert abs(float(attribute(browser, "[data-stem='1']", "data-seconds")) - 20.0) < 0.01
        # the waveform really is painted: some column of the canvas is not background
        lit = _js(browser, "const c = document.querySelector(\"[data-stem='1'] canvas.wave\");"
                           "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                           "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n;")
        assert lit > 240
        # the page plays and downloads it from the panel (with the token), as the daemon wrote it
        audio_src = _js(browser, "return document.querySelector(\"[data-stem='1'] audio\").src;")
        ok = _js(browser, f"return fetch({audio_src!r}).then(r => r.ok && r.headers.get('content-type'));")
        assert ok == "audio/wav"
        assert attribute(browser, "[data-stem='1'] a.drag", "draggable") == "true"
        assert "download=1" in attribute(browser, "[data-stem='1'] a.drag", "href")
        assert any(r.startswith("/job/done 1") for r in replies(browser))
        screenshot(browser, "stem-done")
        c.send("/job/1/status")  # the daemon's own view, over OSC
        others: list = []
        r = c.wait_for(lambda a, _: a == "/job/status", 10, others)
        assert r is not None and r[1][1] == "done" and r[1][3].endswith(".wav"), others


def test_during_a_jam_the_meters_update_and_the_chroma_strip_follows_an_osc_note(serve_daemon, tiny_melody_dir,
                                                                                  tmp_path):
    with jack_server(rate=48000, period=256), \
            serve_daemon(tmp_path, tiny_melody_dir, "--audio", "default", "--panel", "127.0.0.1:0") as (d, c), \
            chromium() as browser:
        c.send("/transport/tempo", 240.0)  # one bar = 1 s: chunks of 2 bars come every 2 s
        assert c.wait_for(lambda a, _: a == "/ok", 10)
        browser.get(panel_url(d.log_text))
        wait_until("the page connects", lambda: browser.find_element("id", "conn").text == "live")
        _control(browser, "c-track", "lead")
        _control(browser, "c-prompt", "sax")
        _control(browser, "c-set-prompt")
        wait_until("/ok for the prompt", lambda: any("/track/lead/prompt" in r for r in replies(browser)))
        c.send("/track/lead/note", 64, 100)  # E held
        _control(browser, "c-jam-start")
        wait_until("the daemon's /ok for /jam/start", lambda: any(r.startswith("/ok \"/jam/start\"")
                                                                 for r in replies(browser)))

        def jam_attr(name: str, part: str = "") -> str | None:
            return attribute(browser, f"[data-jam=lead] {part}", name)

        wait_until("two chunks conditioned on E", lambda: int(jam_attr("data-chunks")) >= 2
                   and "4" in jam_attr("data-condition"), timeout=120)
        samples = int(jam_attr("data-samples"))
        wait_until("the meters take more samples", lambda: int(jam_attr("data-samples")) >= samples + 3)
        assert int(jam_attr("data-samples", "canvas[data-meter=realtime_factor]")) >= 3
        assert wait_until("a chunk's output chroma is scored",
                          lambda: _js(browser, "return [...document.querySelectorAll("
                                               "'[data-jam=lead] canvas[data-index]')]"
                                               ".some(c => c.getAttribute('data-output'));"))
        screenshot(browser, "jam-note-e")
        before = jam_attr("data-condition")
        c.send("/track/lead/note", 64, 0)
        c.send("/track/lead/note", 69, 90)  # A
        wait_until("the conditioning strip follows the new note", lambda: jam_attr("data-condition") != before
                   and set(jam_attr("data-condition")) == {"9"}, timeout=120)
        screenshot(browser, "jam-note-a")
        _control(browser, "c-jam-stop")
        wait_until("the daemon's /ok for /jam/stop", lambda: any(r.startswith("/ok \"/jam/stop\"")
                                                                for r in replies(browser)))
        wait_until("the jam stops", lambda: jam_attr("data-state") in ("stopping", "stopped"))
        assert "jam on track lead: started" in d.log_text()
