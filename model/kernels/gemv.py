"""The decode step's C kernels (model/kernels/: gemv.c products, layer_step.c a whole layer's step,
attention.c, top_k.c, and arch/ the integer products for each instruction set), built for this
machine and loaded once.

PyTorch's CPU kernels for a product with 1-8 activation rows stream weights at a fraction of
the memory bandwidth and need bfloat16 activations for int8 (BENCHMARKS.md). The C kernels keep
activations in float32 and widen the weights in registers. They are
compiled with the machine's own flags (`-march=native`) on first use, or by `make setup`, into
the cache folder, keyed by the source, the compiler and the CPU, so a copied cache never runs
code built for another CPU.

Without a C compiler, or with MUSICBRIDGE_KERNELS=0 (for A/B measurements), `available()` is
False and the linears use PyTorch's kernels instead: slower, same results within rounding.
Where the CPU has integer dot products (AVX512-VNNI; AVX2 with FMA and F16C; ARM64 NEON with
the dot-product extension: `int_arch()`), int8 and int4 run on them (model/kernels/int_kernels.h):
int8's activations are split into two int8 terms per block of 64 (about 15 bits, so the
weights' own rounding still dominates the error), which reads the weights at memory speed where
widening them to float did not (BENCHMARKS.md). MUSICBRIDGE_KERNELS=float asks for the widening
kernel instead (A/B). MUSICBRIDGE_MARCH names another -march than the machine's own (for
example x86-64-v3, AVX2, on an AVX-512 machine), so the tests run every x86 path on one CPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from model.memory import hugepages, weight_cache
from model.memory.user_cache import cache_dir
from model.settings import current as settings

log = logging.getLogger("musicbridge.model")
KERNELS = Path(__file__).parent  # the C sources sit beside this module
SOURCES = tuple(sorted(KERNELS.rglob("*.c")))
HEADERS = tuple(sorted(KERNELS.rglob("*.h")))


def march() -> str:
    """The -march the kernels are built for: the machine's own unless MUSICBRIDGE_MARCH names one."""
    return settings().march


def _flags() -> tuple[str, ...]:
    # Apple's ARM64 clang takes the CPU with -mcpu, not -march.
    target = "-mcpu=native" if march() == "native" and platform.system() == "Darwin" else f"-march={march()}"
    return ("-O3", target, "-fopenmp", "-shared", "-fPIC", "-std=gnu11", f"-I{KERNELS}")
# Above this many activation rows (prefill, long batches) a product is compute-bound, not
# bound by reading weights: it runs as one PyTorch matmul over the widened weights instead.
MAX_ROWS = 8  # rows one kernel call takes
# Rows a product still runs as kernel calls of MAX_ROWS each: each call streams the weights once,
# cheap for a 1 MB int8 projection; above this a prefill is one matmul. A text prompt's cross
# keys and values (two rows per token with guidance) took 3 ms a linear through a dequantised
# float32 matmul, against 0.1-0.3 ms here (Intel Xeon, musicgen-small).
FEW_ROWS = 8 * MAX_ROWS

_lib: ctypes.CDLL | None = None
_tried = False
_lock = threading.Lock()
_P, _I = ctypes.c_void_p, ctypes.c_int


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled; the message carries the compiler's own words."""


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> list[str] | None:
    """The compiler command: CC (which may carry flags, as make's does), else gcc or cc on PATH."""
    if settings().compiler:
        return list(settings().compiler)
    found = shutil.which("gcc") or shutil.which("cc")
    return [found] if found else None


@functools.lru_cache(maxsize=1)
def _build_key() -> str:
    """What the build depends on (sources, compiler, flags, CPU), worked out once per process."""
    cc = _compiler() or ["none"]
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    return hashlib.sha256("\0".join([*texts, " ".join(cc), version, " ".join(_flags()[:-1]), _cpu_id()])
                          .encode()).hexdigest()[:16]


def library_path() -> Path:
    return cache_dir() / "kernels" / f"gemv-{_build_key()}.so"


