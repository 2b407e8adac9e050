"""`/hello` slows a host down after wrong keys, and `serve` refuses a short --key with a hint."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.osc.access import FREE_TRIES, MAX_DELAY_S, MAX_FAILING, MIN_KEY, Access, AccessError, check_key

KEY = "correct horse battery staple"
REMOTE = ("127.0.0.2", 9000)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_typos_are_free_then_each_wrong_key_doubles_the_wait():
    clock = Clock()
    access = Access(["127.0.0.0/8"], KEY, clock=clock)
    for _ in range(FREE_TRIES - 1):
        refused = access.hello(REMOTE, "typo")
        assert refused is not None and refused.wait_s == 0 and refused.message == "/hello: wrong key"
    assert access.hello(REMOTE, "typo") is not None  # the FREE_TRIES-th wrong key starts the delay
    waits = []
    for _ in range(12):
        refused = access.hello(REMOTE, KEY)  # even the right key is refused unread while locked out
        assert refused is not None and refused.wait_s > 0 and "try again in" in refused.message
        assert access.needs_hello(REMOTE)
        waits.append(refused.wait_s)
        clock.now += refused.wait_s
        assert access.hello(REMOTE, "still wrong") is not None
    assert waits[:4] == [1.0, 2.0, 4.0, 8.0]
    assert max(waits) == MAX_DELAY_S and waits == sorted(waits)
    clock.now += MAX_DELAY_S
    assert access.hello(REMOTE, KEY) is None and not access.needs_hello(REMOTE)


def test_the_right_key_clears_the_count_and_other_hosts_are_not_slowed():
    clock = Clock()
    access = Access(["127.0.0.0/8"], KEY, clock=clock)
    for _ in range(FREE_TRIES):
        access.hello(REMOTE, "wrong")
    other = ("127.0.0.3", 9000)
    assert access.hello(other, KEY) is None  # another host is not locked out by REMOTE's guesses
    clock.now += 1.0
    assert access.hello(REMOTE, KEY) is None
    for _ in range(FREE_TRIES - 1):  # a fresh allowance after a success
        assert access.hello(REMOTE, "wrong").wait_s == 0
    assert access.hello(REMOTE, KEY) is None


def test_the_failing_hosts_table_is_bounded():
    access = Access(["127.0.0.0/8"], KEY, clock=Clock())
    for i in range(MAX_FAILING + 50):
        access.hello((f"127.1.{i // 256}.{i % 256}", 1), "wrong")
    assert len(access._failing) == MAX_FAILING


@pytest.mark.parametrize("key", ["", "short", "x" * (MIN_KEY - 1), "y" * 257])
def test_a_key_outside_the_rule_is_refused_with_a_hint(key):
    with pytest.raises(AccessError, match=rf"--key must be {MIN_KEY} to 256 characters, got {len(key)}; "
                                          r"a random one: --key \S{24}"):
        check_key(key)
    assert check_key("z" * MIN_KEY) == "z" * MIN_KEY and check_key(None) is None


def test_serve_refuses_a_short_key_before_it_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", "tiny", "--key", "hunter2",
                        "--session", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--key must be 16 to 256 characters, got 7" in r.stderr
    assert not (tmp_path / "s" / "session.json").exists()
