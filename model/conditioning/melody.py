"""Melodies from MIDI files, note lists and recorded takes, as the model's conditioning chroma.

From MIDI the chroma comes straight from the notes, with no audio round trip: each frame takes
the pitch class of the highest note sounding at the frame's centre, and a frame where nothing
sounds is all zeros (the model's "no melody"). Times follow the file's tempo map. From audio it is
the model's own extractor (`model.conditioning.chroma`). Everything is aligned to time zero of the request and
sampled at the model's chroma frame rate (32000 / 4096 = 7.8125 frames a second).

Melodies are expanded one window of frames at a time (`NoteMelody`, `ChromaMelody`): a job or a
jam's chunk asks for the frames it plays over, and the work is bounded by that window and the
notes overlapping it, never by the melody's declared length (a note may end at 10^6 s, a chroma
may be given at 0.001 frames a second). A whole expansion is the window [0, frames).
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from pathlib import Path

import mido
import numpy as np

from audiofile import READABLE, AudioFileError, read_audio
from model.conditioning import chroma as ch


class MelodyError(ValueError):
    """A melody source that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Note:
    pitch: int
    start: float  # seconds
    end: float  # seconds


def _tempo_map(mid) -> list[tuple[int, int]]:
    """(tick, microseconds per beat) changes, from every track (type 1 files keep them in track 0)."""
    changes = [(0, 500000)]
    for track in mid.tracks:
        tick = 0
        for msg in track:
            tick += msg.time
            if msg.type == "set_tempo":
                changes.append((tick, msg.tempo))
    changes.sort(key=lambda c: c[0])
    return changes


class _TickClock:
    """Ticks to seconds through a tempo map, O(log changes) a lookup: a file with many tempo
    changes and many notes must not cost their product. The seconds at each change are summed
    once, in the same order a walk from tick 0 sums them, so every lookup gives the same float."""

    def __init__(self, tempo_map: list[tuple[int, int]], ticks_per_beat: int):
        self.tpb = ticks_per_beat
        self.ticks = [at for at, _ in tempo_map[1:]]
        self.tempos = [tempo_map[0][1]] + [t for _, t in tempo_map[1:]]  # tempo in force after change i
        self.last = [0]  # tick of the change in force
        self.seconds = [0.0]
        seconds, last_tick, tempo = 0.0, 0, tempo_map[0][1]
        for at, new_tempo in tempo_map[1:]:
            seconds += (at - last_tick) * tempo / 1e6 / ticks_per_beat
            last_tick, tempo = at, new_tempo
            self.last.append(last_tick)
            self.seconds.append(seconds)

    def __call__(self, tick: int) -> float:
        i = bisect_left(self.ticks, tick)  # changes strictly before `tick` are in force
        return self.seconds[i] + (tick - self.last[i]) * self.tempos[i] / 1e6 / self.tpb


