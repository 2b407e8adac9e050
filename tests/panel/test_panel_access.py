"""Who the panel answers: the page loads with this run's token, and is refused without it, from a
foreign Origin (a web page open in the same browser) and under a foreign Host name (DNS rebinding).

Everything runs against a real `musicbridge serve` with the tiny model: plain HTTP requests, the
WebSocket handshake through the `websockets` client, and a real headless Chromium that opens the
panel, a foreign page on another port that tries to drive it, and the panel under a foreign name
resolved to 127.0.0.1 (Chromium's --host-resolver-rules stands in for a rebinding DNS server).
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import threading
from urllib.parse import urlsplit

import pytest

from bridge.cli import main
from bridge.panel.guard import Guard, PanelError, parse_panel
from tests.panel.browser import chromium, panel_url, screenshot, wait_until


@pytest.fixture(scope="module")
def daemon(serve_daemon, tiny_model_dir, tmp_path_factory):
    with serve_daemon(tmp_path_factory.mktemp("panel-access"), tiny_model_dir, "--panel", "127.0.0.1:0") as (d, c):
        yield d, c, panel_url(d.log_text)


def _get(url: str, host: str | None = None, origin: str | None = None, path: str | None = None):
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    headers = {}
    if host is not None:
        headers["Host"] = host
    if origin is not None:
        headers["Origin"] = origin
    conn.request("GET", path if path is not None else f"{u.path}?{u.query}", headers=headers)
    r = conn.getresponse()
    body = r.read().decode("utf-8", "replace")
    conn.close()
    return r.status, body, dict(r.getheaders())


def test_the_page_loads_with_the_token_and_is_refused_without_it(daemon):
    d, _c, url = daemon
    status, body, headers = _get(url)
    assert status == 200 and "<title>musicbridge</title>" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    token = urlsplit(url).query.split("=", 1)[1]
    assert f"token={token}" in body  # the page's own requests carry it
    for path in ("/", "/?token=", "/?token=wrong", "/static/panel.js", "/stems/1/audio", "/ws"):
        status, body, _ = _get(url, path=path)
        assert status == 403 and "token" in body, (path, status, body)
    status, _, headers = _get(url, path=f"/static/panel.js?token={token}")
    assert status == 200 and "javascript" in headers["Content-Type"]
    status, body, _ = _get(url, path=f"/static/../../daemon.py?token={token}")
    assert status == 404
    status, body, _ = _get(url, path=f"/stems/999/audio?token={token}")
    assert status == 404 and "job 999 has no finished stem" in body


def test_a_foreign_host_header_and_a_foreign_origin_are_refused(daemon):
    d, _c, url = daemon
    port = urlsplit(url).port
    status, body, _ = _get(url, host=f"rebind.example:{port}")
    assert status == 421 and "rebind.example" in body
    status, body, _ = _get(url, host="127.0.0.1:1")  # the right name, another port: not us
    assert status == 421
    status, body, _ = _get(url, origin="http://evil.example")
    assert status == 403 and "foreign page" in body
    assert _get(url, host=f"localhost:{port}", origin=f"http://localhost:{port}")[0] == 200
    assert "refused" in d.log_text() and "rebind.example" in d.log_text()


def test_the_websocket_handshake_checks_the_token_and_the_origin(daemon):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    _d, _c, url = daemon
    u = urlsplit(url)
    ws = f"ws://{u.netloc}/ws?{u.query}"
    with connect(ws, origin=f"http://{u.netloc}") as conn:
        hello = json.loads(conn.recv(timeout=10))
        assert hello["type"] == "hello" and hello["parts"]["clock"]["source"] == "typed"
    for bad, kw in ((f"ws://{u.netloc}/ws", {}), (f"ws://{u.netloc}/ws?token=x", {}),
                    (ws, {"origin": "http://evil.example"})):
        with pytest.raises(InvalidStatus) as e:
            with connect(bad, **kw):
                pass
        assert e.value.response.status_code == 403, bad


EVIL_PAGE = """<!doctype html><title>evil</title><body><script>
const out = [];
const ws = new WebSocket("ws://127.0.0.1:%(port)d/ws?token=%(token)s");
ws.onopen = () => { ws.send(JSON.stringify({address: "/track/pwned/prompt", args: ["x"]})); out.push("open"); done(); };
ws.onerror = () => { out.push("ws refused"); done(); };
function done() { document.title = out.join(","); }
</script></body>"""


@contextlib.contextmanager
def _evil_site(page: str):
    """A foreign web site on another loopback port (another origin), serving one page."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/"
    finally:
        srv.shutdown()
        srv.server_close()


