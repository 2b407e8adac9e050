"""The kernels' own thread pool (model/kernels/thread_pool.c): a decode step gives the same bits on
one thread, on the pool, from any thread and beside another caller; one pool serves every thread;
a forked child steps on a pool of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from model.kernels import gemv, openmp_env
from tests.model.test_gemv import _wide_decoder

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not gemv.available(), reason="the C kernels did not build here "
                                "(test_gemv.py's first test fails for that)")


def _inputs(lm):
    """A text's cross keys (made once: float32's projection is PyTorch's matmul, whose sums follow
    its thread count) and nine steps' tokens."""
    g = torch.Generator().manual_seed(3)
    cross = lm.cross_kv(torch.randn(2, 5, lm.spec.d_model, generator=g), torch.ones(2, 5))
    return cross, torch.randint(0, lm.spec.vocab, (2, lm.spec.n_codebooks, 9), generator=g)


def _steps(lm, inputs, threads: int) -> torch.Tensor:
    """Nine guided decode steps, each one C call over every layer, on `threads` threads."""
    torch.set_num_threads(threads)
    cross, tokens = inputs
    cache = lm.new_cache(2, 16, "cpu", torch.float32)
    return torch.cat([lm(tokens[:, :, i:i + 1], i, cache, cross) for i in range(9)], dim=-2)


def _in_thread(fn, *args):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


@torch.inference_mode()
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_a_step_is_the_same_bits_on_one_thread_on_the_pool_from_any_thread_and_beside_another(dtype):
    """Each output of every kernel is one thread's, with the same arithmetic whatever the split, and a
    region that finds the pool busy runs on its caller alone: none of that may move a bit."""
    if dtype == "int4" and not gemv.has_vnni():
        pytest.skip("int4 without integer dot products runs PyTorch's packed kernel: no C step")
    lm = _wide_decoder(dtype, width=256, heads=4)
    assert lm.fuse() == lm.spec.n_layers and lm.stack is not None
    threads = torch.get_num_threads()
    inputs = _inputs(lm)
    try:
        alone = _steps(lm, inputs, 1)
        runs = {"pool, main thread": _steps(lm, inputs, 2), "pool, another thread": _in_thread(_steps, lm, inputs, 2),
                "three threads": _in_thread(_steps, lm, inputs, 3)}
        both: list = [None, None]
        callers = [threading.Thread(target=lambda i=i: both.__setitem__(i, _steps(lm, inputs, 2))) for i in range(2)]
        for t in callers:
            t.start()
        for t in callers:
            t.join()
        runs.update({"two callers at once (a)": both[0], "two callers at once (b)": both[1]})
    finally:
        torch.set_num_threads(threads)
    for name, got in runs.items():
        assert torch.equal(got, alone), name


# Run in a process of its own: which helpers exist depends on what ran in the process before.
POOL_SCRIPT = textwrap.dedent("""
    import os, threading, time
    import numpy as np, torch
    from model.kernels import gemv
    from model.kernels import gemv
    from tests.model.test_thread_pool import _inputs, _steps, _in_thread
    from tests.model.test_gemv import _wide_decoder

    def helpers():
        names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
        return sorted(n for n in names if n.startswith("mb-pool-"))

    with torch.inference_mode():
        lm = _wide_decoder("int8", width=256, heads=4)
        lm.fuse()
        inputs = _inputs(lm)
        want = _steps(lm, inputs, 3)
        same = [torch.equal(_in_thread(_steps, lm, inputs, 3), want) for _ in range(4)]
        print("helpers", ",".join(helpers()), "same", all(same), flush=True)
        lib = gemv._load()
        w = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)

        def quantize():  # the C call alone, on numpy's memory: libgomp (torch's ops) cannot run threads after a fork
            q, scale = np.empty((512, 256), np.int8), np.empty(512, np.float32)
            lib.mb_quantize_i8(w.ctypes.data, 512, 256, q.ctypes.data, scale.ctypes.data, 0)
            return q, scale

        want_q = quantize()
        pid = os.fork()
        if pid == 0:  # the child has none of the parent's helpers: it must start its own, not wait on them
            got = quantize()
            os._exit(0 if all(np.array_equal(a, b) for a, b in zip(got, want_q)) and len(helpers()) == 2 else 3)
        for _ in range(1200):  # a child stuck waiting on helpers it does not have is killed and reported
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = -1
        print("child", status, flush=True)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and forks")
def test_one_pool_serves_every_thread_and_a_forked_child_starts_its_own():
    if not gemv.own_pool():
        pytest.skip("this build's regions run in the OpenMP runtime (not GCC on Linux): no pool of its own")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    r = subprocess.run([sys.executable, "-c", POOL_SCRIPT], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines() if line.startswith(("helpers", "child")))
    # three threads a region: two helpers, started once, however many threads call
    assert lines["helpers"] == "mb-pool-1,mb-pool-2 same True", r.stdout
    assert lines["child"] == "0", f"the forked child failed or hung:\n{r.stdout}\n{r.stderr[-2000:]}"


def test_the_command_line_shortens_libgomps_spin_unless_the_user_chose_a_wait_policy():
    assert openmp_env.chosen({}) == {"GOMP_SPINCOUNT": "10000"}
    assert openmp_env.chosen({"OMP_WAIT_POLICY": "active"}) == {}
    assert openmp_env.chosen({"GOMP_SPINCOUNT": "infinite"}) == {}
    code = ("import os, sys; from bridge import cli; sys.argv = ['musicbridge', 'presets', 'list'];"
            "import atexit; atexit.register(lambda: print('SPIN', os.environ.get('GOMP_SPINCOUNT'))); cli.run()")
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert "SPIN 10000" in r.stdout, r.stdout + r.stderr[-2000:]
