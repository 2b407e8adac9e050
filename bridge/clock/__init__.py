"""Clock followers: the daemon's transport follows one source (typed OSC, JACK, Link, MIDI clock or
a DAW's OSC feedback); see bridge.clock.hub for how one of them leads and docs/daw.md for users."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.clock.follower import ClockError
from bridge.clock.grid import SOURCES, Grid

__all__ = ["ClockError", "FollowSpec", "Grid", "SOURCES", "parse_follow"]

FOLLOW_HELP = "typed, jack, link, midi-clock:PORT or osc"


@dataclass(frozen=True)
class FollowSpec:
    """What `serve --follow` asked for: a source and, for MIDI clock, the port."""

    source: str = "typed"
    port: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"--follow must be {FOLLOW_HELP}, got {self.source!r}")
        if (self.source == "midi-clock") != bool(self.port):
            raise ValueError("--follow midi-clock needs a port, as in midi-clock:PORT" if self.source == "midi-clock"
                             else f"--follow {self.source} takes no port")

    def __str__(self) -> str:
        return f"{self.source}:{self.port}" if self.port else self.source


def parse_follow(text: str) -> FollowSpec:
    """'jack' -> FollowSpec('jack'); 'midi-clock:Clock Out' -> FollowSpec('midi-clock', 'Clock Out')."""
    source, sep, port = text.strip().partition(":")
    if source not in SOURCES:
        raise ValueError(f"--follow must be {FOLLOW_HELP}, got {text!r}")
    if source == "midi-clock" and not port.strip():
        raise ValueError("--follow midi-clock needs the MIDI port after a colon, as in midi-clock:PORT")
    if source != "midi-clock" and sep:
        raise ValueError(f"--follow {source} takes no ':PORT' (only midi-clock does), got {text!r}")
    return FollowSpec(source, port.strip())
