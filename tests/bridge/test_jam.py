"""Jam mode on a real JACK server: bar-grid scheduling, continuation, stop on the bar, behind-real-time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.jack_server import jack_server
from tests.plugin_host.jack_capture import capture

SR = 48000
TEMPO = 240.0  # 4/4: one bar = 1 s = 48000 frames, one beat = 0.25 s


@pytest.fixture(scope="module")
def jack():
    with jack_server(rate=SR, period=256) as name:
        yield name


def _until(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_chunks_play_back_to_back_from_a_bar_line_and_stop_fades_to_the_next_bar(jack, tiny_engine):
    from bridge.live.jam import Jam
    from plugin_host.output import AudioOutput

    statuses = []
    with capture(12.0) as cap, AudioOutput(samplerate=SR) as out:
        cap.connect()
        with Jam(tiny_engine, out, "keys", "electric piano", tempo=TEMPO, chunk_bars=1,
                 context_seconds=1.0, on_status=statuses.append) as jam:
            jam.start()
            _until(lambda: len(jam.history) >= 4)
            end = jam.stop()
            assert jam.wait(10)
            status = jam.status()
            stats = out.stats()
    hist = jam.history
    bar = 48000
    start = hist[0]["start_frame"]
    assert (start - jam.origin_frame) % bar == 0  # the part starts on a bar line
    assert [h["start_frame"] - start for h in hist] == [k * bar for k in range(len(hist))]  # back to back
    # one token stream: a text-only jam prefills once (the window is 30 s), never per chunk
    assert [h["prefills"] for h in hist] == [1] * len(hist)
    assert not any(h["reprefilled"] for h in hist)
    assert (end - jam.origin_frame) % bar == 0 and end > start
    assert status["state"] == "stopped" and status["behind"] is False and status["underruns"] == 0
    assert stats["tracks"]["keys"]["underruns"] == 0
    assert [s["state"] for s in statuses][:1] == ["playing"] and statuses[-1]["state"] == "stopping"
    # The callback played exactly from the first bar line to the stop bar line ...
    assert jam._track.played_frames == end - start
    # ... and the recording ends in a fade, not a cut. (Its length is not compared: on this loaded
    # build machine a non-realtime JACK server may drop a period; docs/live.md has the numbers.)
    rec = cap.audio[0]
    nz = np.nonzero(rec)[0]
    assert cap.frames > 0 and len(nz)
    body = rec[nz[0]:nz[-1] + 1]
    tail = body[-int(0.01 * SR):]  # last 10 ms: the linear one-beat fade is below 4 % there
    assert np.abs(tail).max() <= 0.04 * np.abs(body).max()


def test_falling_behind_is_reported_and_degrades_on_the_grid(jack, tiny_engine):
    from bridge.live.jam import Jam
    from plugin_host.output import AudioOutput

    # The real tiny engine, made slower than real time: each decoder step waits 30 ms (50 steps
    # make one second of audio, so a second takes 1.5 s).
    statuses = []
    tiny_engine.step_hook = lambda: time.sleep(0.03)
    try:
        with AudioOutput(samplerate=SR) as out:
            with Jam(tiny_engine, out, "slow", "drums", tempo=TEMPO, chunk_bars=1,
                     context_seconds=2.0, min_context_seconds=0.5, on_status=statuses.append) as jam:
                jam.start()
                _until(lambda: len(jam.history) >= 4, timeout=40)
                status = jam.status()
                jam.close()
    finally:
        tiny_engine.step_hook = None
    assert status["behind"] is True and status["behind_events"] >= 3
    assert status["realtime_factor"] < 1.0
    assert any(s["behind"] for s in statuses)  # told through the callback, for the OSC reply
    assert status["context_seconds"] == 0.5  # degraded on purpose: 2.0 -> 1.0 -> 0.5
    anchors = [a for h in jam.history for a in h["anchors"]]
    assert anchors and any(h["late"] for h in jam.history)  # late pieces were moved ...
    assert all((a - jam.origin_frame) % 48000 == 0 for a in anchors)  # ... onto bar lines


def test_bad_jams_are_refused_with_a_reason(jack, tiny_engine):
    from bridge.live.jam import Jam, JamError
    from plugin_host.output import AudioOutput

    class Silent:
        def chroma(self, start_s, seconds, frame_rate):
            return np.zeros((int(seconds * frame_rate), 12), np.float32)

    out = AudioOutput(samplerate=SR)
    with pytest.raises(JamError, match="text-only"):
        Jam(tiny_engine, out, "x", "p", melody=Silent())
    with pytest.raises(JamError, match="tempo"):
        Jam(tiny_engine, out, "x", "p", tempo=0.0)
    with pytest.raises(JamError, match="chunk_bars"):
        Jam(tiny_engine, out, "x", "p", chunk_bars=0)
    with pytest.raises(JamError, match="time signature"):
        Jam(tiny_engine, out, "x", "p", denominator=3)


class _HeldNote:
    """A player holding one note at a time: the chroma of any stretch is that note's pitch class.
    The time it changed is kept on the jam's clock (the output's) so the test can place it among
    the chunks."""

    live = True

    def __init__(self, pitch_class: int, clock=time.monotonic):
        self.pc = pitch_class
        self.clock = clock
        self.changed_at = None

    def play(self, pitch_class: int) -> None:
        self.changed_at = self.clock()
        self.pc = pitch_class

    def chroma(self, start_s, seconds, frame_rate):
        c = np.zeros((max(1, int(round(seconds * frame_rate))), 12), np.float32)
        c[:, self.pc] = 1.0
        return c


def _jam_across_a_change(engine, make_player, change):
    """A melody jam of one-bar chunks: `change(player)` once two chunks are made, then three more.
    The player's clock is the output's, as the jam's is; returns (jam, player)."""
    from bridge.live.jam import Jam
    from plugin_host.output import AudioOutput

    with AudioOutput(samplerate=SR) as out:
        player = make_player(lambda: out.position / SR)
        with Jam(engine, out, "lead", "sax", melody=player, tempo=TEMPO, chunk_bars=1,
                 context_seconds=1.0) as jam:
            jam.start()
            _until(lambda: len(jam.history) >= 2)
            change(player)
            n = len(jam.history)
            _until(lambda: len(jam.history) >= n + 3)
            jam.close()
    return jam, player


