"""`musicbridge generate`: every codebook pattern reachable (--pattern), variations (--variations)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from bridge.cli import main

PATTERNS = ("delay", "parallel", "flatten", "coarse_first")


def _tokens(model_dir, tmp_path, name, *extra) -> np.ndarray:
    out = tmp_path / f"{name}.npy"
    rc = main(["generate", "--model", str(model_dir), "--prompt", "lofi beat", "--seconds", "0.3",
               "--greedy", "--dtype", "float32", "--out", str(tmp_path / f"{name}.wav"),
               "--save-tokens", str(out), *extra])
    assert rc == 0
    return np.load(out)


def test_every_pattern_is_reachable_and_decodes_in_its_own_layout(tiny_model_dir, tmp_path):
    tokens = {p: _tokens(tiny_model_dir, tmp_path, p, "--pattern", p) for p in PATTERNS}
    for p, t in tokens.items():
        assert t.shape == (4, 15), p
        assert (t >= 0).all() and (t < 64).all(), p
        assert sf.info(str(tmp_path / f"{p}.wav")).frames > 0
    # The model sees each layout differently, so each pattern takes its own path.
    assert len({t.tobytes() for t in tokens.values()}) == len(PATTERNS)
    # The default is the checkpoint's pattern: delay for MusicGen checkpoints.
    np.testing.assert_array_equal(_tokens(tiny_model_dir, tmp_path, "default"), tokens["delay"])


def test_default_pattern_comes_from_the_checkpoint(tiny_model_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["codebooks_pattern"] = "parallel"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    np.testing.assert_array_equal(_tokens(ckpt, tmp_path, "ckpt-default"),
                                  _tokens(tiny_model_dir, tmp_path, "parallel", "--pattern", "parallel"))


def test_unknown_pattern_is_a_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
              "--pattern", "zigzag"])
    assert e.value.code == 2 and "zigzag" in capsys.readouterr().err


def test_variations_are_numbered_takes_each_with_its_own_seed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "take.wav"
    rc = main(["generate", "--model", str(tiny_model_dir), "--prompt", "lofi beat", "--seconds", "0.3",
               "--dtype", "float32", "--seed", "7", "--variations", "3", "--out", str(out),
               "--save-tokens", str(tmp_path / "take.npy")])
    assert rc == 0
    assert not out.exists()
    takes = [np.load(tmp_path / f"take-{i}.npy") for i in (1, 2, 3)]
    assert all((tmp_path / f"take-{i}.wav").stat().st_size > 0 for i in (1, 2, 3))
    assert len({t.tobytes() for t in takes}) == 3  # own seeds: three different takes
    printed = capsys.readouterr().out
    assert "seed 7)" in printed and "seed 8)" in printed and "seed 9)" in printed
    # Take i is exactly what a single generation with seed 7+i-1 makes: batching changes nothing.
    for i, seed in ((1, 7), (3, 9)):
        alone = tmp_path / f"alone-{seed}.npy"
        assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "lofi beat", "--seconds", "0.3",
                     "--dtype", "float32", "--seed", str(seed), "--out", str(tmp_path / f"alone-{seed}.wav"),
                     "--save-tokens", str(alone)]) == 0
        np.testing.assert_array_equal(np.load(alone), takes[i - 1])


@pytest.mark.parametrize("n", ["0", "17"])
def test_variations_out_of_range_is_a_usage_error(tiny_model_dir, tmp_path, capsys, n):
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                 "--variations", n]) == 2
    assert "--variations must be between 1 and 16" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_variations_refuse_to_overwrite_a_numbered_take(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "a-2.wav").write_bytes(b"keep")
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "x", "--out", str(tmp_path / "a.wav"),
                 "--variations", "2"]) == 2
    assert "a-2.wav already exists" in capsys.readouterr().err
    assert (tmp_path / "a-2.wav").read_bytes() == b"keep" and not (tmp_path / "a-1.wav").exists()


def test_int4_generates_through_its_c_step_and_a_take_is_the_same_alone_and_batched(tiny_wide_model_dir,
                                                                                       tmp_path, caplog):
    """`generate --dtype int4`: every layer takes the one-call C step (where the CPU has the int4
    kernel), and take 2 of `--variations 2 --seed 5` is token for token `--seed 6` alone: the int4
    kernel rounds each activation row on its own, whatever it is batched with."""
    import logging

    from model.kernels import gemv

    def run(name, *extra):
        out = tmp_path / f"{name}.npy"
        assert main(["generate", "--model", str(tiny_wide_model_dir), "--prompt", "lofi beat", "--seconds", "0.4",
                     "--dtype", "int4", "--out", str(tmp_path / f"{name}.wav"), "--save-tokens", str(out),
                     *extra]) == 0
        return out

    with caplog.at_level(logging.INFO, logger="model.engine"):
        run("take", "--seed", "5", "--variations", "2")
    if gemv.has_vnni():
        assert "2 of 2 layers take their decode step in one C call" in caplog.text
    alone = np.load(run("alone", "--seed", "6"))
    np.testing.assert_array_equal(np.load(tmp_path / "take-2.npy"), alone)
    assert sf.info(str(tmp_path / "take-2.wav")).frames > 0


def test_a_gpu_precision_on_the_cpu_and_a_missing_gpu_are_one_line_errors(tiny_model_dir, tmp_path):
    """float16 without a GPU, and --device cuda where torch sees none: exit 2, one line naming
    the problem and what to use, no file written."""
    import subprocess
    import sys

    import torch

    cases = [(["--dtype", "float16", "--device", "cpu"], "float16 is for GPUs; on the CPU use bfloat16 or int8")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "device 'cuda' asked for, but torch sees no CUDA GPU"))
    for extra, message in cases:
        out = tmp_path / "x.wav"
        r = subprocess.run([sys.executable, "-m", "bridge.cli", "generate", "--model", str(tiny_model_dir),
                            "--prompt", "x", "--seconds", "0.3", "--out", str(out), *extra],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not out.exists()
