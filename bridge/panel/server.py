"""The panel's server: the page, its files and finished stems over HTTP, the live state over a WebSocket.

One asyncio loop on its own thread serves everything (`websockets`; its `process_request` hook
answers the plain HTTP requests), so nothing here runs on the OSC thread, a jam's thread or the
audio callback. Every request passes `bridge.panel.guard.Guard` first. The state is read at most
UPDATES_PER_SECOND times a second and only the parts that changed are pushed.

The controls are OSC: the page sends (address, args) over the WebSocket and the panel sends that
message to the daemon's own OSC port from a loopback UDP socket, so each control goes through the
same parser, rules and handlers as a DAW's message; the daemon's replies come back to that socket
and are shown in the page (with `serve --reply-to` they go there instead, as for every sender).
"""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import threading
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from websockets.asyncio.server import broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Response

from bridge.osc.udp import OscEncodeError, decode, encode
from bridge.panel.guard import Guard, PanelError, is_loopback_host, new_token
from bridge.panel.thumbs import thumb_of
from bridge.panel.view import PanelView

log = logging.getLogger("musicbridge.panel")
WS_LOG = logging.getLogger("musicbridge.panel.ws")
WS_LOG.setLevel(logging.WARNING)  # its per-connection lines would drown the daemon's log; refusals are logged here

STATIC = Path(__file__).resolve().parent / "static"
UPDATES_PER_SECOND = 10
REPLIES_KEPT = 60
MAX_CONTROL_BYTES = 8192
MAX_CONTROL_ARGS = 16