def test_conditioning_follows_a_melody_change_within_one_chunk(jack, tiny_melody_engine):
    jam, player = _jam_across_a_change(tiny_melody_engine, lambda clock: _HeldNote(0, clock),  # C
                                       lambda p: p.play(7))  # G
    hist = jam.history
    before = [h for h in hist if h["conditioned_at"] < player.changed_at]
    after = [h for h in hist if h["conditioned_at"] >= player.changed_at]
    assert before and all(set(h["melody_bins"]) == {0} for h in before)
    assert after and all(set(h["melody_bins"]) == {7} for h in after)
    # the first chunk conditioned after the change is at most one chunk after the last one before it
    assert after[0]["index"] == before[-1]["index"] + 1
    assert after[0]["start_frame"] - before[-1]["start_frame"] == 48000  # one chunk (1 bar) later
    assert all(h["chroma"].shape[0] in (7, 8) and h["chroma"].shape[1] == 12 for h in hist)  # one bar each
    # the latency is measured on the first chunk conditioned after the change, and kept in the status
    assert after[0]["note_latency"] is not None and after[0]["note_latency"] > 0
    assert jam.status()["note_latency"] == after[0]["note_latency"]


class _ChangesWhileRead(_HeldNote):
    """A player who plays the next note just after the jam has read the chroma: the change lands
    while the chunk conditioned on the previous one is being made (as on a machine whose chunks
    take longer than the player's notes last)."""

    def __init__(self, pitch_class: int, clock=time.monotonic):
        super().__init__(pitch_class, clock)
        self.after_read: int | None = None

    def chroma(self, start_s, seconds, frame_rate):
        c = super().chroma(start_s, seconds, frame_rate)
        if self.after_read is not None:
            nxt, self.after_read = self.after_read, None
            self.play(nxt)
        return c