def test_in_chromium_the_panel_loads_and_a_foreign_page_or_name_cannot_drive_it(daemon):
    d, c, url = daemon
    u = urlsplit(url)
    token = u.query.split("=", 1)[1]
    with chromium() as browser:
        browser.get(url)
        wait_until("the page connects", lambda: browser.find_element("id", "conn").text == "live")
        wait_until("the clock shows", lambda: browser.find_element("id", "clock").get_attribute("data-source") == "typed")
        screenshot(browser, "loaded")
        # a foreign page that even knows the token: its WebSocket carries its own Origin and is refused
        with _evil_site(EVIL_PAGE % {"port": u.port, "token": token}) as evil:
            browser.get(evil)
            title = wait_until("the foreign page's attempt ends", lambda: browser.title if browser.title != "evil" else "")
            assert title == "ws refused", title
        browser.get(f"http://127.0.0.1:{u.port}/")  # no token
        assert "missing or wrong token" in browser.find_element("tag name", "body").text
    c.send("/tracks")
    tracks = c.wait_for(lambda a, _: a == "/tracks", 10)
    assert tracks is not None and "pwned" not in tracks[1]
    # DNS rebinding: a foreign name that resolves to 127.0.0.1 reaches the port, but not the panel
    with chromium(extra=("--host-resolver-rules=MAP rebind.example 127.0.0.1",)) as browser:
        browser.get(f"http://rebind.example:{u.port}/?{u.query}")
        body = browser.find_element("tag name", "body").text
        assert "not this panel's address" in body and "<title>musicbridge" not in browser.page_source
        screenshot(browser, "refused-rebinding")


def test_panel_flag_values_and_off_loopback_needs_the_key(tmp_path, capsys):
    assert parse_panel("off", 9010) is None
    assert parse_panel("auto", 9010) == ("127.0.0.1", 9011)
    assert parse_panel("auto", 0) == ("127.0.0.1", 0)
    assert parse_panel("[::1]:8000", 9010) == ("::1", 8000)
    for bad in ("9011", "host:", "host:99999", "x"):
        with pytest.raises(PanelError, match="expects off, auto or HOST:PORT"):
            parse_panel(bad, 9010)
    with pytest.raises(PanelError, match="needs the daemon's --key"):
        Guard("0.0.0.0", 9011, "t")
    g = Guard("192.168.1.5", 9011, "tok", key="k" * 16, admits=lambda peer: peer[0].startswith("192.168.1."))
    ok = {"Host": "192.168.1.5:9011"}.get
    assert g.check("/?token=tok&key=" + "k" * 16, ok, ("192.168.1.7", 5)) is None
    assert "key" in g.check("/?token=tok", ok, ("192.168.1.7", 5)).reason
    assert "--allow-from" in g.check("/?token=tok&key=" + "k" * 16, ok, ("10.0.0.1", 5)).reason
    assert g.check("/?token=tok", ok, ("127.0.0.1", 5)) is None  # the machine's own user needs no key
    # through serve: refused before the model loads, with the reason
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--session-dir", str(tmp_path), "--port", "0",
                 "--panel", "0.0.0.0:0"]) == 2
    err = capsys.readouterr().err
    assert "needs the daemon's --key" in err and "no-model" not in err
    assert main(["serve", "--model", str(tmp_path / "no-model"), "--session-dir", str(tmp_path), "--port", "0",
                 "--panel", "nonsense"]) == 2
    assert "expects off, auto or HOST:PORT" in capsys.readouterr().err


def test_panel_off_serves_no_panel(serve_daemon, tiny_model_dir, tmp_path):
    with serve_daemon(tmp_path, tiny_model_dir, "--panel", "off") as (d, c):
        c.send("/ping")
        assert c.wait_for(lambda a, _: a == "/pong", 10)
        assert "panel: open" not in d.log_text()
