"""Hostile input, round two: a message that reaches an unexpected failure costs one bounded log
line and one budgeted /error, never a traceback per copy of the message.

20 bundles of 1024 `/job/²/status` once wrote 5.5 MB of log: "²".isdigit() is true, int("²")
raises, and every copy logged a traceback. With `--follow osc`, `/position/bbt s "²|1|0"` did
the same on the clock hub. These run against the real daemon over loopback UDP and assert
bounds and order only, never how long something took.
"""

from __future__ import annotations

import logging
import socket

import pytest

from bridge.osc import protocol as P
from bridge.state import rules as R
from bridge.osc.udp import OscClient, TracebackLog, encode
from tests.bridge.hostile_packets import bundle
from tests.bridge.osc_helpers import drain, expect

LOG_GROWTH_BOUND = 200_000  # bytes of log for 20 x 1024 bad messages
BUNDLES, PER_BUNDLE = 20, 1024


def _flood(port: int, message: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
        data = bundle(*[message] * PER_BUNDLE)
        for _ in range(BUNDLES):
            s.sendto(data, ("127.0.0.1", port))


# ---------------------------------------------------------------- through the real daemon


def test_superscript_job_ids_are_bad_address_and_the_log_stays_small(tmp_path, tiny_model_dir, serve_daemon):
    with serve_daemon(tmp_path, tiny_model_dir) as (d, c):
        c.send("/job/²/status")
        err = expect(c, "/error")
        assert err[0] == "bad_address" and err[2] == "/job/²/status", err  # a refusal, not a bug
        drain(c, 0.2)
        before = d.log_path.stat().st_size
        _flood(d.port, encode("/job/²/status"))
        c.send("/ping")  # queued behind the flood on the same socket: answered after all of it
        assert c.wait_for(lambda a, _: a == "/pong", 60.0) is not None, d.log_text()[-3000:]
        grown = d.log_path.stat().st_size - before
        print(f"\n{BUNDLES} bundles of {PER_BUNDLE} /job/²/status: the log grew {grown} bytes")
        assert grown < LOG_GROWTH_BOUND
        log = d.log_text()
        assert "Traceback" not in log and "internal error" not in log
        assert d.proc.poll() is None


def test_follow_osc_feedback_with_odd_digits_is_ignored_and_bounded(tmp_path, tiny_model_dir, serve_daemon):
    with serve_daemon(tmp_path, tiny_model_dir, "--follow", "osc") as (d, c):
        drain(c, 0.2)
        before = d.log_path.stat().st_size
        for text in ("²|1|0", "٣|1|0", "1|²|0"):
            _flood(d.port, encode("/position/bbt", [text]))
        _flood(d.port, encode("/beat/str", ["9999999.1.00"]))  # beyond what a session holds
        c.send("/ping")
        assert c.wait_for(lambda a, _: a == "/pong", 60.0) is not None, d.log_text()[-3000:]
        feedback_replies = [r for r in drain(c, 0.3) if r[0] == "/error"]
        assert feedback_replies == []  # DAW feedback is never answered, not even when refused
        grown = d.log_path.stat().st_size - before
        assert grown < LOG_GROWTH_BOUND
        log = d.log_text()
        assert "Traceback" not in log and "internal error" not in log
        c.send("/transport/state")
        state = expect(c, "/transport/state")
        assert state[0] == "osc" and state[5] == 0.0  # none of it moved the position


# ---------------------------------------------------------------- an unexpected failure, in process


def test_a_handler_bug_answers_internal_and_logs_one_traceback_per_period(tmp_path, tiny_engine, monkeypatch,
                                                                           caplog):
    """A bug reached by a flood: every copy is answered `internal` (within the error budget), and
    the log holds one traceback for the period, not one per copy."""
    from bridge.daemon import Daemon, DaemonConfig

    def broken(self, cmd, sender):
        raise RuntimeError("a bug reached by a message")

    monkeypatch.setitem(Daemon.HANDLERS, P.Ping, broken)
    caplog.set_level(logging.INFO)
    with Daemon(tiny_engine, DaemonConfig(port=0, session_dir=tmp_path / "session", grace=0.0)) as d:
        d.tracebacks.every = 3600.0  # one period covers the whole test, however slow the machine
        with OscClient("127.0.0.1", d.server.port) as c:
            assert c.prove()  # the /error answers are larger than the /ping questions
            c.send("/ping")
            err = expect(c, "/error")
            assert err[0] == "internal" and "RuntimeError" in err[1] and err[2] == "/ping", err
            c.send_raw(bundle(*[encode("/ping")] * PER_BUNDLE))
            c.send("/status")  # handled after the whole bundle
            expect(c, "/status", 30.0)
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert d.tracebacks.suppressed["internal"] == PER_BUNDLE  # counted, to be logged with the next one


def test_a_follower_bug_is_swallowed_with_one_traceback(tmp_path, monkeypatch, caplog):
    from bridge.clock import FollowSpec
    from bridge.clock import osc_dialects as od
    from bridge.clock.hub import ClockHub
    from bridge.state.session import LiveSession

    def broken(self, msg, sender=None):
        raise ZeroDivisionError("a bug in following")

    monkeypatch.setattr(od.OscDialectFollower, "feed", broken)
    caplog.set_level(logging.INFO)
    hub = ClockHub(LiveSession(tmp_path), FollowSpec("osc"))
    with hub:
        for _ in range(500):
            assert hub.feedback("/beat/str", ["5.1.00"], ("127.0.0.1", 9)) is True  # consumed, never answered
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert len(tracebacks) == 1 and "DAW feedback" in tracebacks[0].getMessage()
    assert hub.tracebacks.suppressed["feedback"] == 499


def test_traceback_log_holds_back_within_the_period_and_reports_the_count():
    now = [100.0]
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.bounded.tracebacks")
    logger.propagate = False
    logger.addHandler(Keep())
    tb = TracebackLog(logger, every=10.0, clock=lambda: now[0])

    def fail(code: str) -> bool:
        try:
            raise ValueError("boom")
        except ValueError:
            return tb.exception(code, "failed on %s", "/x")

    assert fail("internal") is True
    assert [fail("internal") for _ in range(7)] == [False] * 7
    assert fail("feedback") is True  # another code has its own period
    now[0] += 10.0
    assert fail("internal") is True
    messages = [r.getMessage() for r in records]
    assert len(records) == 3 and all(r.exc_info for r in records)
    assert "7 more like it" in messages[2] and "more like it" not in messages[0]
    assert tb.suppressed == {}


# ---------------------------------------------------------------- ASCII digits only


@pytest.mark.parametrize("segment", ["²", "٣", "３", "1²", " 1", "1\n", "-1", "+1", "1_0", "0x1", "1" * 13, ""])
def test_job_ids_are_ascii_digits_only(segment):
    assert R.job_id_in(segment) == 0
    with pytest.raises(P.ProtocolError) as e:
        P.parse(f"/job/{segment}/status", [])
    assert e.value.code == "bad_address"


def test_plain_job_ids_still_parse():
    assert P.parse("/job/3/status", []).job_id == 3
    assert P.parse(f"/job/{'9' * 12}/cancel", []).job_id == R.MAX_JOB_ID


@pytest.mark.parametrize("text", ["²|1|0", "1|²|0", "1|1|²", "٣|1|0", "1|1|0\x00", "+1|1|0", "1||0"])
def test_ardour_positions_with_odd_digits_are_dialect_errors(text):
    from bridge.clock import osc_dialects as od

    with pytest.raises(od.DialectError):
        od.parse_bbt(text, 4)


@pytest.mark.parametrize("text", ["٣.1.00", "5.٣.00", "5.1.00\n\n\n1", "-5.1.00", "5.1.00.1.1"])
def test_reaper_beat_strings_with_odd_digits_are_dialect_errors(text):
    from bridge.clock import osc_dialects as od

    with pytest.raises(od.DialectError):
        od.parse_beat_string(text, 4)


@pytest.mark.parametrize("text", ["٣ / 4", "3 / ４", "3/4x"])
def test_signatures_with_odd_digits_are_refused(text):
    from bridge.clock import osc_dialects as od
    from plugin_host.tempo import TempoError, TimeSignature

    with pytest.raises(od.DialectError):
        od.parse_signature(text)
    with pytest.raises(TempoError):
        TimeSignature.parse(text.replace(" ", ""))
