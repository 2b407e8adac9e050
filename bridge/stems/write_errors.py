"""Failed writes explained: a full disk is named as such, with the folder, whatever the library said.

Audio libraries report a full disk in their own words ("Unable to write data to audio file"),
so the cause is also read from the errno when there is one and from the free space of the
folder otherwise.
"""

from __future__ import annotations

import errno
import os
import shutil

FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)


def describe_write_error(e: BaseException, folder: str | os.PathLike, needed_bytes: int) -> str:
    """One line: what failed, where, and why (the disk is full, read-only, no permission ...)."""
    path = getattr(e, "filename", None) or folder
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(e, "errno", None)
    if code in FULL or (free is not None and free < needed_bytes):
        left = f"{free / 1e6:.1f} MB free, about {needed_bytes / 1e6:.1f} MB needed" if free is not None else ""
        return f"could not write the stem to {path}: the disk is full ({left}; {type(e).__name__}: {e})"
    if code == errno.EROFS:
        return f"could not write the stem to {path}: the file system is read-only ({e})"
    if code in (errno.EACCES, errno.EPERM):
        return f"could not write the stem to {path}: permission denied ({e})"
    return f"could not write the stem to {path}: {type(e).__name__}: {e}"