def test_a_change_during_a_chunk_keeps_the_latency_of_the_change_it_follows(jack, tiny_melody_engine):
    """The chunk conditioned on G reports G's note-to-audio latency although the player moved on
    to A while it was made."""
    played = []

    def g_then_a(player: _ChangesWhileRead) -> None:
        player.play(7)  # G, read by the next chunk ...
        played.append(player.changed_at)
        player.after_read = 9  # ... which hears A arrive while it is made

    jam, _ = _jam_across_a_change(tiny_melody_engine, lambda clock: _ChangesWhileRead(0, clock), g_then_a)  # C
    played_g = played[0]
    g = [h for h in jam.history if set(h["melody_bins"]) == {7}]
    a = [h for h in jam.history if set(h["melody_bins"]) == {9}]
    assert g and a and g[0]["index"] < a[0]["index"]
    assert g[0]["conditioned_at"] >= played_g and g[0]["note_latency"] is not None
    # G waited for the read, then for frames made after it, which play after the read
    assert g[0]["note_latency"] > g[0]["conditioned_at"] - played_g >= 0
    assert a[0]["note_latency"] is not None and a[0]["note_latency"] > 0  # A's own chunk reports A's


class _JackMidiHeldNote(_HeldNote):
    """The held note comes from a real JACK MIDI input port (python-rtmidi's JACK API via mido).

    A stand-in for bridge.live.notes.LiveMelody (helper A), kept to the one thing this test needs:
    the pitch class of the last note-on, stamped on arrival."""

    def __init__(self, clock):
        import mido

        super().__init__(0, clock)
        self.backend = mido.Backend("mido.backends.rtmidi/UNIX_JACK")
        self.port = self.backend.open_input("jam-in", virtual=True, callback=self._on)

    def _on(self, msg) -> None:
        if msg.type == "note_on" and msg.velocity > 0:
            self.play(msg.note % 12)


def test_a_jam_driven_by_jack_midi_notes_follows_within_one_chunk(jack, tiny_melody_engine):
    import mido

    from bridge.live.jam import Jam
    from plugin_host.output import AudioOutput

    clock_out = []
    source = _JackMidiHeldNote(lambda: clock_out[0].position / SR if clock_out else -1.0)
    names = [n for n in source.backend.get_output_names() if "jam-in" in n]
    assert names, source.backend.get_output_names()
    keys = source.backend.open_output(names[0])
    try:
        keys.send(mido.Message("note_on", note=60, velocity=100))  # C4
        _until(lambda: source.changed_at is not None)
        first_change = source.changed_at
        with AudioOutput(samplerate=SR) as out:
            clock_out.append(out)
            with Jam(tiny_melody_engine, out, "lead", "sax", melody=source, tempo=TEMPO, chunk_bars=1,
                     context_seconds=1.0) as jam:
                jam.start()
                _until(lambda: len(jam.history) >= 2)
                keys.send(mido.Message("note_off", note=60))
                keys.send(mido.Message("note_on", note=67, velocity=100))  # G4
                _until(lambda: source.changed_at != first_change and source.pc == 7)
                n = len(jam.history)
                _until(lambda: len(jam.history) >= n + 3)
                jam.close()
    finally:
        keys.close()
        source.port.close()
    hist = jam.history
    before = [h for h in hist if h["conditioned_at"] < source.changed_at]
    after = [h for h in hist if h["conditioned_at"] >= source.changed_at]
    assert before and all(set(h["melody_bins"]) == {0} for h in before)
    assert after and all(set(h["melody_bins"]) == {7} for h in after)
    assert after[0]["index"] == before[-1]["index"] + 1  # the very next chunk follows the new note
