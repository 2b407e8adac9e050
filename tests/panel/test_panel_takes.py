"""The takes of a `variations` request in a real headless Chromium against a real `musicbridge serve` with the
tiny model: *Keep this take* sends `/track/<name>/keep` over the daemon's own OSC port, the daemon's reply
and the kept take show in the page, and after a reload the take is still kept (the session records it);
and a stem card dragged with the mouse carries Chromium's `DownloadURL` (mime type, file name, a URL with the token) that
the panel serves as the stem's exact bytes. The kept takes are saved as a screenshot in docs/panel/.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from urllib.parse import parse_qs, urlsplit

import pytest
from selenium.webdriver.common.action_chains import ActionChains

from tests.bridge.osc_helpers import drain, expect, finished
from tests.panel.browser import attribute, chromium, panel_url, replies, screenshot, wait_until


@pytest.fixture(scope="module")
def takes(serve_daemon, tiny_model_dir, tmp_path_factory):
    """A daemon with a panel and three finished takes of track keys (job id -> stem path), made over OSC."""
    base = tmp_path_factory.mktemp("takes")
    with serve_daemon(base, tiny_model_dir, "--panel", "127.0.0.1:0") as (d, c):
        for address, args in (("/track/keys/preset", ("plain",)), ("/track/keys/param", ("variations", 3))):
            c.send(address, *args)
            assert expect(c, "/ok") == [address]
        c.send("/track/keys/generate", 1.0)
        ids = [expect(c, "/job/accepted")[0] for _ in range(3)]
        done = finished(c, ids)
        yield d, c, done


def _card(browser, job: int, attr: str) -> str | None:
    return attribute(browser, f"[data-stem='{job}']", attr)


def _open(browser, d, n: int) -> None:
    browser.get(panel_url(d.log_text))
    _ready(browser, n)


def _ready(browser, n: int) -> None:
    """The page is live and shows `n` stem cards."""
    wait_until("the page connects", lambda: browser.find_element("id", "conn").text == "live")
    wait_until("the takes' cards", lambda: len(browser.find_elements("css selector", "[data-stem]")) == n)


def _track_state(c, track: str) -> dict:
    drain(c, 0.1)
    c.send(f"/track/{track}/state")
    return json.loads(expect(c, f"/track/{track}/state")[0])


def test_keep_a_take_in_the_page_and_it_is_still_kept_after_a_reload(takes):
    d, c, stems = takes
    ids = list(stems)
    with chromium() as browser:
        _open(browser, d, 3)
        group = {browser.find_element("css selector", f"[data-stem='{i}']").find_element("xpath", "..")
                 .get_attribute("data-group") for i in ids}
        assert len(group) == 1, group  # side by side: one group of three takes
        assert [_card(browser, i, "data-kept") for i in ids] == ["0", "0", "0"]
        browser.find_element("css selector", f"[data-stem='{ids[1]}'] button.keep").click()
        wait_until("the daemon's /ok for the keep", lambda: any(r.startswith("/ok \"/track/keys/keep\"")
                                                               for r in replies(browser)))
        wait_until("the kept take shows as kept", lambda: _card(browser, ids[1], "data-kept") == "1")
        wait_until("the other takes are set aside",
                   lambda: [_card(browser, i, "data-set-aside") for i in ids] == ["1", "0", "1"])
        assert "kept" in _card(browser, ids[1], "class") and "set-aside" in _card(browser, ids[0], "class")
        button = browser.find_element("css selector", f"[data-stem='{ids[1]}'] button.keep")
        assert button.text == "Kept" and not button.is_enabled()
        wait_until("the track says which take it keeps",
                   lambda: browser.find_element("css selector", "[data-track=keys]").get_attribute("data-kept")
                   == str(ids[1]))
        assert stems[ids[1]].name in browser.find_element("css selector", "[data-track=keys]").text
        # the daemon's own record, over OSC: the session keeps it
        assert _track_state(c, "keys")["kept"] == {"job": ids[1], "path": str(stems[ids[1]])}
        screenshot(browser, "take-kept")

        browser.refresh()  # a new page knows nothing: what it shows comes from the daemon
        _ready(browser, 3)
        wait_until("still kept after a reload", lambda: [_card(browser, i, "data-kept") for i in ids]
                   == ["0", "1", "0"])
        assert [_card(browser, i, "data-set-aside") for i in ids] == ["1", "0", "1"]
        assert all(p.is_file() for p in stems.values())  # set aside, never deleted


def test_a_stem_card_drags_into_a_daw_as_the_stems_exact_bytes(takes):
    d, c, stems = takes
    job, path = next(iter(stems.items()))
    with chromium() as browser:
        _open(browser, d, 3)
        # a real drag: the mouse presses on the card's link and moves (chromedriver's input, Chromium's own
        # drag), and a listener after the page's own reads what its dragstart handler put in the DataTransfer
        browser.execute_script(
            "window.dragSeen = [];"
            "document.addEventListener('dragstart', (ev) => window.dragSeen.push({trusted: ev.isTrusted,"
            " types: Array.from(ev.dataTransfer.types), value: ev.dataTransfer.getData('DownloadURL'),"
            " href: ev.target.href, stem: ev.target.closest('[data-stem]').dataset.stem}));")
        link = browser.find_element("css selector", f"[data-stem='{job}'] a.drag")
        ActionChains(browser).click_and_hold(link).move_by_offset(10, 10).move_by_offset(40, 80) \
            .move_to_element(browser.find_element("id", "tracks")).release().perform()
        drag = wait_until("Chromium's dragstart", lambda: browser.execute_script("return window.dragSeen[0];"))
    assert drag["trusted"] and drag["stem"] == str(job), drag  # the browser's own event, on this card
    assert "downloadurl" in [t.lower() for t in drag["types"]], drag
    mime, name, url = drag["value"].split(":", 2)  # Chromium's format: MIME:FILE NAME:URL
    assert mime == "audio/wav" and name == path.name, drag
    parts = urlsplit(url)
    panel = urlsplit(panel_url(d.log_text))
    assert (parts.scheme, parts.netloc, parts.path) == ("http", panel.netloc, f"/stems/{job}/audio"), url
    assert parse_qs(parts.query)["token"] == parse_qs(panel.query)["token"], url
    assert url == drag["href"]
    with urllib.request.urlopen(url, timeout=30) as r:
        body, disposition = r.read(), r.headers["Content-Disposition"]
    assert body == path.read_bytes() and len(body) > 44  # the file on disk, byte for byte
    assert disposition == f'attachment; filename="{path.name}"'
    without = f"{parts.scheme}://{parts.netloc}{parts.path}?download=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(without, timeout=30)
    assert refused.value.code == 403  # the token is what lets the DAW's fetch in
