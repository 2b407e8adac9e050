"""Turning guided logits into tokens: CFG mix, temperature, top-k, top-p, seeded draws.

Each request brings its own `torch.Generator`, so a seed gives the same tokens whether the
request runs alone or batched with others (on the same device and dtype). Draws use the
exponential race (argmax of p / E with E ~ Exp(1)), which samples from p exactly and needs no
cumulative sum or host sync.

On the CPU, with top-k on and the C kernels built, the race runs over the k candidates only
(`_race_top_k`, the candidates found by model/kernels/top_k.c): tokens outside them have p = 0 and can
never win, so drawing E for them changes nothing but the cost. PyTorch draws exponentials one at
a time (26 ns each here): the full 4 x 2048 draw was a third of a step's sampling, the filter
and softmax over the whole row most of the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.kernels import gemv
from model.types import SamplingParams


def cfg_mix(logits: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """logits (2B, ...) as [cond, uncond] -> uncond + (cond - uncond) * scale; (B, ...) as is."""
    if scale is None:
        return logits
    cond, uncond = logits.chunk(2)
    return uncond + (cond - uncond) * scale


@dataclass
class Sampler:
    """Per-request sampling settings laid out as tensors once per batch."""

    temperature: torch.Tensor  # (B, 1, 1)
    top_k: list[int]
    top_p: list[float]
    greedy: list[bool]
    generators: list[torch.Generator | None]

    @classmethod
    def for_params(cls, params: list[SamplingParams], device) -> Sampler:
        gens: list[torch.Generator | None] = []
        for p in params:
            if p.greedy:
                gens.append(None)
                continue
            g = torch.Generator(device=device)
            if p.seed is None:
                g.seed()
            else:
                g.manual_seed(p.seed)
            gens.append(g)
        temp = torch.tensor([p.temperature for p in params], device=device).view(-1, 1, 1)
        return cls(temp, [p.top_k for p in params], [p.top_p for p in params],
                   [p.greedy for p in params], gens)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, K, V) float -> tokens (B, K) int64."""
        logits = logits.float()
        if all(self.greedy):
            return logits.argmax(dim=-1)
        out = torch.empty(logits.shape[:2], dtype=torch.long, device=logits.device)
        scaled = logits / self.temperature
        for i in range(logits.shape[0]):
            if self.greedy[i]:
                out[i] = logits[i].argmax(dim=-1)
                continue
            if logits.device.type == "cpu" and 0 < self.top_k[i] < logits.shape[-1] and gemv.available():
                picked = _race_top_k(scaled[i], self.top_k[i], self.top_p[i], self.generators[i])
                if picked is not None:
                    out[i] = picked
                    continue
            row = filter_top_k_top_p(scaled[i], self.top_k[i], self.top_p[i])
            probs = torch.softmax(row, dim=-1)
            race = torch.empty_like(probs).exponential_(1.0, generator=self.generators[i])
            out[i] = (probs / race).argmax(dim=-1)
        return out


def _race_top_k(logits: torch.Tensor, top_k: int, top_p: float, generator: torch.Generator | None
                ) -> torch.Tensor | None:
    """The race over each row's top k (rows along the last dim, candidates from the C kernels)
    -> (rows,) tokens, or None where a row has a tie at its k-th value (the full path keeps every
    tied value). The candidates come in token order, so the draws do not depend on how a top-k
    routine orders them; the support and the nucleus are `filter_top_k_top_p`'s, so the
    distribution is the same."""
    support = gemv.top_k_support(logits, top_k)
    if support is None:
        return None
    index, values = support
    if 0.0 < top_p < 1.0:
        values = filter_top_k_top_p(values, 0, top_p)
    probs = torch.softmax(values, dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return index.gather(-1, (probs / race).argmax(dim=-1, keepdim=True)).squeeze(-1)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k and the top-p nucleus to -inf (rows along the last dim)."""
    if 0 < top_k < logits.shape[-1]:
        # The k-th largest value is the smallest of the unsorted top k: the same value as the
        # sorted top k's last, without the sort (33 against 129 us for 4 x 2048, a third of a
        # step's sampling).
        kth = torch.topk(logits, top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1.0 - top_p)
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
