"""The daemon's side of a remote engine: `RemoteEngine` has the face of `model.engine.Engine` that
the bridge uses, and sends the decoding to a `musicbridge worker` (a Ray Serve app, model/remote/app.py).

- Offline requests go out one HTTP request each, concurrently, so Serve's proxy spreads them
  over replicas and each replica batches what arrives together. A request whose replica dies (or
  that cannot reach one) is sent again, with the same seed, so the retry makes the same take; after
  `retries` tries it fails with `RemoteJobFailed`, which the job queue reports. Nothing waits
  without a deadline.
- A jam is one WebSocket (`RemoteLiveStream`, the face of `model.decode.live_stream.LiveStream`);
  the client keeps the jam's own last codes, so when the replica holding it dies, it reconnects
  (to whichever replica Serve gives it) and the new one continues from those codes.
- Codes come back, and the codec runs here, on the daemon's own copy of the checkpoint's EnCodec
  (checked to be the worker's, weight for weight), so a take decodes to the same samples as a
  local one.

This module needs only the standard library and `websockets`, not Ray.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import connect

from model.decode.scheduler import StepGate
from model.load.resolve import ModelError, resolve_model
from model.remote.wire import (PROTOCOL, ServedBy, TokensResult, WireError, array_from_json, array_to_json,
                               codec_digest, info_from_json, piece_from_bytes, request_to_json)
from model.types import AudioChunk, Cancelled, GenerationRequest, RequestError, SamplingParams

log = logging.getLogger("musicbridge.remote")

KEY_HEADER = "x-musicbridge-key"
MIN_KEY = 16


class RemoteError(Exception):
    """The remote engine cannot be used as asked: unreachable, refused, or not the same model."""


class RemoteJobFailed(RuntimeError):
    """A request that failed on every try (its replicas died or could not be reached)."""


class _Refused(Exception):
    """The worker answered and said no (4xx): retrying would not help."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def check_key(key: str | None) -> str:
    if not key or len(key) < MIN_KEY or len(key) > 256:
        raise RemoteError(f"a remote engine needs a key of {MIN_KEY}-256 characters (--engine-key, or "
                          "$MUSICBRIDGE_ENGINE_KEY): the same one `musicbridge worker --key` was given")
    return key


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"its certificate is not trusted here ({e.verify_message}); give the worker's certificate, "
                "or the authority that signed it, with --engine-ca PEM")
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class RemoteEngine:
    """A remote engine at `url` (http[s]://host:port of `musicbridge worker`), used like a local one.

    Open it with `RemoteEngine.connect` (which checks it can be reached, the key, and the codec);
    a context manager: closing stops its health poll.
    """

    def __init__(self, url: str, key: str, info: dict[str, Any], codec_hf, *, ca_file: str | None = None,
                 retries: int = 3, retry_seconds: float = 120.0, poll_seconds: float = 3.0):

        self.url = url.rstrip("/")
        self._key = key
        self._ssl = _ssl_context(self.url, ca_file)
        self.retries, self.retry_seconds = retries, retry_seconds
        self._info = info_from_json(info["engine"])
        i = self._info
        self.hf = codec_hf
        self.sample_rate, self.channels, self.num_codebooks = i.sample_rate, i.channels, i.num_codebooks
        self.frame_rate, self.is_melody, self.chroma_frame_rate = i.frame_rate, i.is_melody, i.chroma_frame_rate
        self.device, self.dtype = i.device, i.dtype
        self.window_seconds = float(info["window_seconds"])
        self.hop = int(round(self.sample_rate / self.frame_rate))
        # The bridge waits on `gate.offline_turn` between live chunks; live steps run on the worker,
        # so this local gate never has a live session and never makes anyone wait.
        self.gate = StepGate()
        self.step_hook: Callable[[], None] | None = None
        self.served_by: list[ServedBy] = []  # who made each result, in order (render summaries, tests)
        self.retried = 0  # requests sent again after a replica died or could not be reached
        self._lock = threading.Lock()
        self._health = (True, "ok", time.monotonic())
        self._closed = threading.Event()
        self._poll = threading.Thread(target=self._poll_health, args=(poll_seconds,), name="engine-health",
                                      daemon=True)
        self._poll.start()

    @classmethod
    def connect(cls, url: str, key: str | None, model: str = "auto", *, ca_file: str | None = None,
                timeout: float = 10.0, **kw) -> RemoteEngine:
        """Reach the worker, check the key and the codec; RemoteError with a one-line reason if not.

        `model`: this machine's copy of the worker's checkpoint, for the codec ('auto': the path or
        Hugging Face id the worker reports, resolved here)."""
        from model.engine import load_checkpoint  # torch loads only where this runs

        split = urlsplit(url)
        if split.scheme not in ("http", "https") or not split.hostname:
            raise RemoteError(f"--engine expects http://HOST:PORT or https://HOST:PORT, got {url!r}")
        key = check_key(key)
        try:
            info = _request(url.rstrip("/") + "/v1/info", key, None, timeout, _ssl_context(url, ca_file))
        except _Refused as e:
            raise RemoteError(f"the engine at {url} refused us: {e}") from None
        except (OSError, urllib.error.URLError, ValueError) as e:
            raise RemoteError(f"cannot reach the engine at {url}: {_describe(e)} (is `musicbridge worker` "
                              "running there, and is the address right?)") from None
        if info.get("protocol") != PROTOCOL:
            raise RemoteError(f"the engine at {url} speaks protocol {info.get('protocol')}, this daemon {PROTOCOL}: "
                              "run the same musicbridge version on both machines")
        label, path = info["engine"]["label"], info["engine"]["path"]
        spec = model if model != "auto" else (path if _is_dir(path) else label)
        try:
            hf, _tok = load_checkpoint(resolve_model(spec), "cpu")
        except (ModelError, OSError, ValueError) as e:
            raise RemoteError(f"the engine at {url} runs {label}; this machine needs the same checkpoint for "
                              f"the codec (--model): {e}") from None
        if codec_digest(hf.audio_encoder) != info["codec_sha256"]:
            raise RemoteError(f"the engine at {url} runs {label}, whose codec differs from {spec}'s here; "
                              "give --model the same checkpoint the worker loaded")
        log.info("remote engine at %s: %s on %s in %s (replica %s)", url, label, info["engine"]["device"],
                 info["engine"]["dtype"], info["served_by"]["replica"])
        return cls(url, key, info, hf, ca_file=ca_file, **kw)

    # ------------------------------------------------------------ the engine's face

    @property
    def info(self):
        return self._info

    def frames_for(self, seconds: float) -> int:
        return max(1, int(round(seconds * self.frame_rate)))

    def samples_for(self, seconds: float) -> int:
        return self.frames_for(seconds) * self.hop

    def generate_tokens(self, requests: Sequence[GenerationRequest],
                        progress: Callable[[int, float], None] | None = None) -> list[np.ndarray | None]:
        """Codes per request (None where cancelled); each request is its own HTTP request, all at once."""
        if not requests:
            raise RequestError("no requests given")
        wires = [_seeded(r) for r in requests]
        out: list[np.ndarray | None] = [None] * len(requests)
        with ThreadPoolExecutor(max_workers=len(requests), thread_name_prefix="engine-request") as pool:
            futures = [pool.submit(self._tokens, w, r.cancel) for w, r in zip(wires, requests)]
            pending = set(range(len(futures)))
            while pending:
                for i in sorted(pending):
                    r, f = requests[i], futures[i]
                    if r.cancel.is_set():
                        pending.discard(i)  # its HTTP request runs out on the worker; the result is dropped
                    elif f.done():
                        pending.discard(i)
                        res = f.result()  # raises RequestError / RemoteJobFailed
                        out[i] = res.codes
                        with self._lock:
                            self.served_by.append(res.served_by)
                        if progress is not None:
                            progress(i, 1.0)
                if pending:
                    time.sleep(0.02)
            pool.shutdown(wait=False, cancel_futures=True)
        return [None if r.cancel.is_set() else c for r, c in zip(requests, out)]

    def generate(self, requests: Sequence[GenerationRequest],
                 progress: Callable[[int, float], None] | None = None) -> list[np.ndarray | None]:

        codes = self.generate_tokens(requests, progress)
        if all(c is None for c in codes):
            raise Cancelled("all requests were cancelled")
        return [None if c is None else self.decode(c) for c in codes]

    def decode(self, codes: np.ndarray, between: Callable[[], None] | None = None) -> np.ndarray:
        """Codes to audio on this machine's codec: the same function a local engine decodes with."""
        import torch  # torch loads only where this runs

        from model.codec.codes import decode  # torch loads only where this runs

        with torch.inference_mode():
            return decode(self.hf.audio_encoder, np.asarray(codes, dtype=np.int64), self.channels, between=between)

    def streaming_decoder(self):
        from model.codec.codes import streaming_decoder  # torch loads only where this runs

        return streaming_decoder(self.hf.audio_encoder, self.channels)

    def stream_batch(self, requests: Sequence[GenerationRequest], chunk_seconds: float = 1.0,
                     progress=None, first_chunk_seconds: float = 0.25, live: bool = False) -> Iterator[AudioChunk]:
        """Audio chunks per request. Remote requests come back whole, so the chunks follow once each
        request is made (a track played while it generates starts when its codes arrive)."""
        import torch  # torch loads only where this runs

        codes = self.generate_tokens(requests, progress)
        step = max(1, int(round(chunk_seconds * self.frame_rate)))
        for i, c in enumerate(codes):
            if c is None:
                continue
            dec, start = self.streaming_decoder(), 0
            with torch.inference_mode():
                for a in range(0, c.shape[1], step):
                    audio = dec.push(torch.from_numpy(c[:, a:a + step]))
                    if audio.shape[1]:
                        yield AudioChunk(audio, self.sample_rate, start, False, i)
                        start += audio.shape[1]
                yield AudioChunk(dec.flush(), self.sample_rate, start, True, i)
        if all(c is None for c in codes):
    
            raise Cancelled("all requests were cancelled")

    def stream(self, request: GenerationRequest, chunk_seconds: float = 1.0, first_chunk_seconds: float = 0.25,
               live: bool = False) -> Iterator[AudioChunk]:
        yield from self.stream_batch([request], chunk_seconds, first_chunk_seconds=first_chunk_seconds, live=live)

    def live_stream(self, prompt: str, params: SamplingParams | None = None, *,
                    context_seconds: float = 10.0) -> RemoteLiveStream:
        return RemoteLiveStream(self, prompt, params, context_seconds=context_seconds)

    # ------------------------------------------------------------ health, for /status

    def health(self) -> tuple[bool, str]:
        """(reachable, one line): what the daemon's /status says about the engine."""
        ok, line, since = self._health
        if ok:
            return True, f"remote {self.url}: ok"
        return False, f"remote {self.url}: {line} (for {time.monotonic() - since:.0f} s)"

    def status(self) -> dict[str, Any]:
        """The worker's own counters, from whichever replica answers (RemoteError if it cannot)."""
        try:
            return self._get("/v1/status", 10.0)
        except (_Refused, OSError, urllib.error.URLError, ValueError) as e:
            raise RemoteError(f"the engine at {self.url}: {_describe(e)}") from None

    def _poll_health(self, every: float) -> None:
        while not self._closed.wait(every):
            try:
                self._get("/v1/info", min(every, 5.0))
                self._set_health(True, "ok")
            except _Refused as e:
                self._set_health(False, f"refused: {e}")
            except (OSError, urllib.error.URLError, ValueError) as e:
                self._set_health(False, f"unreachable: {_describe(e)}")

    def _set_health(self, ok: bool, line: str) -> None:
        was = self._health
        if was[0] != ok or was[1] != line:
            (log.info if ok else log.warning)("engine at %s: %s", self.url, line)
            self._health = (ok, line, time.monotonic())

    def close(self) -> None:
        self._closed.set()

    def __enter__(self) -> RemoteEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ HTTP

    def _get(self, path: str, timeout: float) -> dict[str, Any]:
        return _request(self.url + path, self._key, None, timeout, self._ssl)

    def _tokens(self, wire: GenerationRequest, cancel: threading.Event) -> TokensResult:
        """One request, sent again (same seed: same take) while its replica dies or none answers."""
        body = json.dumps(request_to_json(wire)).encode()
        timeout = 120.0 + 30.0 * wire.seconds  # a replica 30x slower than real time is broken, not busy
        deadline = time.monotonic() + self.retry_seconds
        tries = 0
        while True:
            tries += 1
            try:
                res = TokensResult.from_json(_request(self.url + "/v1/tokens", self._key, body, timeout, self._ssl))
                self._set_health(True, "ok")
                return res
            except _Refused as e:
                raise RequestError(f"the remote engine refused the request: {e}") from None
            except (OSError, urllib.error.URLError, ValueError, WireError) as e:
                why = _describe(e)
                if cancel.is_set():
                    raise RemoteJobFailed("cancelled while the engine could not be reached") from None
                if tries > self.retries or time.monotonic() > deadline:
                    raise RemoteJobFailed(f"the remote engine at {self.url} failed it {tries} times "
                                          f"(last: {why})") from None
                with self._lock:
                    self.retried += 1
                log.warning("request to %s failed (%s): sending it again with the same seed (try %d of %d)",
                            self.url, why, tries + 1, self.retries + 1)
                cancel.wait(min(0.5 * 2 ** tries, 5.0))