def midi_notes(path: str | os.PathLike, track: str | int | None = None) -> list[Note]:
    """Notes of one track of a .mid file, in seconds (default: the first track with notes)."""

    p = Path(path)
    if not p.is_file():
        raise MelodyError(f"MIDI file {p} does not exist")
    try:
        mid = mido.MidiFile(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a MIDI file we can read"
        raise MelodyError(f"{p} is not a readable MIDI file ({e})") from e
    if not mid.tracks:
        raise MelodyError(f"MIDI file {p} has no tracks")
    seconds_at = _TickClock(_tempo_map(mid), mid.ticks_per_beat)
    per_track: list[tuple[str, list[Note]]] = []
    for t in mid.tracks:
        tick, open_notes, notes = 0, {}, []
        for msg in t:
            tick += msg.time
            if msg.type == "note_on" and msg.velocity > 0:
                open_notes.setdefault((msg.channel, msg.note), tick)
            elif msg.type in ("note_off", "note_on"):
                start = open_notes.pop((msg.channel, msg.note), None)
                if start is not None and tick > start:
                    notes.append(Note(msg.note, seconds_at(start), seconds_at(tick)))
        per_track.append((t.name or "", notes))
    names = [f"{i}:{name!r}" for i, (name, _) in enumerate(per_track)]
    if track is None:
        for _, notes in per_track:
            if notes:
                return notes
        raise MelodyError(f"MIDI file {p} has no notes")
    if isinstance(track, str) and track.isdigit():
        track = int(track)
    if isinstance(track, int):
        if not 0 <= track < len(per_track):
            raise MelodyError(f"MIDI file {p} has no track {track}; its tracks are {', '.join(names)}")
        chosen = per_track[track]
    else:
        matches = [t for t in per_track if t[0] == track]
        if not matches:
            raise MelodyError(f"MIDI file {p} has no track named {track!r}; its tracks are {', '.join(names)}")
        chosen = matches[0]
    if not chosen[1]:
        raise MelodyError(f"track {track!r} of MIDI file {p} has no notes")
    return chosen[1]


def _as_notes(notes) -> list[Note]:
    ns = [n if isinstance(n, Note) else Note(int(n[0]), float(n[1]), float(n[1]) + float(n[2]))
          for n in notes]
    for n in ns:
        if not (0 <= n.pitch <= 127 and np.isfinite(n.start) and np.isfinite(n.end) and n.end > n.start >= 0):
            raise MelodyError(f"bad note {n}: expected pitch 0-127 and 0 <= start < end (seconds)")
    return ns


def _frames_of(seconds: float, frame_rate: float) -> int:
    return max(1, int(round(seconds * frame_rate)))


class NoteMelody:
    """Notes sorted once by start, expanded to chroma a window of frames at a time.

    Frame i (from time zero) takes the pitch class of the highest note sounding at its centre
    (i + 0.5) / rate, zeros where none sounds. A window touches only the notes overlapping it:
    those starting inside it come from a bisection of the sorted starts, those starting before
    it and still sounding from a max-end tree over the same order (O(log n) per note found), and
    each note writes only the frames it covers inside the window. Immutable once built, so any
    thread may read it.
    """

    def __init__(self, notes):
        ns = sorted(_as_notes(notes), key=lambda n: n.start)
        self.starts = [n.start for n in ns]
        self.ends = [n.end for n in ns]
        self.pitches = [n.pitch for n in ns]
        self.end = max(self.ends, default=0.0)  # seconds: where the last note stops
        leaves = 1
        while leaves < len(ns):
            leaves *= 2
        tree = [-np.inf] * (2 * leaves)  # node -> the latest end among its notes
        tree[leaves:leaves + len(ns)] = self.ends
        for node in range(leaves - 1, 0, -1):
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
        self._leaves, self._tree = leaves, tree
        self.notes_touched = 0  # notes visited by window() so far (a diagnostic count; bounds are tested on it)

    def __len__(self) -> int:
        return len(self.starts)

    def frames(self, frame_rate: float) -> int:
        """The whole melody's length in frames (at least one)."""
        return _frames_of(self.end, frame_rate)

    def _sounding_at(self, t: float, before: int) -> list[int]:
        """Indices i < before (notes starting before t) whose note still sounds at t (end > t)."""
        found, tree, leaves = [], self._tree, self._leaves
        stack = [(1, 0, leaves)]
        while stack:
            node, lo, hi = stack.pop()
            if lo >= before or tree[node] <= t:
                continue
            if node >= leaves:
                found.append(lo)
                continue
            mid = (lo + hi) // 2
            stack.append((2 * node + 1, mid, hi))
            stack.append((2 * node, lo, mid))
        return found

    def overlapping(self, f0: int, f1: int, frame_rate: float) -> list[int]:
        """Indices (in start order) of the notes that can sound at a frame centre in [f0, f1)."""
        if f1 <= f0 or not self.starts:
            return []
        first, last = (f0 + 0.5) / frame_rate, (f1 - 1 + 0.5) / frame_rate
        lo, hi = bisect_left(self.starts, first), bisect_right(self.starts, last)
        return self._sounding_at(first, lo) + list(range(lo, hi))

    def window(self, frame_rate: float, f0: int, f1: int) -> np.ndarray:
        """(f1 - f0, 12): frames [f0, f1) of the melody's chroma; past its last note, zeros."""
        n = max(0, int(f1) - int(f0))
        out = np.zeros((n, 12), dtype=np.float32)
        if n == 0:
            return out
        # the same centres, bit for bit, as a whole expansion's centres[f0:f1]
        centres = (np.arange(f0, f1) + 0.5) / frame_rate
        top = np.full(n, -1, dtype=np.int64)
        touched = self.overlapping(f0, f1, frame_rate)
        self.notes_touched += len(touched)
        for i in touched:
            a = int(np.searchsorted(centres, self.starts[i], "left"))  # first centre >= start
            b = int(np.searchsorted(centres, self.ends[i], "left"))  # first centre >= end
            if a < b:
                np.maximum(top[a:b], self.pitches[i], out=top[a:b])
        voiced = top >= 0
        out[np.nonzero(voiced)[0], top[voiced] % 12] = 1.0
        return out


class ChromaMelody:
    """A chroma given at its own frame rate, resampled (nearest frame) only over the window asked
    for: a chroma at 0.001 frames a second is a handful of rows, never its length at the model's
    rate. Frame i at `rate` is source frame floor(i * src_rate / rate); past the end, zeros."""

    def __init__(self, chroma: np.ndarray, frame_rate: float):
        c = np.asarray(chroma, dtype=np.float32)
        if c.ndim != 2 or c.shape[1] != 12 or c.shape[0] == 0:
            raise MelodyError(f"a chroma must have shape (frames, 12), got {c.shape}")
        if not (np.isfinite(frame_rate) and frame_rate > 0):
            raise MelodyError(f"a chroma's frame rate must be a positive number, got {frame_rate}")
        self.chroma, self.frame_rate = c, float(frame_rate)

    def frames(self, frame_rate: float) -> int:
        return _frames_of(len(self.chroma) / self.frame_rate, frame_rate)

    def window(self, frame_rate: float, f0: int, f1: int) -> np.ndarray:
        n = max(0, int(f1) - int(f0))
        idx = np.floor(np.arange(f0, f0 + n) * self.frame_rate / frame_rate + 1e-9).astype(np.int64)
        out = np.zeros((n, 12), dtype=np.float32)
        ok = idx < len(self.chroma)
        out[ok] = self.chroma[idx[ok]]
        return out


def notes_to_chroma(notes, frame_rate: float, seconds: float | None = None) -> np.ndarray:
    """(frames, 12) one-hot of the highest note sounding at each frame's centre; zeros where none.

    notes: Note objects or (pitch, start_seconds, length_seconds) tuples. seconds: how long
    (None: to the last note's end); only those frames are computed.
    """
    m = NoteMelody(notes)
    return m.window(frame_rate, 0, m.frames(frame_rate) if seconds is None else _frames_of(seconds, frame_rate))


def beats_to_seconds(notes, tempo: float) -> list[Note]:
    """Notes given as (pitch, start_beat, length_beats) at `tempo` quarter notes a minute."""
    if not (np.isfinite(tempo) and tempo > 0):
        raise MelodyError(f"tempo must be a positive number of beats a minute, got {tempo}")
    k = 60.0 / tempo
    return [Note(int(p), float(s) * k, (float(s) + float(n)) * k) for p, s, n in notes]


def _fit(chroma: np.ndarray, frame_rate: float, seconds: float | None) -> np.ndarray:
    if seconds is None:
        return chroma
    n = max(1, int(round(seconds * frame_rate)))
    if chroma.shape[0] >= n:
        return chroma[:n]
    return np.concatenate([chroma, np.zeros((n - chroma.shape[0], 12), np.float32)])


def load_melody(path: str | os.PathLike, chroma_frame_rate: float, seconds: float | None = None,
                track: str | int | None = None) -> np.ndarray:
    """The conditioning chroma (frames, 12) of a .mid/.midi, .wav/.flac/... or chroma .npy file."""
    p = Path(path)
    ext = p.suffix.lower()
    if not p.exists():
        raise MelodyError(f"melody file {p} does not exist")
    if ext in (".mid", ".midi"):
        # only the frames asked for: a note ending at 10^6 s does not make a 10^6 s chroma
        m = NoteMelody(midi_notes(p, track))
        whole = m.frames(chroma_frame_rate)
        chroma = m.window(chroma_frame_rate, 0, whole if seconds is None
                          else min(whole, _frames_of(seconds, chroma_frame_rate)))
    elif ext == ".npy":
        try:
            chroma = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise MelodyError(f"{p} is not a readable .npy array ({e})") from e
        if chroma.ndim != 2 or chroma.shape[1] != 12 or chroma.shape[0] == 0:
            raise MelodyError(f"{p}: a chroma must have shape (frames, 12), got {chroma.shape}")
        if not np.isfinite(chroma).all():
            raise MelodyError(f"{p}: the chroma contains NaN or infinity")
        chroma = chroma.astype(np.float32)
    else:
        if ext not in READABLE:
            raise MelodyError(f"{p}: expected a .mid, .npy or audio file ({', '.join(READABLE)})")
        try:
            audio, rate = read_audio(p)
        except AudioFileError as e:
            raise MelodyError(str(e)) from e
        chroma = audio_to_chroma(audio, rate, chroma_frame_rate)
    return _fit(chroma, chroma_frame_rate, seconds)


def audio_to_chroma(audio: np.ndarray, sample_rate: int, chroma_frame_rate: float) -> np.ndarray:
    """The conditioning chroma (frames, 12) of audio (channels, samples) at `chroma_frame_rate`: the
    model's own extractor, so generated audio can be scored against what conditioned it."""

    chroma = ch.audio_chroma(audio, sample_rate)
    if abs(chroma_frame_rate - ch.FRAME_RATE) > 1e-9:
        idx = np.minimum((np.arange(int(round(len(chroma) * chroma_frame_rate / ch.FRAME_RATE)))
                          * ch.FRAME_RATE / chroma_frame_rate).astype(int), len(chroma) - 1)
        chroma = chroma[idx]
    return chroma


def chroma_cosine_similarity(reference: np.ndarray, generated: np.ndarray) -> float:
    """MusicGen's melody metric: mean cosine similarity of per-frame quantised chroma.

    Both (frames, 12); compared over the shorter length. Frames where either side is all zeros
    count as 0 (nothing in common), so silence cannot inflate the score.
    """
    n = min(len(reference), len(generated))
    if n == 0:
        raise MelodyError("cannot score an empty chroma")
    a, b = one_hot_rows(reference[:n]), one_hot_rows(generated[:n])
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    denom = na * nb
    sims = np.where(denom > 0, (a * b).sum(axis=1) / np.where(denom > 0, denom, 1.0), 0.0)
    return float(sims.mean())


def one_hot_rows(chroma: np.ndarray) -> np.ndarray:
    """Quantise each non-silent frame to its argmax bin; silent frames stay zero."""
    c = np.asarray(chroma, dtype=np.float32)
    out = np.zeros_like(c)
    voiced = c.max(axis=1) > 0
    out[np.nonzero(voiced)[0], c[voiced].argmax(axis=1)] = 1.0
    return out