class PanelServer:
    """The panel of one running daemon; a context manager (bound and serving on enter, stopped on exit)."""

    def __init__(self, daemon, host: str = "127.0.0.1", port: int = 0, *, key: str | None = None,
                 token: str | None = None, fallback_port: bool = False):
        """fallback_port: when `port` is taken, serve on any free port instead of failing (the default
        panel, which nobody asked for by number)."""
        self.daemon, self.host, self.port = daemon, host, port
        self.token = token or new_token()
        self.guard = Guard(host, port, self.token, key, admits=daemon.access.admits)
        self.view = PanelView(daemon)
        self.fallback_port = fallback_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._clients: set[Any] = set()
        self._parts: dict[str, str] = {}  # part -> its JSON as last pushed
        self._replies: deque[dict[str, Any]] = deque(maxlen=REPLIES_KEPT)
        self._osc: asyncio.DatagramTransport | None = None
        self._thumbs: dict[str, bytes] = {}
        self.refused = 0
        self.updates = 0  # pushes made (tests check the rate stays bounded)

    # ------------------------------------------------------------ lifetime

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/?token={quote(self.token)}"

    def __enter__(self) -> PanelServer:
        self._thread = threading.Thread(target=self._run, name="panel", daemon=True)
        self._thread.start()
        self._ready.wait(30.0)
        if self._error is not None:
            self._thread.join(5.0)
            raise PanelError(f"cannot serve the panel on {self.host}:{self.port}: "
                             f"{getattr(self._error, 'strerror', None) or self._error}; choose another with "
                             "--panel HOST:PORT, or --panel off")
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(10.0)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # noqa: BLE001 - reported to __enter__ (bind) or logged (later)
            if not self._ready.is_set():
                self._error = e
                self._ready.set()
            else:
                log.exception("the panel stopped")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        kw = dict(process_request=self._http, compression=None, max_size=MAX_CONTROL_BYTES, server_header=None,
                  logger=WS_LOG)
        try:
            server = await serve(self._ws, self.host, self.port, **kw)
        except OSError:
            if not (self.fallback_port and self.port):
                raise
            log.info("panel: port %d is taken; serving the panel on a free port instead", self.port)
            server = await serve(self._ws, self.host, 0, **kw)
        async with server:
            self.port = server.sockets[0].getsockname()[1]
            self.guard.set_port(self.port)
            await self._open_osc()
            self._ready.set()
            pusher = asyncio.create_task(self._push_loop())
            await self._stop.wait()
            pusher.cancel()
            if self._osc is not None:
                self._osc.close()
            server.close()

    # ------------------------------------------------------------ HTTP

    async def _http(self, connection, request):
        def answer(status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> Response:
            h = Headers()
            h["Content-Type"] = ctype
            h["Content-Length"] = str(len(body))
            h["Cache-Control"] = "no-store"
            h["X-Content-Type-Options"] = "nosniff"
            h["X-Frame-Options"] = "DENY"  # no foreign page may frame the panel (clickjacking)
            h["Referrer-Policy"] = "no-referrer"  # the token never leaves in a Referer
            for k, v in (extra or {}).items():
                h[k] = v
            return Response(status, HTTPStatus(status).phrase, h, body)

        refusal = self.guard.check(request.path, request.headers.get, connection.remote_address)
        if refusal is not None:
            self.refused += 1
            if self.refused <= 20 or self.refused % 100 == 0:
                log.info("panel: refused %s from %s: %s", request.path.split("?")[0][:80],
                         (connection.remote_address or ("?",))[0], refusal.reason)
            return answer(refusal.status, (refusal.reason + "\n").encode(), "text/plain; charset=utf-8")
        parts = urlsplit(request.path)
        path, query = parts.path, parse_qs(parts.query)
        if path == "/ws":
            return None  # the WebSocket handshake goes on
        if path in ("/", "/index.html"):
            q = "token=" + quote(self.token) + (("&key=" + quote(query["key"][0])) if "key" in query else "")
            page = (STATIC / "index.html").read_text(encoding="utf-8").replace("__QUERY__", q)
            ws = f"ws://{request.headers['Host']}"
            csp = (f"default-src 'self'; connect-src 'self' {ws}; img-src 'self' data:; media-src 'self'; "
                   "style-src 'self'; script-src 'self'; frame-ancestors 'none'")
            return answer(200, page.encode(), "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            files = {p.name: p for p in STATIC.iterdir() if p.is_file()}  # by name only: no path walks out
            f = files.get(name)
            if f is None:
                return answer(404, b"no such file\n", "text/plain")
            return answer(200, f.read_bytes(), mimetypes.guess_type(f.name)[0] or "application/octet-stream")
        if path.startswith("/stems/"):
            return await self._stem(path, query, answer)
        return answer(404, b"not found\n", "text/plain")

    async def _stem(self, path: str, query: dict[str, list[str]], answer: Callable) -> Any:
        """/stems/<job>/audio (play, or ?download=1 save) and /stems/<job>/thumb.json: only stems of this daemon's jobs."""
        bits = path.strip("/").split("/")
        if len(bits) != 3 or not bits[1].isdigit() or bits[2] not in ("audio", "thumb.json"):
            return answer(404, b"expected /stems/<job id>/audio or /stems/<job id>/thumb.json\n", "text/plain")
        f = self.view.stem_path(int(bits[1]))
        if f is None or not Path(f).is_file():
            return answer(404, f"job {bits[1]} has no finished stem\n".encode(), "text/plain")
        f = Path(f)
        if bits[2] == "thumb.json":
            cached = self._thumbs.get(str(f))
            if cached is None:
                try:  # off the loop: reading and transforming a long stem takes a moment
                    thumb = await asyncio.get_running_loop().run_in_executor(None, thumb_of, f)
                    cached = json.dumps(thumb.to_json(), separators=(",", ":")).encode()
                except Exception as e:  # noqa: BLE001 - an unreadable stem is a 500 naming why, not a crash
                    return answer(500, f"cannot read {f.name}: {e}\n".encode(), "text/plain")
                self._thumbs[str(f)] = cached
            return answer(200, cached, "application/json")
        ctype = {".wav": "audio/wav", ".flac": "audio/flac"}.get(f.suffix.lower(), "application/octet-stream")
        how = "attachment" if query.get("download") else "inline"
        body = await asyncio.get_running_loop().run_in_executor(None, f.read_bytes)
        return answer(200, body, ctype, {"Content-Disposition": f'{how}; filename="{f.name}"'})

    # ------------------------------------------------------------ WebSocket

    async def _ws(self, conn) -> None:
        self._clients.add(conn)
        try:
            await conn.send(json.dumps({"type": "hello", "parts": {k: json.loads(v) for k, v in self._parts.items()},
                                        "replies": list(self._replies)}))
            async for message in conn:
                await conn.send(json.dumps(self._control(message)))
        except Exception:  # noqa: BLE001 - a page that goes away mid-send is not an error
            pass
        finally:
            self._clients.discard(conn)

    def _control(self, message: str | bytes) -> dict[str, Any]:
        """One control from the page: {"address": "/track/a/prompt", "args": ["..."]}, sent as OSC to the
        daemon (which checks it as it checks every message). Returns what to tell the page."""
        try:
            c = json.loads(message)
        except (TypeError, ValueError):
            return {"type": "refused", "reason": "a control must be JSON: {\"address\": \"/...\", \"args\": [...]}"}
        if not isinstance(c, dict) or not isinstance(c.get("address"), str) or not c["address"].startswith("/"):
            return {"type": "refused", "reason": "a control needs \"address\": an OSC address starting with '/'"}
        args = c.get("args", [])
        if (not isinstance(args, list) or len(args) > MAX_CONTROL_ARGS
                or not all(isinstance(a, (str, int, float)) and not isinstance(a, bool) for a in args)):
            return {"type": "refused", "reason": f"\"args\" must be a list of at most {MAX_CONTROL_ARGS} "
                                                 "strings and numbers"}

        try:
            data = encode(c["address"][:256], args)
        except (OscEncodeError, ValueError, OverflowError) as e:
            return {"type": "refused", "reason": f"cannot send that as OSC: {e}"}
        if self._osc is None:
            return {"type": "refused", "reason": "the panel has no OSC socket"}
        self._osc.sendto(data, self._osc_target())
        return {"type": "sent", "address": c["address"], "args": args}

    # ------------------------------------------------------------ OSC to the daemon

    def _osc_target(self) -> tuple[str, int]:
        host = self.daemon.config.host
        if host in ("0.0.0.0", "") or is_loopback_host(host):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return host, self.daemon.server.port

    async def _open_osc(self) -> None:
        panel = self
        target = self._osc_target()

        class Replies(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                panel._reply(data)

        local = ("::1" if ":" in target[0] and is_loopback_host(target[0]) else
                 "127.0.0.1" if is_loopback_host(target[0]) else "0.0.0.0", 0)
        self._osc, _ = await asyncio.get_running_loop().create_datagram_endpoint(Replies, local_addr=local)
        # the panel is part of the daemon, so its socket is an address that receives: no cookie round
        # trip is needed for job events to reach the page (docs/osc.md, "Reply budget")
        sockname = self._osc.get_extra_info("sockname")
        self.daemon.budget.trust((sockname[0], sockname[1]))
        key = self.daemon.config.key
        if key and not is_loopback_host(target[0]):  # a non-loopback daemon address needs the key, as any sender

            self._osc.sendto(encode("/hello", [key]), target)

    def _reply(self, data: bytes) -> None:
        try:
            messages = decode(data)
        except Exception:  # noqa: BLE001 - only the daemon answers here; a bad datagram is dropped
            return

        for address, args in messages:
            r = {"type": "reply", "address": address,
                 "args": [a if isinstance(a, (str, int, float, bool)) or a is None else f"<{len(a)} bytes>"
                          if isinstance(a, (bytes, bytearray)) else str(a) for a in args]}
            self._replies.append(r)
            broadcast(self._clients, json.dumps(r))

    # ------------------------------------------------------------ pushing the state

    async def _push_loop(self) -> None:
        while True:
            snap = self.view.snapshot()  # never raises: a part that fails is left out (and logged rarely)
            changed = {}
            for part, value in snap.items():
                text = json.dumps(value, separators=(",", ":"))
                if self._parts.get(part) != text:
                    self._parts[part] = text
                    changed[part] = text
            if changed and self._clients:
                body = ",".join(f"{json.dumps(k)}:{v}" for k, v in changed.items())
                broadcast(self._clients, f'{{"type":"state","parts":{{{body}}}}}')
                self.updates += 1
            await asyncio.sleep(1.0 / UPDATES_PER_SECOND)
