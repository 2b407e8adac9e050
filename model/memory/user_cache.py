"""The user's cache folder for musicbridge: tiny checkpoints, precision measurements.

MUSICBRIDGE_CACHE wins, then $XDG_CACHE_HOME/musicbridge, then ~/.cache/musicbridge: the
folder a user expects caches in, and one a test can point elsewhere.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from model.settings import current as settings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_dir() -> Path:
    return settings().cache_dir


@contextmanager
def new_folder(out: Path, prefix: str) -> Iterator[Path]:
    """A temporary folder beside `out` that becomes `out` when the block ends cleanly and is
    removed when it raises, so a reader never finds half a checkpoint under `out`.

    `out` must not exist or be an empty folder (a FileExistsError says so otherwise).
    """
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
