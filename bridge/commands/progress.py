"""Progress of a long command with the time left: a tqdm bar on a terminal, plain lines otherwise.

Why two forms: a terminal redraws one line in place, while a log file, a pipe or CI keeps every
byte, so there the same progress is a few whole lines ("generating: 40% after 2.1 s, about 3.2 s
left"), one per tenth of the work. Three shapes of work:
- `Progress`: a fraction of known work (the engine's progress(request, fraction) callback);
- `Stages`: a known number of steps (bench's runs);
- `timed`: work that reports nothing (loading a model, writing a checkpoint); on a terminal the
  time left is estimated from how long the same work took last time on this machine (remembered
  in the user cache; with no earlier run only the time spent is shown); through a pipe it is one
  line once done, so a failure's message stays the one line that says why.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO

from tqdm import tqdm

from model.memory.user_cache import cache_dir

LINE_STEP = 10  # percent between two plain lines


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A fraction of known work, from 0 to 1; a context manager (the bar is closed on exit)."""

    def __init__(self, label: str, parts: int = 1, stream: IO[str] | None = None, terminal: bool | None = None):
        """parts: how many requests report their own fraction through __call__ (their mean is shown)."""
        self.label, self.parts = label, max(1, int(parts))
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.t0 = time.monotonic()
        self._fractions: dict[int, float] = {}
        self._lines = 0  # plain lines written (tenths passed)
        self._lock = threading.Lock()
        self._bar = None
        if self.terminal:

            self._bar = tqdm(total=1000, desc=label, file=self.stream, leave=True,
                             bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} spent, {remaining} left")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, index: int, fraction: float) -> None:
        """The engine's progress callback: request `index` is `fraction` done."""
        with self._lock:
            if fraction == fraction:  # not NaN
                self._fractions[index] = max(self._fractions.get(index, 0.0), min(max(float(fraction), 0.0), 1.0))
            done = sum(self._fractions.values()) / self.parts
        self.to(done)

    def to(self, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        if self._bar is not None:
            n = int(round(fraction * 1000))
            if n > self._bar.n:
                self._bar.update(n - self._bar.n)
            return
        tenth = int(fraction * 100) // LINE_STEP
        if tenth > self._lines and fraction < 1.0:
            self._lines = tenth
            spent = time.monotonic() - self.t0
            left = spent * (1.0 - fraction) / fraction if fraction > 0 else float("nan")
            self.stream.write(f"{self.label}: {tenth * LINE_STEP}% after {spent:.1f} s, about {left:.1f} s left\n")
            self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines >= 0:
            self.stream.write(f"{self.label}: done in {time.monotonic() - self.t0:.1f} s\n")
            self.stream.flush()
            self._lines = -1


class Stages:
    """A known number of steps, each announced with a message (bench's log lines)."""

    def __init__(self, label: str, total: int, stream: IO[str] | None = None, terminal: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = _is_terminal(self.stream) if terminal is None else terminal
        self.label, self.total, self.done = label, max(1, total), 0
        self.t0 = time.monotonic()
        self._bar = None
        if self.terminal:

            self._bar = tqdm(total=self.total, desc=label, file=self.stream,
                             bar_format="{desc}: {n_fmt}/{total_fmt}|{bar}| {elapsed} spent, {remaining} left")

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str) -> None:
        """A message; one that starts a step ("running ...", "measuring ...", "writing ...") advances the bar."""
        step = message.lstrip().startswith(("running", "measuring", "writing", "variations", "built", "trained"))
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
            if step and self._bar.n < self.total:
                self._bar.update(1)
            return
        if step and self.done < self.total:
            self.done += 1
            spent = time.monotonic() - self.t0
            message += f"   [{self.label}: step {self.done} of {self.total}, {spent:.0f} s spent]"
        self.stream.write(message + "\n")
        self.stream.flush()


def _history_path():
    return cache_dir() / "durations.json"


def _remembered(key: str) -> float | None:
    try:
        v = json.loads(_history_path().read_text()).get(key)
        return float(v) if v and v > 0 else None
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _remember(key: str, seconds: float) -> None:
    path = _history_path()
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(data, dict):
            data = {}
        data[key] = round(seconds, 3)
        if len(data) > 200:  # keep the file small: the most recent keys win
            data = dict(list(data.items())[-200:])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)
    except (OSError, ValueError):
        pass  # a read-only cache only costs the next run its estimate


@contextlib.contextmanager
def timed(label: str, key: str, stream: IO[str] | None = None, terminal: bool | None = None) -> Iterator[None]:
    """Work that reports no progress: a bar that moves with the time spent against the time the same work
    (`key`) took last time; the duration is remembered for the next run when the work succeeds."""
    stream = stream if stream is not None else sys.stderr
    terminal = _is_terminal(stream) if terminal is None else terminal
    expected = _remembered(key)
    t0 = time.monotonic()
    stop = threading.Event()
    ticker = None
    if terminal:

        fmt = ("{desc}: {percentage:3.0f}%|{bar}| {elapsed} spent, {remaining} left" if expected
               else "{desc}: {elapsed} spent (first time: no estimate yet)")
        bar = tqdm(total=expected or 1.0, desc=label, file=stream, bar_format=fmt)

        def tick() -> None:
            while not stop.wait(0.2):
                spent = time.monotonic() - t0
                bar.n = min(spent, 0.99 * expected) if expected else 0
                bar.refresh()

        ticker = threading.Thread(target=tick, name="progress", daemon=True)
        ticker.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
            if ok and expected:
                bar.n = bar.total
            bar.close()
        spent = time.monotonic() - t0
        if ok:
            _remember(key, spent)
            if not terminal:  # one line, at the end: a failure stays the one line that says why
                stream.write(f"{label}: done in {spent:.1f} s" + (f" (last time {expected:.1f} s)" if expected else "")
                             + "\n")
                stream.flush()
