"""The reference experts call: every routed expert in torch on the model's device.

This is the ONE function the hybrid executor replaces: `experts(layer, hidden, ids, weights, scores)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecli.models.config import Checkpoint
from moecli.models.layers import to_torch


class TorchExperts:
    """Dequantizes an expert the first time it is routed to, then keeps it on the device."""

    def __init__(self, ckpt: Checkpoint, device):
        self.ckpt, self.device = ckpt, device
        self._w: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def weights(self, layer: int, e: int):
        w = self._w.get((layer, e))
        if w is None:
            w = self._w[(layer, e)] = tuple(
                to_torch(self.ckpt.experts[f"blk.{layer}.ffn_{p}_exps"].expert(e), self.device)
                for p in ("gate", "up", "down"))
        return w

    def __call__(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 scores: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [n, d], ids/weights [n, k] -> sum_k weights * expert_k(hidden): [n, d]."""
        out = torch.zeros_like(hidden)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            gate, up, down = self.weights(layer, e)
            x = hidden[tok]
            y = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out
