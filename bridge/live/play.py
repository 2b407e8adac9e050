"""`/track/<name>/play`: generate a part like /generate and hear it while it is generated.

Why its own path: a part someone is listening to is live work. It does not wait in the offline
queue behind renders; it runs at once on its own thread, its decoder steps ahead of offline
ones (engine.stream(live=True), model/decode/scheduler.py), and its audio is streamed through the
track's chain into the live output as it decodes (plugin_host.live.TrackPlayer), starting on
the first bar line of the grid it can make. When the part is complete its audio (what was
heard, before the chain) goes through the stem pipeline like any /generate job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from model.types import Cancelled
from plugin_host.live import TrackPlayer

MARGIN_SECONDS = 0.05  # beyond the device latency: room for a block or two


def play_while_generating(engine, output, grid: Callable, job, request, chain=None,
                          progress: Callable[[float], None] | None = None) -> np.ndarray | None:
    """Stream `request` into a new output track while generating; the whole audio, or None if cancelled."""

    name = f"{job.plan.name}-play{job.id}"
    track = None
    parts: list[np.ndarray] = []
    player = None
    try:
        for chunk in engine.stream(request, chunk_seconds=0.5, first_chunk_seconds=0.2, live=True):
            if job.cancel.is_set():
                break
            if chunk.frames == 0:
                continue
            if track is None:  # the first audio is here: start on the next bar line it can make
                earliest = output.position / output.samplerate + output.device_latency + MARGIN_SECONDS
                start = grid().next_bar_time(earliest)
                track = output.add_track(name, engine.channels, buffer_seconds=max(4.0, request.seconds + 1.0),
                                         start_frame=int(round(start * output.samplerate)))
                player = TrackPlayer(track, engine.sample_rate, chain)
            parts.append(chunk.audio)
            player.feed(chunk.audio)
            if progress is not None:
                progress(min(1.0, (chunk.start + chunk.frames) / max(1, engine.samples_for(request.seconds))))
    except Cancelled:
        parts = []
    finally:
        if player is not None:
            player.finish()
    if job.cancel.is_set() or not parts:
        if track is not None:
            output.remove_track(name)
        return None
    audio = np.concatenate(parts, axis=1)

    def release() -> None:  # free the output slot once the part has played out
        while not track.done:
            time.sleep(0.1)
        output.remove_track(name)


    threading.Thread(target=release, name=f"release-{name}", daemon=True).start()
    return audio
