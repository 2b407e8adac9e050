"""Session files: a TOML description of a whole session to render to stems.

    tempo = 120                 # quarter notes per minute
    signature = "4/4"
    sample_rate = 48000         # stem rate (optional)
    format = "wav"              # or "flac" (optional)
    loop = false                # make every bar-length track a seamless loop (optional)

    [[track]]
    name = "drums"              # [A-Za-z0-9_-]{1,32}, unique; also the stem's file name
    preset = "lofi_drums"       # optional: prompt, params and chain come from it
    prompt = "..."              # optional with a preset (replaces its prompt), required without
    bars = 4                    # or seconds = 8.0
    start_bar = 1               # where the stem sits on the timeline (1 = the start)
    seed = 1                    # optional; a random one is drawn and recorded when absent
    melody = "riff.mid"         # optional, relative to this file; melody models only
    melody_track = "lead"       # optional MIDI track name or index
    loop = true                 # optional per-track override
    params = { guidance = 3.5 } # optional, on top of the preset's
    chain = [ { plugin = "Reverb", room_size = 0.3 } ]   # optional, replaces the preset's

Vocabulary: a *track* is a named voice of a session (its prompt, preset, params, melody); a *stem*
is the audio file made for a track. The same word appears in four records, one per layer:
bridge.state.session.TrackSettings (a live track, changed over OSC), FileTrack (a [[track]] table of a
session file), bridge.stems.render.StemPlan (everything needed to make one stem) and
plugin_host.output.OutputTrack (a live output channel a track plays through).

Every mistake raises SessionFileError naming the file, the line where it can be found, the key
and what is expected; nothing is rendered from a file that does not validate completely.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge.state import rules as R
from model.types import MAX_REQUEST_SECONDS
from plugin_host.chain import ChainError, build_chain
from plugin_host.tempo import MAX_BPM, MIN_BPM, TempoError, TimeSignature
from presets import PresetError, check_params, load_preset

SESSION_KEYS = ("tempo", "signature", "sample_rate", "format", "loop", "model", "track")
TRACK_KEYS = ("name", "preset", "prompt", "bars", "seconds", "start_bar", "seed", "melody",
              "melody_track", "loop", "params", "chain")
MAX_TRACKS = 64


class SessionFileError(ValueError):
    """A session file that cannot be rendered; names the file, line, key and what is expected."""


@dataclass(frozen=True)
class FileTrack:
    """One [[track]] table of a session file, validated."""

    name: str
    prompt: str  # without the "<bpm> bpm" suffix
    add_bpm: bool
    params: dict[str, Any]
    chain: tuple[dict[str, Any], ...]
    bars: float | None
    seconds: float | None
    start_bar: float
    seed: int | None
    melody: Path | None
    melody_track: str | int | None
    loop: bool
    preset: Any = None  # presets.Preset or None


@dataclass(frozen=True)
class SessionFile:
    """A parsed, fully validated session file; bridge.state.session.LiveSession is the daemon's live state."""

    path: Path
    sha256: str
    tempo: float
    signature: Any  # plugin_host.tempo.TimeSignature
    sample_rate: int
    format: str
    loop: bool
    model: str | None
    tracks: tuple[FileTrack, ...] = field(default_factory=tuple)


