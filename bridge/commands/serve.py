"""`musicbridge serve`: load the model once and answer OSC until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import io
import ipaddress
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path

from bridge.clock import ClockError, parse_follow
from bridge.commands.common import (UsageError, add_engine_args, add_model_args, load_engine, nonneg_int,
                                    positive_float, request_seconds)
from bridge.live.notes import NoteRouter, open_midi_inputs
from bridge.osc.access import Access, AccessError
from bridge.osc.input_files import InputLimits
from bridge.osc.protocol import Limits
from bridge.panel.guard import Guard, PanelError, parse_panel
from bridge.panel.server import PanelServer
from bridge.state.session import LiveSession, SessionError
from plugin_host.output import OutputError
from plugin_host.output_process import AudioOutputProcess
from plugin_host.stems import check_out_dir

log = logging.getLogger("musicbridge.serve")


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:9011, got {text!r}")
    return host.strip("[]"), int(port)


def follow_spec(text: str):
    try:
        return parse_follow(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the OSC bridge daemon (protocol v1, see docs/osc.md)",
                       description="Load the model once and serve OSC over UDP until SIGINT/SIGTERM.")
    add_model_args(p)
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default loopback; anything else is reachable from the network "
                        "and needs --allow-from)")
    p.add_argument("--port", type=nonneg_int, default=9010, help="UDP port (default 9010; 0 = any free port)")
    p.add_argument("--reply-to", type=host_port, default=None, metavar="HOST:PORT",
                   help="send every reply here instead of to the sender (DAWs listen on one fixed port)")
    p.add_argument("--session-dir", type=Path, default=Path("musicbridge-session"),
                   help="folder holding session.json (created if missing; restored on restart)")
    p.add_argument("--stems-dir", type=Path, default=None,
                   help="where stems are written (default SESSION_DIR/stems); message paths may point here")
    p.add_argument("--allow-dir", type=Path, action="append", default=[], metavar="DIR",
                   help="another folder message paths (melody files, takes) may point into; repeatable")
    p.add_argument("--audio", default="auto", metavar="DEVICE|auto|none",
                   help="live audio output for jams and playing while generating: a device name (or part of "
                        "one) or index, 'default', 'auto' (the default: the default output if there is one, "
                        "else none), or none (stems only)")
    p.add_argument("--midi-in", action="append", default=[], metavar="PORT",
                   help="a MIDI input port to hear live notes from (a name or a part of one, on any rtmidi API: "
                        "JACK, ALSA, CoreMIDI, WinMM; `musicbridge devices` lists them); repeatable")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds a running job may take to finish after SIGINT/SIGTERM before it is cancelled")
    p.add_argument("--max-seconds", type=request_seconds, default=120.0, help="longest job in seconds (at most 600)")
    p.add_argument("--max-queued", type=nonneg_int, default=32, help="most jobs waiting at once")
    p.add_argument("--max-tracks", type=nonneg_int, default=64, help="most tracks in the session")
    p.add_argument("--max-take-seconds", type=positive_float, default=600.0,
                   help="longest take or melody audio file accepted, by its declared length (default 600)")
    p.add_argument("--allow-from", action="append", default=[], metavar="CIDR",
                   help="a network whose hosts may send (repeatable, e.g. 192.168.1.0/24); default loopback "
                        "only; required to bind a non-loopback --host (docs/security.md)")
    p.add_argument("--key", default=os.environ.get("MUSICBRIDGE_KEY"), metavar="KEY",
                   help="senders other than 127.0.0.1/::1 must first send /hello KEY (8-256 characters; "
                        "default $MUSICBRIDGE_KEY, which keeps it out of the process list)")
    p.add_argument("--resume", action="store_true",
                   help="queue jobs a crash interrupted again, instead of reporting them /job/failed")
    p.add_argument("--follow", type=follow_spec, default="typed", metavar="SOURCE",
                   help="the clock the transport follows: typed (the /transport/* messages, the default), "
                        "jack, link, midi-clock:PORT or osc (a DAW's own OSC feedback); see docs/daw.md")
    p.add_argument("--ardour", type=host_port, default=None, metavar="HOST:PORT",
                   help="with --follow osc: ask Ardour's OSC surface here (usually 127.0.0.1:3819) for "
                        "transport and bar/beat feedback")
    p.add_argument("--panel", default="auto", metavar="off|auto|HOST:PORT",
                   help="the front panel in the browser (docs/panel.md): auto (the default) serves it on "
                        "127.0.0.1 on the TCP port after the OSC one, HOST:PORT elsewhere (off loopback it "
                        "needs --key), off for none; its URL with this run's token is logged at start")
    p.add_argument("--done-list", type=Path, default=None, metavar="FILE",
                   help="append a line for every finished stem (default SESSION_DIR/done-list.txt); "
                        "DAW scripts watch it (daw/reaper)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # A crash in native code (an audio driver, a kernel) leaves every thread's stack in the log
    # instead of a bare exit status: what a bug report from a gig needs. (Not where stderr is no
    # file, as when serve runs inside another program that captures it.)
    with contextlib.suppress(io.UnsupportedOperation, AttributeError, ValueError):
        faulthandler.enable(all_threads=True)

    if not (args.grace >= 0 and args.grace < 1e6):
        raise UsageError(f"--grace must be a number of seconds >= 0, got {args.grace}")
    if isinstance(args.follow, str):
        args.follow = follow_spec(args.follow)
    if args.ardour is not None and args.follow.source != "osc":
        raise UsageError(f"--ardour asks Ardour for OSC feedback, which only --follow osc follows "
                         f"(this daemon follows {args.follow})")
    for d in args.allow_dir:
        if not d.expanduser().is_dir():
            raise UsageError(f"--allow-dir {d} is not an existing folder")
    session_dir = args.session_dir.expanduser()
    stems_dir = (args.stems_dir or session_dir / "stems").expanduser()
    for d in (session_dir, stems_dir):
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create folder {d}: {e.strerror or e}") from None

    check_out_dir(stems_dir)

    try:
        Access(args.allow_from, args.key)
    except AccessError as e:
        raise UsageError(str(e)) from None
    if not _is_loopback(args.host):
        if not args.allow_from:
            raise UsageError(f"--host {args.host} makes the daemon reachable from other machines, and anyone who "
                             "can send it UDP could queue jobs, cancel them and read files under the allowed "
                             "folders; say who may send with --allow-from CIDR (e.g. --allow-from "
                             "192.168.1.0/24), and consider --key (see docs/security.md)")
        log.warning("WARNING: binding %s: hosts in %s may send%s", args.host, ", ".join(args.allow_from),
                    "" if args.key else " (no --key: any of them can queue and cancel jobs)")

    _check_port_free(args.host, args.port)
    panel = _panel_address(args)

    try:
        LiveSession(session_dir)  # a broken session file stops us before the model loads
    except SessionError as e:
        raise UsageError(str(e)) from None

    with contextlib.ExitStack() as stack:
        audio = None if args.audio == "none" else open_audio(args.audio, stack)
        notes = open_notes(args.midi_in, audio, stack)
        return _serve(args, session_dir, stems_dir, audio, notes, panel)


def open_notes(ports: list[str], audio, stack: contextlib.ExitStack):
    """The note router (live notes for jams), fed by every --midi-in port; stamped on the output clock."""

    clock = (lambda: audio.position / audio.samplerate) if audio is not None else time.monotonic
    router = NoteRouter(clock)
    if ports:
        try:
            opened = open_midi_inputs(ports, router.message, stack)
        except ValueError as e:
            raise UsageError(str(e)) from None
        log.info("live notes from MIDI input %s", ", ".join(opened))
    return router


def open_audio(spec: str, stack: contextlib.ExitStack):
    """The live output named by --audio, open until `stack` closes; UsageError saying why it cannot open."""
    device = None if spec in ("default", "auto") else int(spec) if spec.isdigit() else spec
    try:  # the callback in its own process: the engine's decode loop holds this one's GIL (docs/live.md)
        out = stack.enter_context(AudioOutputProcess(device=device))
    except OutputError as e:
        if spec == "auto":
            log.info("no live audio: this machine has no default audio output (start JACK or PipeWire first, "
                     "or pass --audio DEVICE); stems still work")
            log.debug("--audio auto: %s", e)
            return None
        raise UsageError(str(e)) from None
    log.info("live audio goes to %s (%d Hz, %d channels)", out.device_name, out.samplerate, out.channels)
    return out


def _panel_address(args: argparse.Namespace) -> tuple[str, int] | None:
    """Where the panel is served (None: --panel off); UsageError before the model loads when it cannot be."""

    try:
        where = parse_panel(args.panel, args.port)
        if where is not None:
            Guard(where[0], where[1], "check", args.key)  # off loopback without --key is refused here
    except PanelError as e:
        raise UsageError(str(e)) from None
    if where is not None and where[1] and args.panel.strip().lower() not in ("auto", "on", ""):
        _check_port_free(where[0], where[1], kind="panel", tcp=True)
    return where


def _serve(args: argparse.Namespace, session_dir: Path, stems_dir: Path, audio, notes=None,
           panel: tuple[str, int] | None = None) -> int:
    log.info("loading model %s ...", args.model if not args.engine else f"(remote engine at {args.engine})")
    engine = load_engine(args, long_running=True)
    try:
        return _serve_engine(args, session_dir, stems_dir, audio, notes, panel, engine)
    finally:
        close = getattr(engine, "close", None)  # a remote engine's health poll
        if close is not None:
            close()


def _serve_engine(args: argparse.Namespace, session_dir: Path, stems_dir: Path, audio, notes,
                  panel: tuple[str, int] | None, engine) -> int:
    from bridge.daemon import Daemon, DaemonConfig  # torch loads only where this runs
    config = DaemonConfig(host=args.host, port=args.port, reply_to=args.reply_to, session_dir=session_dir,
                          stems_dir=stems_dir, allow_dirs=tuple(d.expanduser() for d in args.allow_dir),
                          grace=args.grace, limits=Limits(max_seconds=args.max_seconds,
                                                          max_queued=args.max_queued,
                                                          max_tracks=args.max_tracks),
                          allow_from=tuple(args.allow_from), key=args.key, resume=args.resume,
                          input_limits=InputLimits(max_take_seconds=args.max_take_seconds),
                          follow=args.follow, ardour=args.ardour,
                          done_list=(args.done_list or session_dir / "done-list.txt").expanduser())
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("got %s: stopping (running jobs get up to %g s to finish)", signal.Signals(signum).name,
                 args.grace)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            daemon = Daemon(engine, config, audio=audio, notes=notes)
        except OSError as e:
            raise UsageError(f"cannot start: {e}") from None

        try:
            daemon.__enter__()
        except OSError as e:
            raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
        except ClockError as e:
            raise UsageError(f"cannot follow the {args.follow} clock: {e}") from None
        try:
            s = daemon.session
            log.info("musicbridge is listening for OSC on %s:%d (model %s); %d track(s) restored from %s; "
                     "stems go to %s; transport follows %s%s", args.host, daemon.server.port, engine.info.label,
                     len(s.tracks), s.path, stems_dir, args.follow,
                     f"; replies go to {args.reply_to[0]}:{args.reply_to[1]}" if args.reply_to else "")
            with contextlib.ExitStack() as panel_stack:
                if panel is not None:
                    _open_panel(daemon, panel, args, panel_stack)
                while not stop.wait(0.5):
                    pass
        finally:
            daemon.shutdown(args.grace)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _open_panel(daemon, where: tuple[str, int], args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Serve the panel until `stack` closes and log its URL (with this run's token) for the user to open."""

    auto = args.panel.strip().lower() in ("auto", "on", "")
    try:
        panel = stack.enter_context(PanelServer(daemon, where[0], where[1], key=args.key, fallback_port=auto))
    except PanelError as e:
        if not auto:
            raise UsageError(str(e)) from None
        log.warning("no panel: %s", e)
        return
    log.info("panel: open %s in a browser (this run's token is in the URL)%s", panel.url,
             "; from another machine add &key=KEY" if not _is_loopback(where[0]) else "")


def _check_port_free(host: str, port: int, kind: str = "OSC", tcp: bool = False) -> None:
    """Fail before the (slow) model load when the address cannot be bound."""

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM) as s:
        if tcp:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            what = f"the {kind} " if kind != "OSC" else ""
            raise UsageError(f"cannot listen {'for ' + what if what else ''}on {host}:{port}: {e.strerror or e}"
                             + ("; choose another with --panel HOST:PORT, or --panel off" if kind == "panel" else "")
                             ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