class RemoteLiveStream:
    """A jam's token stream on a replica, over one WebSocket; the face of LiveStream the jam uses.

    Not thread-safe (one consumer, the jam's thread). `interruptions` counts the times the replica
    was lost and the stream moved to another one (the jam reports itself behind then).
    """

    def __init__(self, engine: RemoteEngine, prompt: str, params: SamplingParams | None = None, *,
                 context_seconds: float = 10.0, reconnect_seconds: float = 90.0, recv_timeout: float = 60.0):
        self.engine = engine
        self.prompt = prompt
        self.params = params or SamplingParams()
        self.window = engine.frames_for(engine.window_seconds)
        self.k = engine.num_codebooks
        self._context_seconds = context_seconds
        self.set_context(context_seconds)
        self.frames = 0
        self.prefills = 0
        self.offline_steps = 0
        self.shared_steps = 0  # steps of the last advance the replica made together with another jam's
        self.replica_steps: int | None = None  # the replica's decoder steps, all its calls (after each advance)
        # The replica's live steps (every jam's) and the decoder passes they took: fewer passes than
        # steps where jams there stepped together (model/decode/step_sharing.py).
        self.replica_live_steps: int | None = None
        self.replica_passes: int | None = None
        self.interruptions = 0
        self.served_by: ServedBy | None = None
        self._codes = np.zeros((self.k, 0), np.int64)  # our own last complete codes: what a new replica resumes from
        self._melody: np.ndarray | None = None
        self._melody_at = 0
        self._reconnect_seconds, self._recv_timeout = reconnect_seconds, recv_timeout
        self._ws = None
        self._connect()

    # ------------------------------------------------------------ LiveStream's face

    def set_context(self, seconds: float) -> None:
        ctx = self.engine.frames_for(seconds)
        if not 0 < ctx < self.window:
            raise RequestError(f"context must be shorter than the {self.window}-frame window, got {seconds} s")
        self.context, self._context_seconds = ctx, float(seconds)

    def condition(self, melody: np.ndarray | None, at_frame: int) -> bool:
        if melody is not None and not self.engine.is_melody:
            raise RequestError("this model is text-only and cannot follow a melody")
        self._melody = None if melody is None else np.asarray(melody, np.float32)
        self._melody_at = int(at_frame)
        try:
            return bool(self._call(self._condition_msg())["reprefill"])
        except (OSError, TimeoutError) as e:  # the new replica is conditioned as it resumes
            self._lost(e)
            return True

    def conditioning_chroma(self, frame0: int, frame1: int) -> np.ndarray | None:
        """What conditions frames [frame0, frame1) on the replica, as it reports it."""
        for _ in range(2):
            try:
                c = self._call({"op": "chroma", "from": int(frame0), "to": int(frame1)})["chroma"]
                return None if c is None else array_from_json(c, "chroma")
            except (OSError, TimeoutError) as e:
                self._lost(e)
        return None

    def advance(self, until_frame: int, piece_frames: int = 25, first_piece_frames: int | None = None,
                cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Pieces of complete codes until `until_frame`, as the replica makes them; across a replica's
        death the stream reconnects and goes on from its own codes (no frame repeated or skipped)."""
        first = first_piece_frames or piece_frames
        progress_at, frames_then = time.monotonic(), self.frames
        while self.frames < until_frame:
            if cancel is not None and cancel.is_set():
                return
            try:
                yield from self._advance_once(until_frame, piece_frames, first, cancel)
            except (OSError, TimeoutError) as e:
                self._lost(e)
                # A replica that takes the jam and then makes nothing would be reconnected to forever.
                if self.frames > frames_then:
                    progress_at, frames_then = time.monotonic(), self.frames
                elif time.monotonic() - progress_at > self._reconnect_seconds:
                    raise RemoteJobFailed(f"the jam made no progress on the engine at {self.engine.url} for "
                                          f"{self._reconnect_seconds:g} s ({self.interruptions} reconnections; "
                                          f"last: {_describe(e)})") from None
            first = piece_frames

    def close(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.close()

    def __enter__(self) -> RemoteLiveStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ the connection

    def _advance_once(self, until, piece, first, cancel) -> Iterator[np.ndarray]:
        self._ensure()
        ws = self._ws
        try:
            ws.send(json.dumps({"op": "advance", "until": int(until), "piece": int(piece), "first_piece": int(first),
                                "context_seconds": self._context_seconds}))
            cancelled = False
            while True:
                msg = ws.recv(timeout=self._recv_timeout)
                if isinstance(msg, bytes):
                    at, codes = piece_from_bytes(msg)
                    if at != self.frames or codes.shape[0] != self.k:
                        raise WireError(f"piece at frame {at} with {codes.shape[0]} codebooks; expected frame "
                                        f"{self.frames}")
                    self._keep(codes)
                    if cancel is not None and cancel.is_set():
                        if not cancelled:
                            ws.send(json.dumps({"op": "cancel"}))
                            cancelled = True
                        continue
                    yield codes
                    continue
                reply = json.loads(msg)
                if reply.get("op") == "error":
                    raise RequestError(f"the remote engine: {reply.get('message')}")
                self.prefills, self.offline_steps = int(reply["prefills"]), int(reply["offline_steps"])
                self.replica_steps = int(reply["replica_steps"])
                self.shared_steps = int(reply.get("shared_steps", 0))
                self.replica_live_steps = int(reply.get("replica_live_steps", 0))
                self.replica_passes = int(reply.get("replica_passes", 0))
                return
        except ConnectionClosed as e:
            raise ConnectionResetError(f"the replica closed the jam ({e})") from None

    def _keep(self, codes: np.ndarray) -> None:
        self._codes = np.concatenate([self._codes, codes], axis=1)[:, -self.window:]
        self.frames += codes.shape[1]

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self._ensure()
        try:
            self._ws.send(json.dumps(msg))
            reply = json.loads(self._ws.recv(timeout=self._recv_timeout))
        except ConnectionClosed as e:
            raise ConnectionResetError(f"the replica closed the jam ({e})") from None
        if reply.get("op") == "error":
            raise RequestError(f"the remote engine: {reply.get('message')}")
        return reply

    def _condition_msg(self) -> dict[str, Any]:
        return {"op": "condition", "at": self._melody_at,
                "melody": None if self._melody is None else array_to_json(self._melody)}

    def _lost(self, e: BaseException) -> None:
        """The replica went away: count it, and connect again (resuming) before the next operation."""
        self.interruptions += 1
        log.warning("jam lost its replica (%s) at frame %d: reconnecting and resuming from its own codes",
                    _describe(e), self.frames)
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - it is already broken
                pass

    def _ensure(self) -> None:
        if self._ws is None:
            self._connect()

    def _connect(self) -> None:
        """Open (or re-open, resuming) the jam on a replica; retries until `reconnect_seconds` pass."""

        eng = self.engine
        split = urlsplit(eng.url)
        url = urlunsplit(("wss" if split.scheme == "https" else "ws", split.netloc, split.path + "/v1/jam", "", ""))
        deadline = time.monotonic() + self._reconnect_seconds
        tries = 0
        while True:
            tries += 1
            try:
                ws = connect(url, additional_headers={KEY_HEADER: eng._key}, ssl=eng._ssl, open_timeout=10,
                             max_size=8 << 20, compression=None)
                opened = self._open(ws)
                break
            except InvalidStatus as e:
                if e.response.status_code in (401, 403):
                    raise RemoteError(f"the engine at {eng.url} refused the jam: missing or wrong key") from None
                err: BaseException = e
            except (OSError, TimeoutError, WebSocketException, ValueError) as e:
                err = e
            if time.monotonic() > deadline:
                raise RemoteJobFailed(f"the jam could not reach a replica at {eng.url} in {self._reconnect_seconds:g} s "
                                      f"({tries} tries; last: {_describe(err)})")
            time.sleep(min(0.25 * 2 ** tries, 2.0))
        self._ws = ws
        self.served_by = ServedBy.from_json(opened["served_by"])

    def _open(self, ws) -> dict[str, Any]:
        resume = None
        if self.frames:
            resume = {"codes": array_to_json(self._codes.astype(np.int16)), "frames": self.frames,
                      "prefills": self.prefills}
        ws.send(json.dumps({"op": "open", "prompt": self.prompt, "params": self.params.to_dict(),
                            "context_seconds": self._context_seconds, "resume": resume}))
        opened = json.loads(ws.recv(timeout=self._recv_timeout))
        if opened.get("op") != "opened":
            ws.close()
            raise RequestError(f"the remote engine did not open the jam: {opened.get('message', opened)}")
        if self._melody is not None:
            ws.send(json.dumps(self._condition_msg()))
            json.loads(ws.recv(timeout=self._recv_timeout))
        return opened


# ---------------------------------------------------------------- helpers


def _seeded(r: GenerationRequest) -> GenerationRequest:
    """The request with a seed fixed here, so a retry on another replica makes the same take."""
    if r.params.seed is not None or r.params.greedy:
        return r
    return replace(r, params=replace(r.params, seed=secrets.randbelow(2**62)), cancel=r.cancel)


def _ssl_context(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    if not url.startswith("https:"):
        return None
    return ssl.create_default_context(cafile=ca_file)


def _request(url: str, key: str, body: bytes | None, timeout: float, ctx: ssl.SSLContext | None) -> dict[str, Any]:
    """One HTTP request with the key; the JSON answer, _Refused for a 4xx, OSError-kin for the rest."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={KEY_HEADER: key, "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")[:500]
        try:
            message = json.loads(text).get("message", text)
        except ValueError:
            message = text
        if 400 <= e.code < 500:
            raise _Refused(e.code, f"HTTP {e.code}: {message}") from None
        raise ConnectionError(f"HTTP {e.code} from the worker: {message[:200]}") from None


def _is_dir(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:
        return False
