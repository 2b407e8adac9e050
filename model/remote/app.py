"""The remote engine as a Ray Serve application (`musicbridge worker` deploys it).

One deployment, `engine`, is both the HTTP/WebSocket ingress (FastAPI, which Serve ships) and
the holder of a loaded `model.engine.Engine`: a replica per GPU or per set of CPU cores, as many
as the worker asks for, or as Serve's autoscaler decides between a minimum and a maximum.

- Offline work (`POST /v1/tokens`: generate, continue, a render's tracks) lands on any replica
  (Serve's proxy balances) and goes through `@serve.batch` there: requests arriving together
  share one engine call, one decoder pass per step for all of them.
- A jam is one WebSocket (`/v1/jam`): the connection is held by the replica it landed on, which
  keeps the jam's decode state (a `LiveStream`) for as long as it lasts and sends code pieces
  back as they are made. Every jam on a replica with a step due steps in one decoder pass
  (model/decode/step_sharing.py), and jam steps go ahead of offline steps (the engine's StepGate).
- Codes cross, not audio (model/remote/wire.py says why); the daemon runs the codec.

Every request and connection must carry the key (header `x-musicbridge-key`); it is checked
first, before the body is read or anything is queued, and only its sha256 is held here.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (Request,
# WebSocket) as types, and Serve's ingress wrapper keeps it from resolving them as strings.

import asyncio
import faulthandler
import hashlib
import hmac
import json
import logging
import os
import signal
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from ray import serve

from model.remote.wire import (PROTOCOL, ServedBy, TokensResult, WireError, array_from_json, array_to_json,
                               codec_digest, info_to_json, piece_to_bytes, request_from_json)
from model.types import GenerationRequest, RequestError, SamplingParams

log = logging.getLogger("musicbridge.worker")

KEY_HEADER = "x-musicbridge-key"
APP_NAME = "musicbridge"
MAX_BODY = 96 << 20  # a request's JSON: its arrays (wire.MAX_ARRAY_BYTES) in base64, and room

api = FastAPI(title="musicbridge engine", docs_url=None, redoc_url=None, openapi_url=None)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class JamSession:
    """The server side of one jam: JSON operations in, binary code pieces and JSON answers out.

    Operations: open (prompt, params, context, and where a jam moved here from a replica that
    died, `resume`: its own last codes), condition (melody chroma at a stream frame), advance
    (until a frame, in pieces), chroma (what conditions a span now), cancel.
    """

    def __init__(self, replica: "EngineReplica", ws: WebSocket, loop: asyncio.AbstractEventLoop):
        self.replica, self.ws, self.loop = replica, ws, loop
        self.stream = None
        self.cancel = threading.Event()
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def _read(self) -> None:
        try:
            while True:
                msg = json.loads(await self.ws.receive_text())
                if isinstance(msg, dict) and msg.get("op") == "cancel":
                    self.cancel.set()  # honoured within one decoder step of the running advance
                    continue
                await self.inbox.put(msg)
        except (WebSocketDisconnect, RuntimeError, ValueError):
            self.cancel.set()
            await self.inbox.put(None)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while (msg := await self.inbox.get()) is not None:
                try:
                    answer = await self._op(msg)
                except (WireError, RequestError, KeyError, TypeError, ValueError) as e:
                    answer = {"op": "error", "message": f"{type(e).__name__}: {e}"}
                await self.ws.send_text(json.dumps(answer))
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.cancel.set()
            reader.cancel()

    async def _op(self, msg: Any) -> dict[str, Any]:
        if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
            raise WireError("expected an object with an op")
        op = msg["op"]
        eng = self.replica.engine
        if op == "open":
            params = SamplingParams.from_dict(msg.get("params") or {})
            self.stream = eng.live_stream(str(msg["prompt"]), params, context_seconds=float(msg["context_seconds"]))
            resume = msg.get("resume")
            if resume is not None:
                codes = array_from_json(resume["codes"], "resume codes").astype(np.int64)
                self.stream.resume(codes, int(resume["frames"]), int(resume["prefills"]))
                self.replica.stats["resumed_jams"] += 1
            return {"op": "opened", "window": self.stream.window, "context": self.stream.context,
                    "frames": self.stream.frames, "served_by": self.replica.served_by.to_json()}
        s = self._open()
        if op == "condition":
            melody = None if msg.get("melody") is None else array_from_json(msg["melody"], "melody")
            reprefill = await asyncio.to_thread(s.condition, melody, int(msg["at"]))
            return {"op": "conditioned", "reprefill": bool(reprefill)}
        if op == "chroma":
            c = s.conditioning_chroma(int(msg["from"]), int(msg["to"]))
            return {"op": "chroma", "chroma": None if c is None else array_to_json(c.astype(np.float32))}
        if op == "advance":
            s.set_context(float(msg["context_seconds"]))
            self.cancel.clear()  # a cancel is for the advance it interrupted
            await asyncio.to_thread(self._advance, int(msg["until"]), int(msg["piece"]), int(msg["first_piece"]))
            shared = eng.live_steps.stats
            return {"op": "advanced", "frames": s.frames, "prefills": s.prefills, "context": s.context,
                    "offline_steps": s.offline_steps, "shared_steps": s.shared_steps,
                    "replica_steps": self.replica.stats["steps"],
                    "replica_live_steps": shared.steps, "replica_passes": shared.passes}
        raise WireError(f"unknown op {op!r}")

    def _open(self):
        if self.stream is None:
            raise WireError("open the jam first")
        return self.stream

    def _advance(self, until: int, piece: int, first_piece: int) -> None:
        """On a worker thread: the stream's pieces, each sent as it completes."""
        s = self.stream
        start = s.frames
        for codes in s.advance(until, max(1, piece), max(1, first_piece), cancel=self.cancel):
            data = piece_to_bytes(start, codes)
            start += codes.shape[1]
            asyncio.run_coroutine_threadsafe(self.ws.send_bytes(data), self.loop).result()


