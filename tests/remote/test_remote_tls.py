"""`musicbridge worker --tls-cert/--tls-key` on a Ray cluster of its own (Serve's proxy options
are the cluster's, so the TLS worker cannot share the plain one's): a daemon-side command that
trusts the certificate (`--engine-ca`) gets the same take as a local run over HTTPS; one that
does not trust it, or speaks plain HTTP to it, gets one clear line and no traceback.

This worker has one replica, serving a melody checkpoint whose decoder takes the C step: so every
jam lands on that replica, and two jams there share its decoder passes."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.remote.conftest import KEY, Worker, mb, replica_stacks, run_worker
from tests.remote.ray_cluster import ray_cluster


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (subjectAltName IP), made with openssl for this run."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def tls_worker(certificate, tiny_wide_melody_dir, tmp_path_factory) -> Iterator[Worker]:
    cert, key = certificate
    base = tmp_path_factory.mktemp("tls-worker")
    with ray_cluster(base, nodes=1) as cluster, \
            run_worker(cluster, tiny_wide_melody_dir, base / "worker.log", "--tls-cert", cert, "--tls-key", key,
                       replicas=1, scheme="https") as w:
        assert "serving at https://" in w.log_text()
        w.ca_file = cert
        yield w


def test_generate_over_https_writes_the_same_file_as_local(tls_worker, certificate, tiny_wide_melody_dir, tmp_path):
    common = ["--model", str(tiny_wide_melody_dir), "--prompt", "lofi beat", "--seconds", "1.0", "--seed", "5",
              "--dtype", "float32", "--device", "cpu"]
    local = mb("generate", *common, "--out", str(tmp_path / "local.wav"))
    assert local.returncode == 0, local.stderr
    remote = mb("generate", *common, "--out", str(tmp_path / "remote.wav"), "--engine", tls_worker.url,
                "--engine-key", KEY, "--engine-ca", certificate[0])
    assert remote.returncode == 0, remote.stderr + tls_worker.log_text()[-3000:]
    a, b = (tmp_path / "local.wav").read_bytes(), (tmp_path / "remote.wav").read_bytes()
    assert len(a) > 1000 and a == b


def test_an_untrusted_certificate_or_plain_http_is_one_clear_line(tls_worker, tiny_wide_melody_dir, tmp_path):
    args = ["generate", "--model", str(tiny_wide_melody_dir), "--prompt", "x", "--seconds", "0.5",
            "--engine-key", KEY]
    untrusted = mb(*args, "--out", str(tmp_path / "a.wav"), "--engine", tls_worker.url)
    assert untrusted.returncode == 2 and "Traceback" not in untrusted.stderr, untrusted.stderr
    assert "certificate" in untrusted.stderr and "--engine-ca" in untrusted.stderr, untrusted.stderr
    plain_url = tls_worker.url.replace("https://", "http://")
    plain = mb(*args, "--out", str(tmp_path / "b.wav"), "--engine", plain_url)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr, plain.stderr
    assert f"cannot reach the engine at {plain_url}" in plain.stderr, plain.stderr
    assert not (tmp_path / "a.wav").exists() and not (tmp_path / "b.wav").exists()  # nothing half-written


def test_a_jam_streams_over_wss(tls_worker, certificate, tiny_wide_melody_dir):
    """`bench --remote` holds a jam over the worker's WebSocket, here WSS with the same certificate."""
    r = mb("bench", "--remote", tls_worker.url, "--engine-key", KEY, "--engine-ca", certificate[0], "--model",
           str(tiny_wide_melody_dir), "--jams", "1", "--jobs", "0", "--jam-seconds", "4")
    assert r.returncode == 0, r.stdout + r.stderr + tls_worker.log_text()[-3000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| jam ")]
    assert len(rows) == 1 and "error:" not in r.stdout, r.stdout


def test_two_jams_on_one_replica_share_its_decoder_passes(tls_worker, certificate, tiny_wide_melody_dir):
    """Two jams at once on the one replica: each streams its own continuous codes (the client checks
    every piece starts where the last ended) and the replica made their steps in fewer decoder
    passes than steps, as its /v1/status also says."""
    code, before = tls_worker.get("/v1/status")
    assert code == 200, before
    try:
        r = mb("bench", "--remote", tls_worker.url, "--engine-key", KEY, "--engine-ca", certificate[0], "--model",
               str(tiny_wide_melody_dir), "--jams", "2", "--jobs", "0", "--jam-seconds", "6", "--no-codec",
               timeout=240)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"bench --remote did not finish:\n{e.stderr}\n{replica_stacks(tls_worker)}") from None
    assert r.returncode == 0 and "error:" not in r.stdout, r.stdout + r.stderr + replica_stacks(tls_worker)
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in r.stdout.splitlines() if ln.startswith("| jam ")]
    assert len(rows) == 2, r.stdout
    assert rows[0][1] == rows[1][1]  # one replica holds both
    assert all(float(row[7]) > 1.0 for row in rows), r.stdout  # jam steps per decoder pass
    code, after = tls_worker.get("/v1/status")
    assert after["shared_passes"] > before["shared_passes"] and after["most_jams_in_a_pass"] == 2, after
    assert after["live_passes"] - before["live_passes"] < after["live_steps"] - before["live_steps"], after
