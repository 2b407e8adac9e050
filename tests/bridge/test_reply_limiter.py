"""The limiter on error replies and log lines (bridge.daemon._LogLimiter), on a fake clock."""

from __future__ import annotations

import logging

from bridge.daemon import ERROR_REPLIES_PER_SECOND, _LogLimiter


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
