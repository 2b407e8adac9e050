"""Every instruction set's kernels, checked on this one machine: the C checks
(tests/model/kernels/kernels_check.c: reference arithmetic, a row alone equal to the row batched)
built for the machine's own -march, for the x86 levels below it, and for ARM64 run under qemu-user;
and the Python kernel tests run again on the AVX2 build where the machine's own is AVX-512."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from model.kernels import gemv

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).parent / "kernels" / "kernels_check.c"
X86 = platform.machine() in ("x86_64", "AMD64")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    m = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(m.group(1).split()) if m else set()


def _build_and_run(cc: list[str], march: str, out: Path, runner: list[str] = ()) -> tuple[str, str]:
    """Compile the checks for `march` ("-march" value, then any extra -m flags after a space), run
    them; return (the arch line's name, the int4 checksum)."""
    sources = [str(p) for p in gemv.SOURCES]
    arch_flags = [f"-march={march.split()[0]}", *march.split()[1:]]
    build = subprocess.run([*cc, "-O2", *arch_flags, "-fopenmp", "-std=gnu11", f"-I{gemv.KERNELS}",
                            str(CHECK), *sources, "-lm", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, f"{cc[0]} -march={march} failed:\n{build.stderr[-3000:]}"
    run = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert run.returncode == 0 and "0 failures" in run.stdout, f"-march={march}:\n{run.stdout[-3000:]}{run.stderr[-2000:]}"
    arch = re.search(r"^arch (\S+),", run.stdout, re.M).group(1)
    checksum = re.search(r"^int4 checksum (\S+)$", run.stdout, re.M).group(1)
    return arch, checksum


# (-march, the CPU flags it needs, the integer kernels it must select)
X86_LEVELS = [("x86-64-v4", {"avx512f", "avx512bw", "avx512_vnni"}, "avx512-vnni"),
              ("x86-64-v3", {"avx2", "fma", "f16c"}, "avx2"),
              ("x86-64-v2", {"sse4_2"}, "none")]


@pytest.mark.skipif(not X86, reason="the x86 levels run on an x86-64 CPU")
@pytest.mark.parametrize("march,needs,expected", X86_LEVELS, ids=[lv[0] for lv in X86_LEVELS])
def test_each_x86_level_passes_the_kernel_checks(tmp_path, march, needs, expected):
    missing = needs - _cpu_flags()
    if missing:
        pytest.skip(f"this CPU lacks {', '.join(sorted(missing))}, which -march={march} builds for")
    # x86-64-v4 has no VNNI of its own: add it, as -march=native does on a CPU that has it.
    arch, _ = _build_and_run(["gcc"], march + (" -mavx512vnni" if march == "x86-64-v4" else ""), tmp_path / "check")
    assert arch == expected


def _arm_toolchain() -> tuple[str, str]:
    cc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    assert cc and qemu, ("the ARM64 checks need Debian's gcc-aarch64-linux-gnu and qemu-user "
                         "(scripts/setup.sh installs them)")
    return cc, qemu


@pytest.mark.parametrize("march,expected", [("armv8.2-a+dotprod+fp16", "neon-dotprod"), ("armv8-a", "none")])
def test_arm64_passes_the_kernel_checks_under_qemu(tmp_path, march, expected):
    cc, qemu = _arm_toolchain()
    # static: qemu-user then needs no ARM64 libraries; -cpu max has the dot-product extension
    arch, _ = _build_and_run([cc, "-static"], march, tmp_path / "check-arm64", runner=[qemu, "-cpu", "max"])
    assert arch == expected


def test_int4_gives_the_same_bits_on_every_instruction_set(tmp_path):
    """int4's lanes are rows and its float steps per lane are the same everywhere (int_kernels.h):
    the outputs of AVX-512, AVX2 and NEON builds must be equal bit for bit."""
    cc, qemu = _arm_toolchain()
    sums = {"neon": _build_and_run([cc, "-static"], "armv8.2-a+dotprod+fp16", tmp_path / "arm",
                                   runner=[qemu, "-cpu", "max"])[1]}
    flags = _cpu_flags()
    if X86 and {"avx2", "fma", "f16c"} <= flags:
        sums["avx2"] = _build_and_run(["gcc"], "x86-64-v3", tmp_path / "v3")[1]
    if X86 and {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
        sums["avx512"] = _build_and_run(["gcc"], "x86-64-v4 -mavx512vnni", tmp_path / "v4")[1]
    assert len(sums) >= 2 and len(set(sums.values())) == 1, sums


@pytest.mark.skipif(not X86 or not {"avx2", "fma", "f16c"} <= _cpu_flags() or gemv.int_arch() == "avx2",
                    reason="needs an x86 CPU with AVX2 whose own build is not already the AVX2 one "
                           "(there the suite itself runs the AVX2 kernels)")
def test_the_python_kernel_tests_pass_on_the_avx2_build():
    """The PyTorch-referenced kernel tests, again with the kernels built for AVX2 (x86-64-v3)."""
    env = {**os.environ, "MUSICBRIDGE_MARCH": "x86-64-v3"}
    probe = subprocess.run([sys.executable, "-c", "from model.kernels import gemv; print(gemv.int_arch())"],
                           capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert probe.stdout.strip() == "avx2", probe.stderr[-2000:]
    tests = ["tests/model/test_gemv.py", "tests/model/test_attention_kernel.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    assert " passed" in run.stdout and "skipped" not in run.stdout.splitlines()[-1], run.stdout[-1000:]
