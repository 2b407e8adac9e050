"""The user's cache folder for musicbridge: tiny checkpoints, precision measurements.

MUSICBRIDGE_CACHE wins, then $XDG_CACHE_HOME/musicbridge, then ~/.cache/musicbridge: the
folder a user expects caches in, and one a test can point elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("MUSICBRIDGE_CACHE"):
        return Path(os.environ["MUSICBRIDGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "musicbridge"
