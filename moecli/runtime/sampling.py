"""Token sampling with the usual knobs (llama.cpp / ollama names and order): penalties over the recent tokens, an
optional constraint (a grammar masking logits), then greedy or top-k -> top-p -> min-p -> temperature."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moecli.errors import MoecliError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: minus this once for every token seen in the last repeat_last_n
    frequency_penalty: float = 0.0  # minus this times the token's count there (llama.cpp applies both so)
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit (OpenAI's; -100 bans a token)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())

    @property
    def _penalizes(self) -> bool:
        p = self.p
        return p.repeat_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def __call__(self, logits: torch.Tensor, history: list[int],
                 constrain: Callable[[torch.Tensor], None] | None = None) -> int:
        """The next token. `constrain(logits)` may set disallowed tokens to -inf in place (a grammar)."""
        p = self.p
        logits = logits.float().cpu()
        if (self._penalizes and history) or constrain is not None or p.logit_bias:
            logits = logits.clone()  # a normal tensor to modify: the forward returns an inference tensor
            if self._penalizes and history:
                self._penalize(logits, history)
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long)
                logits[ids] += torch.tensor(list(p.logit_bias.values()), dtype=logits.dtype)
            if constrain is not None:
                constrain(logits)
                if not bool(torch.isfinite(logits).any()):
                    raise MoecliError("the constraint (grammar) allows no next token")
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        if p.top_k > 0:
            vals, idx = torch.topk(logits, min(p.top_k, logits.numel()))
        else:
            vals, idx = torch.sort(logits, descending=True)
        probs = torch.softmax(vals / p.temperature, dim=-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            cum = torch.cumsum(probs, dim=-1)
            keep &= (cum - probs) < p.top_p  # keep the smallest prefix reaching top_p
        if p.min_p > 0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs / probs.sum(), 1, generator=self.gen)
        return int(idx[choice])

    def _penalize(self, logits: torch.Tensor, history: list[int]) -> None:
        p = self.p
        recent = torch.tensor(history[-p.repeat_last_n:], dtype=torch.long)
        ids, counts = torch.unique(recent, return_counts=True)
        vals = logits[ids]
        if p.repeat_penalty != 1.0:
            vals = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        logits[ids] = vals - counts.float() * p.frequency_penalty - p.presence_penalty


def logprobs(logits: torch.Tensor, token: int, top: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of `token` and its `top` most likely tokens with theirs (before penalties,
    constraints and temperature, as OpenAI reports them)."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    best = []
    if top > 0:
        vals, idx = torch.topk(lp, min(top, lp.numel()))
        best = [(int(i), float(v)) for i, v in zip(idx, vals)]
    return float(lp[token]), best