def load_session(path: str | Path) -> SessionFile:
    """Parse and fully validate a session file (presets, chains and melody paths included)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SessionFileError(f"session file {p} does not exist")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SessionFileError(f"{p}: not UTF-8 text ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SessionFileError(f"{p}: invalid TOML: {e}") from None
    return _Parser(p, text, hashlib.sha256(raw).hexdigest()).session(data)


class _Parser:
    def __init__(self, path: Path, text: str, sha: str):
        self.path, self.lines, self.sha = path, text.splitlines(), sha

    # -- error helpers: find the line a key is on, so the message points into the file

    def _track_header_lines(self) -> list[int]:
        return [i for i, ln in enumerate(self.lines) if re.match(r"^\s*\[\[\s*track\s*\]\]", ln)]

    def _line_of(self, key: str, track: int | None = None) -> int | None:
        heads = self._track_header_lines()
        if track is None:
            lo, hi = 0, heads[0] if heads else len(self.lines)
        else:
            if track >= len(heads):
                return None
            lo = heads[track] + 1
            hi = heads[track + 1] if track + 1 < len(heads) else len(self.lines)
        pat = re.compile(rf"^\s*{re.escape(key)}\s*[=.]")
        for i in range(lo, hi):
            if pat.match(self.lines[i]):
                return i + 1
        return heads[track] + 1 if track is not None and track < len(heads) else None

    def error(self, msg: str, key: str | None = None, track: int | None = None,
              name: str | None = None) -> SessionFileError:
        """`key` may be a dotted path (params.top_k, chain[0].room_size); its first part finds the line."""
        line = self._line_of(re.split(r"[.\[]", key)[0], track) if key else None
        where = f"{self.path}" + (f" line {line}" if line else "")
        who = "" if track is None else f"track {track + 1}" + (f" ({name!r})" if name else "") + ": "
        k = f"key '{key}': " if key else ""
        return SessionFileError(f"{where}: {who}{k}{msg}")

    # -- the session

    def session(self, data: Mapping[str, Any]) -> SessionFile:
        for key in data:
            if key not in SESSION_KEYS:
                hint = " (tracks are [[track]] tables)" if key == "tracks" else ""
                raise self.error(f"unknown key; expected one of {', '.join(SESSION_KEYS)}{hint}", key)
        tempo = data.get("tempo")
        if isinstance(tempo, bool) or not isinstance(tempo, (int, float)) or not math.isfinite(tempo) \
                or not MIN_BPM <= tempo <= MAX_BPM:
            raise self.error(f"expected a tempo in bpm between {MIN_BPM:g} and {MAX_BPM:g}, got {tempo!r}",
                             "tempo")
        try:
            sig = TimeSignature.parse(data.get("signature", "4/4"))
        except TempoError as e:
            raise self.error(str(e), "signature") from None
        rate = data.get("sample_rate", 48000)
        if isinstance(rate, bool) or not isinstance(rate, int) or not 8000 <= rate <= 192000:
            raise self.error(f"expected a whole number of Hz between 8000 and 192000, got {rate!r}",
                             "sample_rate")
        fmt = data.get("format", "wav")
        if fmt not in ("wav", "flac"):
            raise self.error(f"expected \"wav\" or \"flac\", got {fmt!r}", "format")
        loop = data.get("loop", False)
        if not isinstance(loop, bool):
            raise self.error(f"expected true or false, got {loop!r}", "loop")
        model = data.get("model")
        if model is not None and (not isinstance(model, str) or not model):
            raise self.error("expected a checkpoint directory or Hugging Face id", "model")
        tracks = data.get("track")
        if not isinstance(tracks, list) or not tracks or not all(isinstance(t, dict) for t in tracks):
            raise self.error("expected at least one [[track]] table", "track" if tracks is not None else None)
        if len(tracks) > MAX_TRACKS:
            raise self.error(f"at most {MAX_TRACKS} tracks, got {len(tracks)}", "track")
        specs = [self.track(i, t, float(tempo), loop) for i, t in enumerate(tracks)]
        seen: set[str] = set()
        for i, s in enumerate(specs):
            if s.name in seen:
                raise self.error(f"track name {s.name!r} is used twice; names must be unique", "name", i, s.name)
            seen.add(s.name)
        return SessionFile(self.path.resolve(), self.sha, float(tempo), sig, rate, fmt, loop, model, tuple(specs))

    def track(self, i: int, t: Mapping[str, Any], tempo: float, session_loop: bool) -> FileTrack:
        name = t.get("name")
        err = lambda msg, key: self.error(msg, key, i, name if isinstance(name, str) else None)  # noqa: E731
        for key in t:
            if key not in TRACK_KEYS:
                raise err(f"unknown key; expected one of {', '.join(TRACK_KEYS)}", key)
        if not R.is_name(name, R.MAX_TRACK_NAME):  # the one name rule: OSC, session.json and this file
            raise err(f"expected a name of 1-{R.MAX_TRACK_NAME} letters, digits, '_' or '-', got {name!r:.60}",
                      "name")

        preset = None
        if "preset" in t:
            if not isinstance(t["preset"], str) or not t["preset"]:
                raise err("expected a preset name (see `musicbridge presets`)", "preset")
            pname = t["preset"]
            if pname.endswith(".toml") and not Path(pname).is_absolute():
                pname = str(self.path.parent / pname)
            try:
                preset = load_preset(pname)
            except PresetError as e:
                raise err(str(e), "preset") from None
        prompt = t.get("prompt", preset.prompt if preset else None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise err("expected a text description of the music (or a preset)", "prompt")
        add_bpm = preset.add_bpm if preset else True

        bars, seconds = t.get("bars"), t.get("seconds")
        if (bars is None) == (seconds is None):
            raise err("expected exactly one of bars or seconds", "bars")
        if bars is not None and (isinstance(bars, bool) or not isinstance(bars, (int, float))
                                 or not math.isfinite(bars) or bars <= 0):
            raise err(f"expected a positive number of bars, got {bars!r}", "bars")
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not math.isfinite(seconds) or not 0 < seconds <= MAX_REQUEST_SECONDS):
            raise err(f"expected a number of seconds in (0, {MAX_REQUEST_SECONDS:g}], got {seconds!r}", "seconds")

        start_bar = t.get("start_bar", 1)
        if isinstance(start_bar, bool) or not isinstance(start_bar, (int, float)) \
                or not math.isfinite(start_bar) or start_bar < 1:
            raise err(f"expected a bar number >= 1, got {start_bar!r}", "start_bar")
        seed = t.get("seed")
        if seed is not None:
            try:
                seed = R.param("seed", seed)  # model.types' seed range, as over OSC
            except R.RuleError as e:
                raise err(e.message, "seed") from None
        loop = t.get("loop", session_loop)
        if not isinstance(loop, bool):
            raise err(f"expected true or false, got {loop!r}", "loop")
        if loop and bars is None:
            raise err("a loop needs a length in bars (it is cut on the bar grid)", "loop")

        melody = None
        if "melody" in t:
            m = t["melody"]
            if not isinstance(m, str) or not m:
                raise err("expected the path of a .mid, .wav, .flac or chroma .npy file", "melody")
            melody = Path(m).expanduser()
            if not melody.is_absolute():
                melody = self.path.parent / melody
            if not melody.is_file():
                raise err(f"melody file {melody} does not exist", "melody")
            melody = melody.resolve()
        melody_track = t.get("melody_track")
        if melody_track is not None:
            if melody is None:
                raise err("melody_track needs a melody file", "melody_track")
            if isinstance(melody_track, bool) or not isinstance(melody_track, (str, int)):
                raise err(f"expected a MIDI track name or index, got {melody_track!r}", "melody_track")

        params = dict(preset.params) if preset else {}
        if "params" in t:
            try:
                params.update(check_params(t["params"], "params"))
            except PresetError as e:
                m = re.match(r"params: key '([^']+)': (.*)", str(e), re.S)
                raise (err(m.group(2), m.group(1)) if m else err(str(e), "params")) from None
        if seed is not None:
            params["seed"] = seed
        elif "seed" in params:
            seed = params["seed"]

        chain = [dict(c) for c in preset.chain] if preset else []
        if "chain" in t:
            chain = t["chain"]
            if not isinstance(chain, list) or not all(isinstance(c, dict) for c in chain):
                raise err("expected an array of plugin tables like [{plugin = \"Reverb\"}]", "chain")

            try:
                build_chain(chain, where="chain")
            except ChainError as e:
                m = re.match(r"(chain[^:\s]*): (.*)", str(e), re.S)
                raise (err(m.group(2), m.group(1)) if m else err(str(e), "chain")) from None
        return FileTrack(name=name, prompt=prompt.strip(), add_bpm=add_bpm, params=params,
                         chain=tuple(dict(c) for c in chain), bars=None if bars is None else float(bars),
                         seconds=None if seconds is None else float(seconds),
                         start_bar=float(start_bar), seed=seed, melody=melody,
                         melody_track=melody_track, loop=loop, preset=preset)
