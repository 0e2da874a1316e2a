"""Token sampling with the usual knobs (llama.cpp / ollama names and order)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self.gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor, history: list[int]) -> int:
        p = self.p
        logits = logits.float().cpu()
        if p.repeat_penalty != 1.0 and history:
            logits = logits.clone()  # a normal tensor to modify: the forward returns an inference tensor
            recent = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long)
            vals = logits[recent]
            logits[recent] = torch.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
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
