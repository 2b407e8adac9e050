"""The limiter on error replies and log lines (bridge.daemon._LogLimiter) and the reply budget with
its address proofs (bridge.osc.reply_budget), on a fake clock."""

from __future__ import annotations

import logging

from bridge.daemon import ERROR_REPLIES_PER_SECOND, _LogLimiter
from bridge.osc.reply_budget import (COOKIE_CHARS, COOKIE_WINDOW, EVENT_RESERVE, MAX_HOSTS, PROVEN_SECONDS,
                                     RATE_CAP, ReplyBudget)


class FakeClock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_flood_gets_the_limit_and_a_good_client_is_answered_once_it_stops(caplog):
    clock = FakeClock(1000.05)  # early in a clock second: a window per second would stay shut until 1001.0
    lim = _LogLimiter(ERROR_REPLIES_PER_SECOND, "error replies were not sent", clock=clock)
    flood = [lim.allow() for _ in range(3000)]  # junk arriving faster than the clock moves
    assert sum(flood) == ERROR_REPLIES_PER_SECOND and all(flood[:ERROR_REPLIES_PER_SECOND])
    clock.t += 0.5  # the flood is over; still the same clock second
    assert lim.allow()  # a legitimate client's wrong-typed message is answered
    # and after a quiet half second no more than half a second's worth are answered at once
    assert sum(lim.allow() for _ in range(1000)) == ERROR_REPLIES_PER_SECOND // 2 - 1
    with caplog.at_level(logging.INFO, logger="musicbridge.serve"):
        clock.t += 1.0
        assert lim.allow()
    assert f"({3000 - ERROR_REPLIES_PER_SECOND + 1000 - ERROR_REPLIES_PER_SECOND // 2 + 1} more error replies " \
           "were not sent)" in caplog.text


def test_a_steady_flood_is_held_to_the_rate():
    clock = FakeClock(50.0)
    lim = _LogLimiter(200, clock=clock)
    allowed = 0
    for _ in range(10_000):  # 10 s of a flood at 1000 events a second
        clock.t += 0.001
        allowed += lim.allow()
    assert 200 * 10 <= allowed <= 200 * (1 + 10)


# ---------------------------------------------------------------- the reply budget and address proofs


def test_events_are_paid_from_credit_and_progress_leaves_the_reserve():
    """A job's events are paid from credit, and progress only from credit above EVENT_RESERVE."""
    events = ReplyBudget(clock=FakeClock(10.0))
    daw = ("10.0.0.1", 9011)
    assert not events.spend(daw, 28)  # no credit
    events.received("10.0.0.1", EVENT_RESERVE + 100)
    assert events.spend(daw, 60, keep=EVENT_RESERVE)  # 100 above the reserve pays one progress
    assert not events.spend(daw, 60, keep=EVENT_RESERVE)  # the next one would eat into it
    assert events.spend(daw, EVENT_RESERVE)  # the final event is paid from the reserve
    assert events.spend(daw, 40) and not events.spend(daw, 4)  # 2148 - 60 - 2048 - 40 = 0
    assert events.dropped == 3


def test_an_unproven_host_is_sent_no_more_than_it_sent():
    """Credit is per host and only what the host sent: a 12-byte question earns 12 bytes of answer,
    whatever the answer's size; a host that sent nothing gets nothing."""
    clock = FakeClock(10.0)
    budget = ReplyBudget(clock=clock)
    budget.received("10.0.0.1", 12)
    assert not budget.spend(("10.0.0.2", 9011), 8)  # another host's credit is not this one's
    assert not budget.spend(("10.0.0.1", 5000), 13)  # one byte more than it sent
    assert budget.spend(("10.0.0.1", 5000), 12) and not budget.spend(("10.0.0.1", 5000), 1)
    clock.t += 3600.0  # time earns nothing
    assert not budget.spend(("10.0.0.1", 5000), 1)
    budget.received("10.0.0.1", 100)  # padding earns it
    assert budget.spend(("10.0.0.1", 5000), 100)
    assert budget.dropped == 4


def test_a_cookie_proves_only_the_address_it_was_sent_to_and_only_for_a_while():
    clock = FakeClock(1000.0)
    budget = ReplyBudget(clock=clock, secret=b"k" * 32)
    daw = ("10.0.0.1", 9011)
    cookie = budget.cookie(daw)
    assert len(cookie) == COOKIE_CHARS
    assert not budget.prove(("10.0.0.2", 9011), cookie)  # a forged source cannot use another address's cookie
    assert not budget.prove(("10.0.0.1", 9012), cookie)  # nor another port of the same host
    assert not budget.prove(daw, "0" * COOKIE_CHARS)
    assert not budget.proven(daw) and not budget.spend(daw, 1000)
    clock.t += COOKIE_WINDOW  # the next minute: still good
    assert budget.prove(daw, cookie)
    assert budget.spend(daw, 30_000) and budget.spend(daw, 30_000)  # no credit needed
    assert not budget.spend(daw, RATE_CAP)  # but the rate cap holds
    assert not budget.proven(("10.0.0.1", 9012)) and not budget.spend(("10.0.0.1", 9012), 1000)
    assert ReplyBudget(clock=clock, secret=b"j" * 32).cookie(daw) != cookie  # a secret per run
    clock.t += 2 * COOKIE_WINDOW
    assert not budget.prove(("10.0.0.3", 1), budget._cookie(("10.0.0.3", 1), int(1000.0 // COOKIE_WINDOW)))  # stale
    clock.t += PROVEN_SECONDS
    assert not budget.proven(daw)  # a proof lasts PROVEN_SECONDS
    assert not budget.spend(daw, 1000)


def test_a_flood_of_forged_sources_does_not_unprove_an_address():
    budget = ReplyBudget(clock=FakeClock(5.0))
    daw = ("10.0.0.1", 9011)
    assert budget.prove(daw, budget.cookie(daw))
    for i in range(MAX_HOSTS + 10):  # fills the credit table: the proven table is another one
        budget.received(f"10.1.{i // 256}.{i % 256}", 4)
    assert budget.proven(daw)
