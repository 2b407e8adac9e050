"""How long torch's OpenMP helpers wait busy, set before torch loads (libgomp reads it once).

Why: torch's own parallel ops (the prefill's matmuls, the codec's convolutions, a few in each
step) run in libgomp, whose helpers spin up to 300,000 times, milliseconds, after each op before
they sleep. Spinning, they hold a core that the kernels' pool (model/kernels/thread_pool.c) wants
for the next decode step: musicgen-small int8 on 2 cores stepped at 22 ms on the main thread
against 16 with a short spin (BENCHMARKS.md). A short spin costs torch's ops one wake-up each.
The user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

# libgomp's spins before a helper sleeps (about 0.2 ms on a 3-4 GHz core)
SPIN = {"GOMP_SPINCOUNT": "10000"}


def chosen(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to add to a process started from `environ`: the short spin, unless the user
    chose a wait policy there."""
    return {} if "GOMP_SPINCOUNT" in environ or "OMP_WAIT_POLICY" in environ else dict(SPIN)


def apply() -> None:
    """Set it for this process (before torch loads) and the processes it starts."""
    os.environ.update(chosen())