async def _bounded_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise WireError(f"request body over {MAX_BODY >> 20} MiB")
    parts, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > MAX_BODY:
            raise WireError(f"request body over {MAX_BODY >> 20} MiB")
        parts.append(chunk)
    return b"".join(parts)


# Everything the routes call is defined above the deployment: `serve.ingress` pickles the FastAPI
# app (and what its routes refer to) when the class is decorated, and a name defined later is missing
# on the replica.


@serve.deployment(name="engine", max_ongoing_requests=32, health_check_period_s=2.0,
                  graceful_shutdown_timeout_s=5.0)
@serve.ingress(api)
class EngineReplica:
    """A loaded engine behind the key; offline requests batched, jams held as WebSockets."""

    def __init__(self, config: dict[str, Any]):
        import ray  # optional (the remote extra): Ray loads only in the worker
        import torch  # torch loads only where this runs

        from model.engine import Engine  # torch loads only where this runs

        # `kill -USR1` on a replica writes every thread's stack to its log: what a stalled jam's
        # bug report needs (the replica keeps running).
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.key_sha256 = str(config["key_sha256"])
        threads = int(config.get("threads") or 0)
        if threads > 0:
            torch.set_num_threads(threads)
        self.engine = Engine.load(config["model"], device=config.get("device", "auto"),
                                  dtype=config.get("dtype", "auto"), pattern=config.get("pattern"))
        self._batched.set_max_batch_size(int(config.get("max_batch", 8)))
        ctx = serve.get_replica_context()
        self.served_by = ServedBy(str(getattr(ctx.replica_id, "unique_id", ctx.replica_id)),
                                  ray.get_runtime_context().get_node_id(), os.getpid())
        self.codec_sha256 = codec_digest(self.engine.hf.audio_encoder)
        # What reached the engine, and what never did: the key test reads these through /v1/status.
        self.stats = {"engine_calls": 0, "requests": 0, "batches": 0, "largest_batch": 0, "steps": 0,
                      "refused": 0, "jams_open": 0, "jams": 0, "resumed_jams": 0}
        self._lock = threading.Lock()

        def count_step() -> None:
            self.stats["steps"] += 1  # one decoder step of any call on this replica (GIL: no lock needed)

        self.engine.step_hook = count_step
        log.info("replica %s on node %s (pid %d): %s on %s in %s", self.served_by.replica, self.served_by.node,
                 os.getpid(), self.engine.info.label, self.engine.device, self.engine.dtype)

    # ------------------------------------------------------------ the key

    def _allowed(self, headers) -> bool:
        given = headers.get(KEY_HEADER)
        ok = given is not None and hmac.compare_digest(key_digest(given), self.key_sha256)
        if not ok:
            self.stats["refused"] += 1
        return ok

    @staticmethod
    def _refused() -> JSONResponse:
        return JSONResponse({"error": "forbidden", "message": "missing or wrong key (x-musicbridge-key)"},
                            status_code=401)

    # ------------------------------------------------------------ what the daemon asks

    @api.get("/v1/info")
    async def info(self, request: Request):
        if not self._allowed(request.headers):
            return self._refused()
        return {"protocol": PROTOCOL, "engine": info_to_json(self.engine.info), "codec_sha256": self.codec_sha256,
                "frame_rate": self.engine.frame_rate, "window_seconds": self.engine.window_seconds,
                "served_by": self.served_by.to_json()}

    @api.get("/v1/status")
    async def status(self, request: Request):
        if not self._allowed(request.headers):
            return self._refused()
        shared = self.engine.live_steps.stats  # the jams' steps, and the decoder passes they shared
        return {"served_by": self.served_by.to_json(), **self.stats,
                "live_sessions": self.engine.gate.live_sessions,
                "live_steps": shared.steps, "live_passes": shared.passes, "shared_passes": shared.shared_passes,
                "most_jams_in_a_pass": shared.most_together}

    @api.post("/v1/tokens")
    async def tokens(self, request: Request):
        """One request's codes; requests that arrive together share one engine call (`_batched`)."""
        if not self._allowed(request.headers):
            return self._refused()
        try:
            body = await _bounded_body(request)
            wire = request_from_json(json.loads(body))
        except (WireError, ValueError) as e:
            return JSONResponse({"error": "bad_request", "message": str(e)}, status_code=400)
        self.stats["requests"] += 1
        result = await self._batched(wire)
        if isinstance(result, Exception):
            return JSONResponse({"error": "model", "message": str(result)}, status_code=422)
        return result.to_json()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _batched(self, wires: list[GenerationRequest]) -> "list[TokensResult | Exception]":
        # The engine call blocks: off the event loop, so jams on this replica keep streaming.
        return await asyncio.to_thread(self._run_batch, wires)

    def _run_batch(self, wires: list[GenerationRequest]) -> "list[TokensResult | Exception]":
        self.stats["engine_calls"] += 1
        self.stats["batches"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(wires))
        try:
            codes = self.engine.generate_tokens(list(wires))
        except RequestError as e:  # one bad request refuses the call: each is told why
            return [e] * len(wires)
        return [TokensResult(c, self.served_by, len(wires)) for c in codes]

    # ------------------------------------------------------------ jams

    @api.websocket("/v1/jam")
    async def jam(self, ws: WebSocket):
        """One jam for as long as the connection lasts; its decode state lives on this replica."""
        if not self._allowed(ws.headers):
            await ws.close(code=1008)  # before accept: the handshake is refused (HTTP 403)
            return
        await ws.accept()
        session = JamSession(self, ws, asyncio.get_running_loop())
        self.stats["jams_open"] += 1
        self.stats["jams"] += 1
        try:
            await session.run()
        finally:
            self.stats["jams_open"] -= 1


def build_app(config: dict[str, Any], *, replicas: int | None = 1, min_replicas: int | None = None,
              max_replicas: int | None = None, cpus: float = 1.0, gpus: float = 0.0):
    """The application `musicbridge worker` runs: fixed replicas, or autoscaled between min and max."""
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus}}
    if max_replicas is not None:
        opts["autoscaling_config"] = {"min_replicas": min_replicas or 1, "max_replicas": max_replicas,
                                      "target_ongoing_requests": 2}
    else:
        opts["num_replicas"] = replicas
    return EngineReplica.options(**opts).bind(config)
