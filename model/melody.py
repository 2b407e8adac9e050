"""Melodies from MIDI files, note lists and recorded takes, as the model's conditioning chroma.

From MIDI the chroma comes straight from the notes, with no audio round trip: each frame takes
the pitch class of the highest note sounding at the frame's centre, and a frame where nothing
sounds is all zeros (the model's "no melody"). Times follow the file's tempo map. From audio it is
the model's own extractor (`model.chroma`). Everything is aligned to time zero of the request and
sampled at the model's chroma frame rate (32000 / 4096 = 7.8125 frames a second).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


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


def _tick_to_seconds(tick: int, tempo_map: list[tuple[int, int]], ticks_per_beat: int) -> float:
    seconds, last_tick, tempo = 0.0, 0, tempo_map[0][1]
    for at, new_tempo in tempo_map[1:]:
        if at >= tick:
            break
        seconds += (at - last_tick) * tempo / 1e6 / ticks_per_beat
        last_tick, tempo = at, new_tempo
    return seconds + (tick - last_tick) * tempo / 1e6 / ticks_per_beat


def midi_notes(path: str | os.PathLike, track: str | int | None = None) -> list[Note]:
    """Notes of one track of a .mid file, in seconds (default: the first track with notes)."""
    import mido

    p = Path(path)
    if not p.is_file():
        raise MelodyError(f"MIDI file {p} does not exist")
    try:
        mid = mido.MidiFile(str(p))
    except Exception as e:  # noqa: BLE001 - any parse failure means "not a MIDI file we can read"
        raise MelodyError(f"{p} is not a readable MIDI file ({e})") from e
    if not mid.tracks:
        raise MelodyError(f"MIDI file {p} has no tracks")
    tmap = _tempo_map(mid)
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
                    notes.append(Note(msg.note, _tick_to_seconds(start, tmap, mid.ticks_per_beat),
                                      _tick_to_seconds(tick, tmap, mid.ticks_per_beat)))
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


def notes_to_chroma(notes, frame_rate: float, seconds: float | None = None) -> np.ndarray:
    """(frames, 12) one-hot of the highest note sounding at each frame's centre; zeros where none.

    notes: Note objects or (pitch, start_seconds, length_seconds) tuples.
    """
    ns = [n if isinstance(n, Note) else Note(int(n[0]), float(n[1]), float(n[1]) + float(n[2]))
          for n in notes]
    for n in ns:
        if not (0 <= n.pitch <= 127 and np.isfinite(n.start) and np.isfinite(n.end) and n.end > n.start >= 0):
            raise MelodyError(f"bad note {n}: expected pitch 0-127 and 0 <= start < end (seconds)")
    if seconds is None:
        seconds = max((n.end for n in ns), default=0.0)
    frames = max(1, int(round(seconds * frame_rate)))
    centres = (np.arange(frames) + 0.5) / frame_rate
    top = np.full(frames, -1, dtype=np.int64)
    for n in ns:
        on = (centres >= n.start) & (centres < n.end)
        top[on] = np.maximum(top[on], n.pitch)
    out = np.zeros((frames, 12), dtype=np.float32)
    voiced = top >= 0
    out[np.nonzero(voiced)[0], top[voiced] % 12] = 1.0
    return out


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
        chroma = notes_to_chroma(midi_notes(p, track), chroma_frame_rate)
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
        from model import chroma as ch
        from audiofile import READABLE, AudioFileError, read_audio

        if ext not in READABLE:
            raise MelodyError(f"{p}: expected a .mid, .npy or audio file ({', '.join(READABLE)})")
        try:
            audio, rate = read_audio(p)
        except AudioFileError as e:
            raise MelodyError(str(e)) from e
        chroma = ch.audio_chroma(audio, rate)
        if abs(chroma_frame_rate - ch.FRAME_RATE) > 1e-9:
            idx = np.minimum((np.arange(int(round(len(chroma) * chroma_frame_rate / ch.FRAME_RATE)))
                              * ch.FRAME_RATE / chroma_frame_rate).astype(int), len(chroma) - 1)
            chroma = chroma[idx]
    return _fit(chroma, chroma_frame_rate, seconds)


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
