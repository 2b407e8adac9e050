"""Crash bookkeeping: which jobs were unfinished, so a kill -9 does not make them vanish silently.

Every accepted job is written to jobs-journal.json in the session folder (atomically, like
session.json) with the message that asked for it and where its replies go; it is removed when
the job ends in any way. At the next start whatever is still listed was cut off by a crash:
the daemon reports each one as `/job/failed <id> "interrupted"` to its reply address, or with
`serve --resume` queues the same message again. Leftover temporary files of interrupted writes
(`.*.part*` stems, `.session.*.json.tmp`) are removed at start too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.state.session import replace_json

log = logging.getLogger("musicbridge.serve")
FILE_NAME = "jobs-journal.json"
MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class Entry:
    job_id: int
    address: str
    args: tuple[Any, ...]
    reply_to: tuple[str, int]
    sender: tuple[str, int]
    proven: bool = False  # the reply host had proved its address (bridge.osc.reply_budget): still so after a crash


def _entry(raw: Any) -> Entry | None:
    """An entry from the file, or None when any field is out of range (a damaged journal is not trusted)."""
    try:
        job_id, address, args = raw["id"], raw["address"], raw["args"]
        reply_to, sender, proven = raw["reply_to"], raw["sender"], raw.get("proven", False)
        ok = (isinstance(job_id, int) and 1 <= job_id < 2**53 and isinstance(address, str)
              and address.startswith("/track/") and len(address) <= 256 and isinstance(args, list)
              and len(args) <= 3 and all(isinstance(a, (int, float, str)) and not isinstance(a, bool) for a in args)
              and all(isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
                      and isinstance(a[1], int) and 0 < a[1] < 65536 for a in (reply_to, sender))
              and isinstance(proven, bool))
        if not ok:
            return None
        return Entry(job_id, address, tuple(args), (reply_to[0], reply_to[1]), (sender[0], sender[1]), proven)
    except (KeyError, TypeError, IndexError, AttributeError):
        return None


class Journal:
    """The unfinished jobs of one session folder; thread-safe, saved on every change."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self._lock = threading.Lock()
        self._entries: dict[int, Entry] = {}

    def load_interrupted(self) -> list[Entry]:
        """The jobs a previous run left unfinished (the journal is then emptied)."""
        found: list[Entry] = []
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                items = raw.get("jobs", []) if isinstance(raw, dict) else []
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                log.warning("the job journal %s cannot be read (%s); interrupted jobs cannot be reported",
                            self.path, e)
                items = []
            for item in items[:MAX_ENTRIES] if isinstance(items, list) else []:
                e = _entry(item)
                if e is None:
                    log.warning("ignoring a damaged entry in %s: %.200r", self.path, item)
                else:
                    found.append(e)
        with self._lock:
            self._entries = {}
            self._save()
        return found

    def add(self, entry: Entry) -> None:
        """Record a job as it is accepted. Raises OSError, keeping no entry, when the journal cannot
        be written: a job is acknowledged only once a restart would find it."""
        with self._lock:
            self._entries[entry.job_id] = entry
            try:
                self._write()
            except (OSError, ValueError) as e:
                del self._entries[entry.job_id]
                raise OSError(f"could not write the job journal {self.path}: {e}") from e

    def remove(self, job_id: int) -> None:
        with self._lock:
            if self._entries.pop(job_id, None) is not None:
                self._save()

    def _write(self) -> None:
        data = {"version": 1, "jobs": [{"id": e.job_id, "address": e.address, "args": list(e.args),
                                        "reply_to": list(e.reply_to), "sender": list(e.sender),
                                        "proven": e.proven}
                                       for e in self._entries.values()]}
        replace_json(self.path, data, prefix=".jobs-journal.")

    def _save(self) -> None:
        try:
            self._write()
        except (OSError, ValueError) as e:  # a finished job's line stays: a restart reports it, harmless
            log.warning("could not update the job journal %s: %s", self.path, e)


def remove_stale_temporaries(*folders: Path) -> list[Path]:
    """Delete the hidden temporary files an interrupted write leaves (ours only, by their naming)."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            name = p.name
            ours = name.startswith(".") and (".part" in name or name.endswith(".json.tmp"))
            if ours and p.is_file() and not p.is_symlink():
                try:
                    p.unlink()
                    removed.append(p)
                except OSError as e:
                    log.warning("could not remove the stale temporary file %s: %s", p, e)
    if removed:
        log.info("removed %d stale temporary file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(str(p) for p in removed[:10]))
    return removed
