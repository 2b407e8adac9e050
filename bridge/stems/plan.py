"""Planning a stem: what to ask the engine for, and how to fit the answer to the bar grid.

The one planner for every stem, whoever asks: an OSC job (bridge.stems.jobs) and a session render
(bridge.stems.render) both describe their track here and get a StemPlan back. A plan is plain JSON
data (a request record and a render record), so the sidecar written beside the stem can repeat
the same engine call later (`musicbridge render --from-sidecar`).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from model.types import MAX_REQUEST_SECONDS, SamplingParams
from plugin_host.tempo import (STRETCH_LIMIT, TimeSignature, bars_to_samples, bars_to_seconds,
                               loop_crossfade_samples)
from presets import fmt_bpm, prompt_with_bpm

GEN_MARGIN_SECONDS = 0.1  # generated past the needed length, so trimming never pads


class PlanError(ValueError):
    """A stem that cannot be planned as asked; `key` names what is wrong (bars, seconds, params)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass
class StemPlan:
    """Everything needed to make one stem of a track.

    request: the engine request record (prompt, seconds, params, melody, continuation), plain
        JSON; bridge.stems.request.build_request turns it into a GenerationRequest.
    render: what happens to the model's audio: grid fit, chain, loop, rate, exact length, format
        and the time reference (start_seconds).
    context: where the stem came from, for the sidecar (preset, session file or OSC job).
    """

    name: str
    request: dict[str, Any]
    render: dict[str, Any]
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """The stem's length in seconds (the musical length, not what the engine generates)."""
        return float(self.render["seconds"])

    @property
    def start_seconds(self) -> float:
        return float(self.render["start_seconds"])

    @property
    def length_text(self) -> str:
        r = self.render
        if r["bars"] is None:
            return f"{r['seconds']:g} s"
        return f"{r['bars']:g} bars at {fmt_bpm(r['tempo'])} bpm in {r['time_signature']} = {r['seconds']:g} s"


def stem_start_seconds(start_quarters: float, tempo: float) -> float:
    """The BWF time reference of a stem, in seconds from the session start.

    start_quarters: where the stem begins on the timeline, in quarter notes from the session
    start (a session file's start_bar, or the transport position when an OSC job is queued).
    plugin_host.stems.write_stem turns it into the sample count stored in the WAV's bext chunk.
    This assumes one tempo from the session start; a followed DAW clock knows better, and the
    daemon then sets the plan's time reference from it (`placed_at`).
    """
    return max(0.0, float(start_quarters)) * 60.0 / float(tempo)


def placed_at(plan: StemPlan, start_seconds: float) -> StemPlan:
    """The plan with its BWF time reference taken from the followed clock's own timeline
    (bridge.clock.hub.ClockHub.stem_start): under a DAW's tempo or meter map the seconds of a bar
    are not its quarter notes at one tempo, which is all `stem_start_seconds` can know."""
    start_seconds = float(start_seconds)
    if not (start_seconds >= 0.0 and start_seconds != float("inf")):
        raise ValueError(f"a stem's time reference must be a number of seconds >= 0, got {start_seconds!r}")
    plan.render["start_seconds"] = start_seconds
    return plan


def sound(prompt: str, add_bpm: bool, tempo: float | None, *layers: Mapping[str, Any],
          seed: int | None = None) -> tuple[str, SamplingParams]:
    """(prompt with "<bpm> bpm" when asked, SamplingParams): params layered left to right
    (preset, then the track's own), and a seed drawn when none is given, so the stem can be
    made again from its sidecar. RequestError when the params do not go together."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    if seed is not None:
        merged["seed"] = seed
    if merged.get("seed") is None:
        merged["seed"] = secrets.randbelow(2**31)
    return prompt_with_bpm(prompt, tempo, add_bpm), SamplingParams.from_dict(merged)


def plan_stem(name: str, *, prompt: str, params: SamplingParams, tempo: float, signature: TimeSignature,
              bars: float | None, seconds: float | None, model_rate: int, target_rate: int,
              start_quarters: float = 0.0, loop: bool = False, chain: Sequence[Mapping[str, Any]] = (),
              fmt: str = "wav", melody: dict[str, Any] | None = None,
              continuation: dict[str, Any] | None = None, context: dict[str, Any] | None = None) -> StemPlan:
    """The plan of one stem, given in bars (fitted to the grid: stretched if it drifted, cut
    sample-exact, a seamless loop if asked) or in seconds (cut sample-exact).

    PlanError (key "bars" or "seconds") when the engine would have to make more than one
    request can (model.types.MAX_REQUEST_SECONDS).
    """
    if bars is not None:
        seconds = bars_to_seconds(bars, tempo, signature)
        samples = bars_to_samples(bars, tempo, signature, target_rate)
    else:
        seconds = float(seconds)  # type: ignore[arg-type]
        samples = int(round(seconds * target_rate))
    loop = loop and bars is not None
    model_samples = int(round(samples * model_rate / target_rate))
    crossfade = loop_crossfade_samples(tempo, model_rate, model_samples) if loop else 0
    need = (model_samples + crossfade) / model_rate
    # Room for a stretch that speeds the take up by up to STRETCH_LIMIT without running short;
    # a stem in seconds only needs the margin, which may be cut to fit one request.
    stretch = bars is not None and continuation is None
    gen_seconds = need * (1.0 + STRETCH_LIMIT if stretch else 1.0) + GEN_MARGIN_SECONDS
    if (gen_seconds if stretch else need) > MAX_REQUEST_SECONDS:
        raise PlanError(f"{seconds:.1f} s needs {gen_seconds:.1f} s of generation; the engine makes at most "
                        f"{MAX_REQUEST_SECONDS:g} s per request", "bars" if bars is not None else "seconds")
    gen_seconds = min(MAX_REQUEST_SECONDS, gen_seconds)
    start = stem_start_seconds(start_quarters, tempo)
    request = {"prompt": prompt, "seconds": round(gen_seconds, 6), "params": params.to_dict(),
               "melody": melody, "continuation": continuation}
    render = {"bars": bars, "seconds": seconds, "tempo": tempo, "time_signature": str(signature),
              "start_bar": 1.0 + start_quarters / signature.quarters_per_bar, "start_seconds": start,
              "loop": loop, "crossfade_samples": crossfade, "model_samples": model_samples,
              "target_rate": target_rate, "samples": samples, "format": fmt,
              "chain": [dict(c) for c in chain], "stretch_to_grid": stretch}
    return StemPlan(name, request, render, dict(context or {}))


def check_params(*layers: Mapping[str, Any]) -> None:
    """RequestError unless these params layered together make valid SamplingParams."""
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    SamplingParams.from_dict(merged)

