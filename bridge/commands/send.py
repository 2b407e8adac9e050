"""`musicbridge send`: send one OSC message to the daemon and print what comes back."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from bridge.commands.common import UsageError, nonneg_int
from bridge.osc.udp import OscClient, OscEncodeError

TERMINAL = ("/job/done", "/job/cancelled")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "send", help="send one OSC message and print the replies",
        description="Arguments are typed by their look (3 -> int, 2.5 -> float, else string) or "
                    "explicitly: i:3 h:3 f:2.5 d:2.5 s:text b:@file b:0x00ff T: F: N:.")
    p.add_argument("address", help="OSC address, e.g. /ping or /track/drums/generate")
    p.add_argument("args", nargs="*", help="arguments (see above)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=nonneg_int, default=9010)
    p.add_argument("--listen-port", type=nonneg_int, default=0,
                   help="local port to send from and listen on (the daemon's --reply-to port)")
    p.add_argument("--wait-reply", type=float, default=1.0, metavar="SECONDS",
                   help="print replies until none arrives for this long (0 = do not wait); "
                        "after /job/accepted, waits for that job's end however long it queues")
    p.set_defaults(func=run)


def parse_arg(text: str) -> Any:
    """One command-line argument to an OSC value."""

    tag, sep, value = text.partition(":")
    if sep and tag in ("i", "h", "f", "d", "s", "b", "T", "F", "N"):
        try:
            if tag in ("i", "h"):
                return int(value, 0)
            if tag in ("f", "d"):
                v = float(value)
                return v
            if tag == "s":
                return value
            if tag == "T":
                return True
            if tag == "F":
                return False
            if tag == "N":
                return None
            if value.startswith("@"):
                return Path(value[1:]).expanduser().read_bytes()
            if value.startswith("0x"):
                return bytes.fromhex(value[2:])
            raise UsageError(f"blob argument {text!r} must be b:@FILE or b:0xHEX")
        except ValueError:
            raise UsageError(f"argument {text!r} is not a valid {tag} value") from None
    for conv in (int, float):
        try:
            v = conv(text)
            if isinstance(v, float) and not math.isfinite(v):
                return text
            return v
        except ValueError:
            pass
    return text


def format_reply(address: str, args: list[Any]) -> str:
    out = [address]
    for a in args:
        if isinstance(a, (bytes, bytearray)):
            out.append(f"<blob {len(a)} bytes>")
        elif isinstance(a, str):
            out.append(shlex.quote(a))
        elif isinstance(a, float):
            out.append(f"{a:g}")
        else:
            out.append(str(a))
    return " ".join(out)


def run(args: argparse.Namespace) -> int:
    if not args.address.startswith("/"):
        raise UsageError(f"address must start with '/', got {args.address!r}")
    if not (math.isfinite(args.wait_reply) and args.wait_reply >= 0):
        raise UsageError(f"--wait-reply must be seconds >= 0, got {args.wait_reply}")
    values = [parse_arg(a) for a in args.args]
    try:
        client = OscClient(args.host, args.port, listen_port=args.listen_port)
    except OSError as e:
        raise UsageError(f"cannot open a UDP socket: {e.strerror or e}") from None
    with client:
        try:
            if args.wait_reply > 0:  # proved first, so the job events it waits for are not limited (docs/osc.md)
                client.prove(min(args.wait_reply, 1.0))
            client.send(args.address, *values)
        except (OSError, OscEncodeError) as e:
            raise UsageError(f"cannot send to {args.host}:{args.port}: {e}") from None
        if args.wait_reply == 0:
            return 0
        return _print_replies(client, args.wait_reply)


STATUS_WAIT = 5.0  # seconds a waiting `send` gives the daemon to answer /job/<id>/status


def _print_replies(client, idle: float) -> int:
    job = None
    got = error = False
    backlog: list = []
    while True:
        r = backlog.pop(0) if backlog else client.receive(idle)
        if r is None:
            if job is None or not _still_pending(client, job, idle, backlog):
                if backlog:
                    continue
                break
            continue
        got = True
        address, values = r
        print(format_reply(address, values), flush=True)
        if address == "/job/accepted" and values and job is None:
            job = values[0]
        elif address == "/error":
            error = True
            if job is None or (len(values) >= 4 and values[3] == job):
                break
        elif address in TERMINAL and job is not None and values and values[0] == job:
            break
    if not got:
        print(f"musicbridge send: no reply within {idle:g} s (is the daemon running on that port, and "
              "does it reply to another address with --reply-to?)", file=sys.stderr)
        return 1
    return 1 if error else 0


def _still_pending(client, job: int, idle: float, backlog: list) -> bool:
    """Whether a job we wait for is queued or running (it sends nothing while it waits its turn).

    Other replies that arrive meanwhile go to `backlog`, to be printed in order."""
    client.send(f"/job/{job}/status")
    # The daemon that accepted the job is there: give its answer longer than the quiet gap (a busy
    # machine can take more than a short --wait-reply to answer).
    r = client.wait_for(lambda a, v: a == "/job/status" and bool(v) and v[0] == job, max(idle, STATUS_WAIT),
                        backlog)
    return r is not None and r[1][1] in ("queued", "running")
