"""The engine on other machines (issue #29): `musicbridge worker` on a real two-node Ray cluster, and
`generate`, `render` and `serve` with `--engine URL`, all real processes over loopback."""

from __future__ import annotations

from tests.remote.conftest import KEY, mb


def test_generate_through_the_worker_writes_the_same_file_as_local(worker, tiny_model_dir, tmp_path):
    common = ["--model", str(tiny_model_dir), "--prompt", "lofi beat", "--seconds", "1.5", "--seed", "11",
              "--dtype", "float32", "--device", "cpu"]
    local = mb("generate", *common, "--out", str(tmp_path / "local.wav"))
    assert local.returncode == 0, local.stderr
    remote = mb("generate", *common, "--out", str(tmp_path / "remote.wav"), "--engine", worker.url,
                "--engine-key", KEY)
    assert remote.returncode == 0, remote.stderr + worker.log_text()[-3000:]
    a, b = (tmp_path / "local.wav").read_bytes(), (tmp_path / "remote.wav").read_bytes()
    assert len(a) > 1000 and a == b
