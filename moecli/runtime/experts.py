"""The reference experts call: every routed expert in torch on the model's device.

This is the ONE function the hybrid executor replaces: `experts(layer, hidden, ids, weights, scores)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecli.models.config import OAI_ALPHA, OAI_LIMIT, Checkpoint
from moecli.models.layers import to_torch



def glu(g: torch.Tensor, u: torch.Tensor, act: str = "swiglu") -> torch.Tensor:
    """The experts' gated activation, rounded like ggml's swiglu_split / swiglu_oai / reglu_split."""
    if act == "reglu":
        return F.relu(g) * u
    if act == "swiglu_oai":
        x, y = g.clamp(max=OAI_LIMIT), u.clamp(-OAI_LIMIT, OAI_LIMIT)
        return x / (1.0 + torch.exp(x * -OAI_ALPHA)) * (y + 1.0)
    return F.silu(g) * u


def expert_ffn(x, gate, up, down, bias=None, act: str = "swiglu") -> torch.Tensor:
    """One expert on rows x: down(glu(gate x + b_g, up x + b_u)) + b_d; `bias` = (b_g, b_u, b_d) or None."""
    if bias is None:
        return glu(x @ gate.T, x @ up.T, act) @ down.T
    bg, bu, bd = bias
    return glu(x @ gate.T + bg, x @ up.T + bu, act) @ down.T + bd


def expert_biases(ckpt: Checkpoint, layer: int, device) -> tuple[torch.Tensor, ...] | None:
    """A layer's gate/up/down expert biases as [E, out] tensors on `device` (gpt-oss), or None."""
    stacks = [ckpt.experts[f"blk.{layer}.ffn_{p}_exps"] for p in ("gate", "up", "down")]
    if all(s.bias is None for s in stacks):
        return None
    return tuple(torch.from_numpy(s.bias_rows()).to(device) if s.bias is not None else
                 torch.zeros(s.n, s.ne[1], device=device) for s in stacks)


class TorchExperts:
    """Dequantizes an expert the first time it is routed to, then keeps it on the device."""

    def __init__(self, ckpt: Checkpoint, device):
        self.ckpt, self.device = ckpt, device
        self.act = ckpt.config.expert_act
        self._w: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._bias: dict[int, tuple | None] = {}

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
        if layer not in self._bias:
            self._bias[layer] = expert_biases(self.ckpt, layer, self.device)
        biases = self._bias[layer]
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            b = None if biases is None else tuple(t[e] for t in biases)
            y = expert_ffn(hidden[tok], *self.weights(layer, e), b, self.act)
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out
