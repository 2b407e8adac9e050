"""`musicbridge worker`: deploy the remote engine (a Ray Serve app) on a Ray cluster and keep it up.

The GPU machine runs `ray start --head` (more machines join with `ray start --address`), then
this command; daemons elsewhere use it with `--engine http://HOST:PORT` (docs/remote.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

from bridge.commands.common import UsageError, add_model_args, positive_float
from model.kernels import openmp_env
from model.remote.client import MIN_KEY

log = logging.getLogger("musicbridge.worker")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="serve the engine to other machines (a Ray Serve app; docs/remote.md)",
                       description="Deploy the engine on a running Ray cluster as a Ray Serve application "
                                   "that daemons use with --engine URL. Stops (and removes the app) on "
                                   "SIGINT/SIGTERM unless --detach.")
    add_model_args(p)
    p.add_argument("--address", default="auto",
                   help="the Ray cluster (HOST:PORT of `ray start --head`; default: the one on this machine)")
    p.add_argument("--key", default=os.environ.get("MUSICBRIDGE_ENGINE_KEY"), metavar="KEY",
                   help="every request must carry it (16-256 characters; default $MUSICBRIDGE_ENGINE_KEY, "
                        "which keeps it out of the process list)")
    p.add_argument("--http-host", default="127.0.0.1",
                   help="address Serve's HTTP proxy listens on (default loopback; the studio's address to "
                        "serve other machines)")
    p.add_argument("--http-port", type=int, default=8000, help="its port (default 8000)")
    p.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS/WSS with this certificate (with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--replicas", type=int, default=1, help="replicas (each loads the model; default 1)")
    p.add_argument("--min-replicas", type=int, default=None, help="autoscale: at least this many")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale: at most this many (turns it on)")
    p.add_argument("--cpus-per-replica", type=positive_float, default=1.0,
                   help="CPU cores each replica takes (and its torch threads on the CPU)")
    p.add_argument("--gpus-per-replica", type=float, default=0.0, help="GPUs each replica takes (1: one per GPU)")
    p.add_argument("--max-batch", type=int, default=8, help="offline requests one replica batches into one call")
    p.add_argument("--detach", action="store_true", help="leave the app running on the cluster and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.key or not MIN_KEY <= len(args.key) <= 256:
        raise UsageError(f"the worker needs --key (or $MUSICBRIDGE_ENGINE_KEY) of {MIN_KEY}-256 characters: "
                         "every request must carry it, and the daemon is given the same one (--engine-key)")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    for f in (args.tls_cert, args.tls_key):
        if f and not os.path.isfile(f):
            raise UsageError(f"{f} is not a file")
    if not 1 <= args.http_port <= 65535:
        raise UsageError(f"--http-port must be in 1-65535, got {args.http_port}")
    if args.max_replicas is None and args.replicas < 1:
        raise UsageError(f"--replicas must be at least 1, got {args.replicas}")
    if args.max_replicas is not None and not 1 <= (args.min_replicas or 1) <= args.max_replicas:
        raise UsageError("autoscaling needs 1 <= --min-replicas <= --max-replicas")
    if not 1 <= args.max_batch <= 64:
        raise UsageError(f"--max-batch must be in 1-64, got {args.max_batch}")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never report usage, whatever the cluster says
    try:
        import ray  # optional (the remote extra): Ray loads only in the worker
        from ray import serve  # optional (the remote extra): Ray loads only in the worker
    except ImportError:
        raise UsageError("the worker needs Ray Serve: pip install 'musicbridge[remote]'") from None
    from model.remote.app import APP_NAME, build_app, key_digest  # Ray: only the worker loads it

    try:
        # Serve's proxy sends every request to a replica on its own node while that one has room:
        # for a studio the point of more nodes is to use them, so requests are spread over all
        # replicas (the less busy of two, Serve's own choice). Serve's actors start in this job's
        # environment, so that is where the switch goes.
        spread = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", "RAY_SERVE_PROXY_PREFER_LOCAL_AZ_ROUTING": "0",
                  "RAY_USAGE_STATS_ENABLED": "0"}
        spread.update(openmp_env.chosen())  # the replicas' torch, as this process's (model/kernels/openmp_env.py)
        ray.init(address=args.address, logging_level=logging.WARNING, runtime_env={"env_vars": spread})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot join the Ray cluster at {args.address}: {e} (start it with `ray start --head`)") \
            from None
    http = {"host": args.http_host, "port": args.http_port}
    if args.tls_cert:
        http.update(ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key)
    config = {"key_sha256": key_digest(args.key), "model": args.model, "device": args.device, "dtype": args.dtype,
              "pattern": args.pattern, "max_batch": args.max_batch,
              "threads": int(args.cpus_per_replica) if args.gpus_per_replica == 0 else 0}
    app = build_app(config, replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                    cpus=args.cpus_per_replica, gpus=args.gpus_per_replica)
    scheme = "https" if args.tls_cert else "http"
    try:
        # One proxy, on the head: the URL daemons are given. (A proxy on every node would bind the
        # same host and port on each machine.)
        serve.start(proxy_location="HeadOnly", http_options=http)
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    except Exception as e:  # noqa: BLE001 - Serve reports a failed deploy (model missing, no resources) this way
        raise UsageError(f"the engine could not be deployed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")\
            from None
    print(f"musicbridge engine serving at {scheme}://{args.http_host}:{args.http_port} "
          f"({'autoscaled ' + str(args.min_replicas or 1) + '-' + str(args.max_replicas) if args.max_replicas else args.replicas} "
          f"replica(s), model {args.model})", flush=True)
    if args.detach:
        return 0
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        log.info("removing the engine from the cluster")
        serve.delete(APP_NAME)
        serve.shutdown()
        ray.shutdown()
    return 0
