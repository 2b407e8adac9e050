"""The token loop, in gpt-fast's manner: `prefill`, `decode_one_token`, `decode_n`.

A batch of requests becomes one `DecodeState`: a static KV cache, the conditioning, and a
token grid in the pattern's step layout whose column 0 is BOS. `forced` holds, per step, the
token that is already known (pad where the pattern has no frame, prompt codes for a
continuation, pad after a shorter request ends) or -1 where the model samples. Nothing in the
loop reads a tensor back to the host, so steps queue without syncing on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.conditioning.prepare import Conditioning
from model.decode.decoder import CrossKV, KVCache, MusicgenDecoderLM, TokenStep
from model.decode.patterns import CodebookPattern
from model.decode.sampling import Sampler, cfg_mix
from model.decode.step_graph import StaticStep, static_step


@dataclass
class StepPlan:
    """A batch's frames laid out by one codebook pattern; all step arithmetic asks the pattern."""

    pattern: CodebookPattern
    n_frames: list[int]
    prompt_frames: list[int]

    @property
    def n_steps(self) -> int:
        return self.pattern.n_steps(max(self.n_frames))

    def complete_after(self) -> np.ndarray:
        """complete_after[f] = the step (1-based) after which frame f has every codebook."""
        return self.pattern.first_complete_step(max(self.n_frames)) + 1

    @staticmethod
    def frames_complete(complete_after: np.ndarray, total: int, steps: int) -> int:
        """How many leading frames of a request of `total` frames are final after `steps` steps
        (`complete_after` as `complete_after()` made it)."""
        late = np.nonzero(complete_after[:total] > steps)[0]
        return int(late[0]) if len(late) else total

    def codes(self, grid: np.ndarray, i: int) -> np.ndarray:
        """Request i's codes (K, T_i) from its token grid (K, S+1; column 0 is BOS)."""
        return self.pattern.revert(grid[:, 1:], max(self.n_frames))[:, : self.n_frames[i]]


def build_forced(plan: StepPlan, pad: int, prompts: list[np.ndarray | None], device) -> torch.Tensor:
    """(B, K, S+1) tokens known in advance (-1 = sample); column 0 is BOS (= pad id).

    Each request's frames are -1 (to sample), its prompt's codes where it has one, and pad
    past its own length; the pattern lays them out (and pads where it emits no frame).
    """
    k, t = plan.pattern.n_codebooks, max(plan.n_frames)
    rows = []
    for i, n in enumerate(plan.n_frames):
        frames = np.full((k, t), -1, dtype=np.int64)
        frames[:, n:] = pad
        if prompts[i] is not None:
            p = prompts[i][:, : min(prompts[i].shape[1], n)]
            frames[:, : p.shape[1]] = p
        rows.append(np.concatenate([np.full((k, 1), pad, np.int64), plan.pattern.build(frames, pad)], axis=1))
    return torch.from_numpy(np.stack(rows)).to(device)


