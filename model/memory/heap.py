"""The cyclic garbage collector while a model loads: paused, then what was made is frozen.

Importing torch and laying out a checkpoint make some 180,000 Python objects that live as long
as the process. With the collector running, full collections walk all of them again: three of
70-85 ms in one `musicbridge generate` (0.23 s of its 0.26 s in the collector), and in `serve`
such a pass can land in the middle of a live decoder step. Frozen (`gc.freeze`), they are left
out of every later collection. Reference counting still frees them; only a reference cycle
among them would wait for the process to end.

This module imports nothing heavy, so it can wrap the import of torch itself.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def loading(collect: bool = False) -> Iterator[None]:
    """Collector off inside; on the way out, freeze what exists and restore the collector as
    it was (so nested uses leave it to the outermost). `collect`: one full pass before the
    freeze, so no cycle made while loading stays for good (for a process that runs for hours:
    `serve`; 0.15 s)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collect:
            gc.collect()
        gc.freeze()
        if was_enabled:
            gc.enable()
