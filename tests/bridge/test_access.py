"""Off-loopback rules through `musicbridge serve`: --allow-from, --key with /hello, job owners.

Other hosts are stood in for by other loopback addresses (127.0.0.2, ...): the daemon treats
only 127.0.0.1 and ::1 as the machine's own user (docs/security.md).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge.osc.udp import OscClient
from tests.bridge.osc_helpers import ROOT, DaemonProcess, drain, expect

KEY = "correct horse battery"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, tiny_model_dir, serve_daemon):
    with serve_daemon(tmp_path_factory.mktemp("access"), tiny_model_dir, "--allow-from", "127.0.0.1/32",
                      "--allow-from", "127.0.0.2", "--allow-from", "127.0.0.4/32", "--key", KEY) as (d, local):
        local.send("/track/t/preset", "plain")
        expect(local, "/ok")
        yield d, local


def host(d: DaemonProcess, address: str) -> OscClient:
    return OscClient("127.0.0.1", d.port, listen_host=address)


def test_a_sender_outside_allow_from_is_ignored(daemon):
    d, local = daemon
    with host(d, "127.0.0.3") as outsider:
        for address in ("/ping", "/status", "/hello"):
            outsider.send(address, *([KEY] if address == "/hello" else []))
        outsider.send("/track/t/prompt", "hijacked")
        assert list(outsider.replies(0.5)) == []  # not even an /error: nothing is read
    local.send("/track/t/state")
    assert "hijacked" not in expect(local, "/track/t/state")[0]


def test_a_remote_sender_must_say_hello_with_the_key(daemon):
    d, local = daemon
    with host(d, "127.0.0.2") as remote:
        assert remote.prove()  # needs no key; without it the refusals, larger than the questions, are not sent
        remote.send("/ping")
        err = expect(remote, "/error")
        assert err[0] == "forbidden" and "/hello" in err[1], err
        remote.send("/hello", "wrong key, sorry")
        assert expect(remote, "/error")[:2] == ["forbidden", "/hello: wrong key"]
        remote.send("/hello", KEY)
        assert expect(remote, "/ok") == ["/hello"]
        remote.send("/ping")
        expect(remote, "/pong")
    local.send("/ping")  # 127.0.0.1 needs no key
    expect(local, "/pong")


def test_jobs_belong_to_the_host_that_queued_them(daemon):
    d, local = daemon
    with host(d, "127.0.0.2") as owner, host(d, "127.0.0.4") as other:
        for c in (owner, other):
            c.send("/hello", KEY)
            expect(c, "/ok")
            assert c.prove()  # job events reach a host that proved its address (docs/osc.md)
        owner.send("/track/t/generate", 30.0)
        first = expect(owner, "/job/accepted")[0]
        owner.send("/track/t/generate", 29.0)
        second = expect(owner, "/job/accepted")[0]
        other.send(f"/job/{first}/cancel")
        err = expect(other, "/error")
        assert err[0] == "forbidden" and err[3] == first, err
        owner.send(f"/job/{second}/cancel")  # its own job
        assert owner.wait_for(lambda a, v: a == "/job/cancelled" and v[0] == second, 10.0) is not None
        local.send(f"/job/{first}/cancel")  # 127.0.0.1 manages every job
        assert owner.wait_for(lambda a, v: a in ("/job/cancelled", "/job/done") and v[0] == first, 60.0)
        drain(local, 0.1)


def test_binding_a_non_loopback_address_needs_allow_from(tmp_path, tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(tiny_model_dir),
                          "--host", "0.0.0.0", "--port", "0", "--session-dir", str(tmp_path / "s")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--allow-from" in out.stderr and "reachable from other machines" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "bridge.cli", "serve", "--model", str(tiny_model_dir),
                          "--allow-from", "10.0.0.0/33", "--session-dir", str(tmp_path / "s")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "is not an address or CIDR network" in out.stderr, out.stderr