@dataclass
class DecodeState:
    """Everything one batched generation carries between steps; build with `new_state`."""

    lm: MusicgenDecoderLM
    cache: KVCache
    cross: CrossKV | None
    prefix: torch.Tensor | None  # melody models: conditioning read as a sequence prefix
    sampler: Sampler
    cfg_scale: torch.Tensor | None  # (B, 1, 1), None when guidance is off
    tokens: torch.Tensor  # (B, K, S+1) in step layout
    forced: torch.Tensor  # (B, K, S+1), -1 where the model samples
    step: int = 0  # next column of `tokens` to fill
    static: bool = False  # fixed-shape steps (`MusicgenDecoderLM.step_static`), as CUDA graphs need
    runner: StaticStep | None = None  # the fixed-shape step over this batch (made at its first step)

    @property
    def offset(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    @property
    def n_steps(self) -> int:
        return self.tokens.shape[2] - 1

    @property
    def done(self) -> bool:
        return self.step > self.n_steps


def new_state(
    lm: MusicgenDecoderLM, cond: Conditioning, plan: StepPlan, sampler: Sampler,
    guidance: torch.Tensor | None, prompts: list[np.ndarray | None], dtype,
) -> DecodeState:
    device = cond.states.device
    b = len(plan.n_frames)
    rows = 2 * b if guidance is not None else b
    forced = build_forced(plan, lm.spec.pad_id, prompts, device)
    tokens = forced.clamp(min=0).clone()
    prefix_len = cond.states.shape[1] if cond.is_prefix else 0
    cache = lm.new_cache(rows, prefix_len + plan.n_steps + 1, device, dtype)
    cross = None if cond.is_prefix else lm.cross_kv(cond.states, cond.mask)
    prefix = cond.states if cond.is_prefix else None
    assert cond.states.shape[0] == rows, "conditioning rows must match the guided batch"
    return DecodeState(lm, cache, cross, prefix, sampler, guidance, tokens, forced)


def _rows(state: DecodeState, x: torch.Tensor) -> torch.Tensor:
    """Duplicate the batch for the unconditional half of classifier-free guidance."""
    return torch.cat([x, x]) if state.cfg_scale is not None else x


def _emit(state: DecodeState, logits: torch.Tensor) -> None:
    """Sample column `state.step` from the last position's logits (rows, K, V)."""
    t = state.step
    sampled = state.sampler(cfg_mix(logits, state.cfg_scale))
    known = state.forced[:, :, t]
    state.tokens[:, :, t] = torch.where(known >= 0, known, sampled)
    state.step = t + 1


@torch.inference_mode()
def prefill(state: DecodeState) -> None:
    """Run the conditioning prefix and every fully known leading step in one pass."""
    unknown = (state.forced < 0).any(dim=(0, 1)).nonzero()
    first = int(unknown[0]) if len(unknown) else state.n_steps + 1
    first = max(first, 1)
    x = state.lm.embed_tokens(_rows(state, state.tokens[:, :, :first]))
    if state.prefix is not None:
        x = torch.cat([state.prefix, x], dim=1)
    logits = state.lm.forward_embeds(x, 0, state.cache, state.cross)
    if first > state.n_steps:
        state.step = first
        return
    state.step = first
    _emit(state, logits[:, :, -1])


def decode_one_token(state: DecodeState) -> None:
    """One decoder step: feed column step-1, sample column step."""
    t = state.step
    x = _rows(state, state.tokens[:, :, t - 1 : t])
    if state.static:
        if state.runner is None:
            state.runner = static_step(state.lm, state.cache, state.cross, x.shape[0], x.device)
        logits = state.runner(x, state.offset + t - 1)
    else:
        logits = state.lm(x, state.offset + t - 1, state.cache, state.cross)
    _emit(state, logits[:, :, -1])


@torch.inference_mode()
def decode_together(states: list[DecodeState]) -> int:
    """One step of each of several decode states (all of one decoder) in one decoder pass where
    the C step runs (`MusicgenDecoderLM.forward_together`); each state samples from its own
    logits with its own sampler, so its tokens are the ones `decode_one_token` gives it alone.
    Returns how many decoder passes it took (1 where they shared one)."""
    shared = [s for s in states if not s.static]
    for s in states:
        if s.static:  # a captured CUDA graph replays over its own batch only
            decode_one_token(s)
    if not shared:
        return len(states)
    steps = [TokenStep(_rows(s, s.tokens[:, :, s.step - 1 : s.step]), s.offset + s.step - 1, s.cache, s.cross)
             for s in shared]
    logits, passes = shared[0].lm.forward_together(steps)
    for s, lg in zip(shared, logits):
        _emit(s, lg[:, :, -1])
    return passes + len(states) - len(shared)


@torch.inference_mode()
def decode_n(state: DecodeState, n: int) -> None:
    """Up to `n` more steps (fewer at the end)."""
    for _ in range(n):
        if state.done:
            return
        decode_one_token(state)
