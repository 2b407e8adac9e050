"""Which files an OSC message may name: only those under the stems folder or an --allow-dir.

A message can come from anything that can send a UDP packet to the daemon, so a path in it
is resolved (symlinks and '..' included) before it is compared with the roots; a link inside
a root that points outside is refused like any other outside path. This is the check at
message time; bridge.osc.input_files checks again where the file is opened (a name can be swapped).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from bridge.state.rules import ProtocolError


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, in words for an error message."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class PathPolicy:
    """The folders message paths must resolve under."""

    def __init__(self, roots: Iterable[str | os.PathLike]):
        self.roots = tuple(Path(os.path.realpath(Path(r).expanduser())) for r in roots)

    def inside(self, path: Path) -> bool:
        return any(path == r or r in path.parents for r in self.roots)

    def check(self, text: str, suffixes: Sequence[str] = (), what: str = "path") -> Path:
        """The resolved path of an existing file under a root; ProtocolError (bad_path, not_found, bad_args)."""

        if not os.path.isabs(text):
            raise ProtocolError("bad_path", f"{what} {text[:200]!r} must be an absolute path")
        resolved = Path(os.path.realpath(text))
        if not self.inside(resolved):
            roots = ", ".join(str(r) for r in self.roots) or "(none configured)"
            raise ProtocolError("bad_path", f"{what} {text[:200]!r} is outside the allowed folders ({roots}); "
                                            "start the daemon with --allow-dir to add one")
        try:
            mode = os.stat(resolved).st_mode
        except OSError:
            raise ProtocolError("not_found", f"{what} {text[:200]!r} does not exist") from None
        if not stat.S_ISREG(mode):
            raise ProtocolError("bad_args", f"{what} {text[:200]!r} is {file_kind(mode)}; expected a regular file")
        if suffixes and resolved.suffix.lower() not in suffixes:
            raise ProtocolError("bad_args", f"{what} {text[:200]!r} must end in {', '.join(suffixes)}")
        return resolved