def build() -> Path:
    """Compile the kernels for this machine (no-op when the cached build matches); return its path."""
    out = library_path()
    if out.exists():
        return out
    cc = _compiler()
    if cc is None:
        raise KernelBuildError("no C compiler found (set CC, or install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gemv-", suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        try:
            r = subprocess.run([*cc, *_flags(), "-o", tmp, *map(str, SOURCES), "-lm"], capture_output=True,
                               text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            raise KernelBuildError(f"could not run the C compiler {' '.join(cc)!r} (from CC or PATH): {e}") from e
        if r.returncode != 0:
            names = ", ".join(p.name for p in SOURCES)
            raise KernelBuildError(f"{' '.join(cc)} failed on {names}: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if settings().kernels == "0":
            log.info("C kernels off (MUSICBRIDGE_KERNELS=0): PyTorch's kernels run the linears")
            return None
        try:
            # torch is imported first, so where the library's regions run in OpenMP's runtime it is
            # torch's own; with GCC on Linux they run on the library's own pool
            # (thread_pool.c), sized by torch.set_num_threads all the same.
            lib = ctypes.CDLL(str(build()))
        except (OSError, KernelBuildError, subprocess.SubprocessError) as e:
            log.warning("C kernels unavailable, using PyTorch's (slower): %s", e)
            return None
        for name, args in {
            "mb_gemv_bf16": [_P, _I, _I, _P, _P, _P, _I],
            "mb_gemv_i8": [_P, _I, _I, _P, _P, _P, _P, _I],
            "mb_gemv_i8_vnni": [_P, _I, _I, _P, _P, _P, _P, _I],
            "mb_layer_step": [_P, _P, _P, _P, _P, _P, _I, _P, _P, _P],
            "mb_decoder_steps": [_P, _I, _I, _P, _I, _P, _P, _P, _P, _I, _P],
            "mb_attend": [_P, _I, _P, _P, _P, _P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _P],
            "mb_attend_scratch": [_I, _I, _I],
            "mb_gelu": [_P, ctypes.c_long],
            "mb_quantize_i8": [_P, _I, _I, _P, _P, _I],
            "mb_gemv_i4": [_P, _I, _I, _P, _P, _I],
            "mb_quantize_i4": [_P, _I, _I, _P],
            "mb_dequantize_i4": [_P, _I, _I, _P],
            "mb_quantize_kv": [_P, ctypes.c_long, _I, _P, _P],
            "mb_top_k_support": [_P, _I, _I, _I, _P, _P],
        }.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, None
        lib.mb_int_arch.argtypes, lib.mb_int_arch.restype = [], ctypes.c_char_p
        for name in ("mb_lanes", "mb_has_vnni", "mb_thread_pool", "mb_layer_step", "mb_decoder_steps", "mb_gemv_i8_vnni",
                     "mb_attend_scratch", "mb_gemv_i4", "mb_top_k_support"):
            getattr(lib, name).restype = _I
        _lib = lib
        return lib


def available() -> bool:
    return _load() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    return x2


def _blocks(x2: torch.Tensor, y: torch.Tensor):
    """(activation rows, output rows) MAX_ROWS at a time: what one kernel call takes."""
    for lo in range(0, x2.shape[0], MAX_ROWS):
        yield x2[lo : lo + MAX_ROWS], y[lo : lo + MAX_ROWS]


def signature() -> str:
    """Which kernels run here, for caches of measured speed: "off", or the arithmetic and build."""
    arithmetic = int8_arithmetic()
    return "off" if arithmetic is None else f"{arithmetic} gemv-{_build_key()}"


def has_vnni() -> bool:
    """Whether this build has integer products (the int8 "vnni" layout and int4 in C): AVX512-VNNI,
    AVX2 or ARM64 NEON with dot products (`int_arch`)."""
    lib = _load()
    return lib is not None and bool(lib.mb_has_vnni())


def own_pool() -> bool:
    """Whether the kernels' parallel regions run on their own thread pool (model/kernels/thread_pool.c:
    GCC on Linux) rather than in the OpenMP runtime."""
    lib = _load()
    return lib is not None and bool(lib.mb_thread_pool())


def int_arch() -> str | None:
    """Which integer kernels are built in: "avx512-vnni", "avx2", "neon-dotprod" or "none"; None
    without the C kernels."""
    lib = _load()
    return None if lib is None else lib.mb_int_arch().decode()


def int8_arithmetic() -> str | None:
    """How int8 linears run here: "vnni" (integer dot products over two-term int8 activations:
    the default where the build has integer products, `int_arch`), "float" (weights widened, activations float32:
    elsewhere, or asked for with MUSICBRIDGE_KERNELS=float), or None (PyTorch's kernels)."""
    if not available():
        return None
    if settings().kernels == "float" or not has_vnni():
        return "float"
    return "vnni"


# int4's layout (model/kernels/int_kernels.h): rows in tiles of I4_TILE, each tile's blocks of I4_GROUP inputs
# I4_TILE_BLOCK bytes (the sixteen rows' 4-bit q as sixteen 64-byte vectors, lanes along the rows,
# then their steps as float16, their zero points as bytes, and padding to a whole cache line).
I4_GROUP, I4_TILE, I4_TILE_BLOCK = 128, 16, 1088
I4_STEPS_AT, I4_ZEROS_AT = 1024, 1056  # in a tile's block: the rows' steps, then their zero points


def i4_shape(n: int, k: int) -> tuple[int, int]:
    """The packed int4 weight of an (n, k) linear: (tiles, bytes a tile), the last tile padded."""
    return -(-n // I4_TILE), k // I4_GROUP * I4_TILE_BLOCK


def takes_i4(in_features: int) -> bool:
    """Whether the int4 kernel runs a linear this wide here: whole 128-input blocks, on a CPU with
    integer products (`int_arch`; elsewhere int4 runs PyTorch's packed kernel, same weights)."""
    return in_features % I4_GROUP == 0 and has_vnni()


def takes(in_features: int) -> bool:
    """Whether the kernels can run a linear this wide: they read rows in whole 64-input blocks
    (every MusicGen width is some)."""
    return in_features % 64 == 0 and available()


def linear_i8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) float32 -> (..., N) for 1..FEW_ROWS rows (see `few`); w (N, K) int8, or uint8 biased by 128
    for the "vnni" arithmetic (K a multiple of 64); scale (N,) float32; bias (N,) or None."""
    n, k = w.shape
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n)
    for xs, ys in _blocks(x2, y):
        if w.dtype != torch.uint8:
            _lib.mb_gemv_i8(xs.data_ptr(), xs.shape[0], k, w.data_ptr(), scale.data_ptr(), _ptr(bias),
                            ys.data_ptr(), n)
        elif _lib.mb_gemv_i8_vnni(xs.data_ptr(), xs.shape[0], k, w.data_ptr(), scale.data_ptr(), _ptr(bias),
                                  ys.data_ptr(), n) != 0:
            raise MemoryError("the int8 (VNNI) product could not get its scratch memory")
    return y.reshape(*x.shape[:-1], n)


def quantize_i8(w: torch.Tensor, biased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """model.decode.quant.quantize_int8's arithmetic in one C pass per row: w (N, K) contiguous float32
    -> q (N, K) int8, scale (N,) float32; with `biased`, q + 128 as uint8 (the "vnni" layout)."""
    n, k = w.shape
    # The weights a step streams: on huge pages from their first touch (in a layout's arena).
    q, scale = hugepages.for_weights((n, k), torch.uint8 if biased else torch.int8), torch.empty(n)
    weight_cache.fill(q, scale, lambda: _lib.mb_quantize_i8(w.data_ptr(), n, k, q.data_ptr(), scale.data_ptr(),
                                                            int(biased)), source=w)
    return q, scale


def quantize_i4(w: torch.Tensor) -> torch.Tensor:
    """model.decode.quant.quantize_int4's arithmetic in C, packed in the kernel's layout: w (N, K)
    contiguous float32, K a multiple of I4_GROUP -> `i4_shape(N, K)` uint8."""
    n, k = w.shape
    out = hugepages.for_weights(i4_shape(n, k), torch.uint8)
    weight_cache.fill(out, None, lambda: _lib.mb_quantize_i4(w.data_ptr(), n, k, out.data_ptr()), source=w)
    return out


def dequantize_i4(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """A `quantize_i4` weight back to float32 (n, k), d (q - z): for a prefill's one matmul."""
    out = torch.empty(n, k)
    _lib.mb_dequantize_i4(w.data_ptr(), n, k, out.data_ptr())
    return out


def linear_i4(x: torch.Tensor, w: torch.Tensor, n: int, k: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., k) float32 -> (..., n) for 1..FEW_ROWS rows, w packed by `quantize_i4`."""
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n)
    for xs, ys in _blocks(x2, y):
        if _lib.mb_gemv_i4(xs.data_ptr(), xs.shape[0], k, w.data_ptr(), ys.data_ptr(), n) != 0:
            raise MemoryError("the int4 product could not get its scratch memory")
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], n)


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """model.decode.decoder.quantize_kv in one C pass (the same bytes; the C step's own quantiser)."""
    x = x.float().contiguous()
    width = x.shape[-1]
    q, scale = torch.empty(x.shape, dtype=torch.int8), torch.empty(x.shape[:-1])
    _lib.mb_quantize_kv(x.data_ptr(), x.numel() // width, width, q.data_ptr(), scale.data_ptr())
    return q, scale


def top_k_support(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's k largest values of x (rows, n) float32 and their indices, in token order
    (model/kernels/top_k.c), or None where a row has a tie at its k-th value or a NaN."""
    x = x.float().contiguous()
    rows, n = x.shape
    index, values = torch.empty(rows, k, dtype=torch.int64), torch.empty(rows, k)
    rc = _lib.mb_top_k_support(x.data_ptr(), rows, n, k, index.data_ptr(), values.data_ptr())
    if rc < 0:
        raise MemoryError("top-k sampling could not get its scratch memory")
    return (index, values) if rc == 0 else None


def linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., K) float32 -> (..., N) float32 for 1..FEW_ROWS rows, w (N, K) bfloat16."""
    n, k = w.shape
    x2 = _rows(x, k)
    y = torch.empty(x2.shape[0], n)
    for xs, ys in _blocks(x2, y):
        _lib.mb_gemv_bf16(xs.data_ptr(), xs.shape[0], k, w.data_ptr(), _ptr(bias), ys.data_ptr(), n)
    return y.reshape(*x.shape[:-1], n)


def rows_of(x: torch.Tensor) -> int:
    """How many activation rows a product over `x` has: at most FEW_ROWS go to the kernels."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def suits(x: torch.Tensor) -> bool:
    """Whether a product with these activations runs in the C kernels (CPU, float32, few rows);
    the linear itself was checked once with `takes`."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and 0 < rows_of(x) <= MAX_ROWS


def few(x: torch.Tensor) -> bool:
    """Whether these activations are few enough rows for kernel calls of MAX_ROWS each."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and 0 < rows_of(x) <= FEW_ROWS
