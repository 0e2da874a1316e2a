"""gpt-oss (gpt-oss-20b / gpt-oss-120b, GGUF arch "gpt-oss"), as llama.cpp's openai-moe graph computes it.

Differences from the shared decoder:
  * attention: q/k/v/o biases, a learned per-head "sink" logit that joins every softmax denominator (it takes
    probability mass without contributing a value), and a sliding window (128 keys) on every other layer,
    starting with layer 0; NEOX RoPE over the whole head with YaRN (x32 from 4096);
  * the FFN norm is called `post_attention_norm` in the file;
  * routing: top-k of the router logits (+ bias), then a softmax over the k chosen logits;
  * experts with biases and the clamped SwiGLU (see moecli.runtime.experts.glu), usually MXFP4.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from moecli.errors import MoecliError, UnsupportedError
from moecli.models.config import Checkpoint, ModelConfig
from moecli.models.deepseek2 import YarnRope, yarn_params
from moecli.models.layers import Embedding, TorchLinear, to_torch
from moecli.models.transformer import Transformer


def from_gguf(g) -> ModelConfig:
    t = g.tensors
    embd = t.get("token_embd.weight")
    if embd is None:
        raise MoecliError(f"{g.path.name}: model file lacks tensor token_embd.weight")
    n_embd, n_head, n_layer = (int(g.require(k)) for k in ("embedding_length", "attention.head_count",
                                                            "block_count"))
    head_dim = int(g.arch_get("attention.key_length") or n_embd // n_head)
    n_rot = int(g.arch_get("rope.dimension_count") or head_dim)
    if n_rot != head_dim:
        raise UnsupportedError(f"{g.path.name}: partial RoPE ({n_rot} of {head_dim} dims) is not supported for gpt-oss")
    base = g.arch_get("rope.freq_base", 10000.0)
    if g.arch_get("rope.freq_base_swa") not in (None, base):
        raise UnsupportedError(f"{g.path.name}: a separate RoPE base for sliding-window layers is not supported")
    pattern = g.arch_get("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # per-layer flags
        swa = tuple(l for l, on in enumerate(pattern) if on)
    else:  # llama.cpp's set_swa_pattern(n): layer l slides unless l % n == n - 1 (n = 0: every layer)
        n = int(pattern)
        swa = tuple(l for l in range(n_layer) if n == 0 or l % n < n - 1)
    n_ctx_train = int(g.arch_get("context_length", 4096))
    fields = {}
    stype = g.arch_get("rope.scaling.type")
    if stype == "yarn":
        fields = dict(rope_scaling="yarn", rope_factor=float(g.arch_get("rope.scaling.factor", 1.0) or 1.0),
                      yarn_orig_ctx=int(g.arch_get("rope.scaling.original_context_length", 0) or n_ctx_train),
                      yarn_beta_fast=float(g.arch_get("rope.scaling.yarn_beta_fast", 32.0)),
                      yarn_beta_slow=float(g.arch_get("rope.scaling.yarn_beta_slow", 1.0)),
                      yarn_ext_factor=float(g.arch_get("rope.scaling.yarn_ext_factor", -1.0)),
                      yarn_attn_factor=float(g.arch_get("rope.scaling.yarn_attn_factor", 1.0)))
    elif stype not in (None, "none"):
        raise UnsupportedError(f"{g.path.name}: RoPE scaling '{stype}' is not supported (only YaRN)")
    if g.arch_get("rope.scaling.yarn_log_multiplier") or g.arch_get("rope.scaling.attn_factor") not in (None, 1.0):
        raise UnsupportedError(f"{g.path.name}: YaRN log multiplier / rope attn_factor is not supported for gpt-oss")
    return ModelConfig(
        arch=g.arch, n_vocab=int(embd.ne[1]), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=int(g.arch_get("attention.head_count_kv", n_head)), head_dim=head_dim, n_ctx_train=n_ctx_train,
        rms_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(base), rope_neox=True,
        n_expert=int(g.require("expert_count")), n_expert_used=int(g.require("expert_used_count")),
        n_ff_exp=int(g.require("expert_feed_forward_length")), tie_embeddings="output.weight" not in t,
        routed_scale=float(g.arch_get("expert_weights_scale", 0.0) or 0.0), gating="softmax_weight",
        sliding_window=int(g.require("attention.sliding_window")), swa_layers=swa, attn_sinks=True,
        expert_act="swiglu_oai", **fields)


def validate(ckpt: Checkpoint) -> None:
    """The gpt-oss tensors against the config (ggml order), naming the first that disagrees."""
    c, chk = ckpt.config, ckpt.check_shape
    q, kv, E, ff = c.n_head * c.head_dim, c.n_head_kv * c.head_dim, c.n_expert, c.n_ff_exp
    if c.n_head % c.n_head_kv:
        raise MoecliError(f"{c.n_head} query heads do not divide into {c.n_head_kv} KV heads")
    chk("token_embd.weight", c.n_embd, c.n_vocab)
    chk("output_norm.weight", c.n_embd)
    chk("output.weight", c.n_embd, c.n_vocab, optional=True)
    for l in range(c.n_layer):
        b = f"blk.{l}."
        for name, ne in (("attn_norm.weight", (c.n_embd,)), ("post_attention_norm.weight", (c.n_embd,)),
                         ("attn_q.weight", (c.n_embd, q)), ("attn_k.weight", (c.n_embd, kv)),
                         ("attn_v.weight", (c.n_embd, kv)), ("attn_output.weight", (q, c.n_embd)),
                         ("attn_sinks.weight", (c.n_head,)), ("ffn_gate_inp.weight", (c.n_embd, E))):
            chk(b + name, *ne)
        for name, n in (("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv), ("attn_output.bias", c.n_embd),
                        ("ffn_gate_inp.bias", E)):
            chk(b + name, n, optional=True)
        for kind, ne in (("gate", (c.n_embd, ff)), ("up", (c.n_embd, ff)), ("down", (ff, c.n_embd))):
            stack = ckpt.experts.get(f"{b}ffn_{kind}_exps")
            if stack is None:
                raise MoecliError(f"model file lacks tensor {b}ffn_{kind}_exps.weight")
            got = tuple(stack.stacked.ne) if stack.stacked is not None else (*stack.ne, stack.n)
            if got != (*ne, E):
                raise MoecliError(f"tensor {b}ffn_{kind}_exps.weight has shape {list(got)}, "
                                  f"expected {[*ne, E]} from the model config")
            if stack.bias is not None and tuple(stack.bias.ne) != (ne[1], E):
                raise MoecliError(f"tensor {b}ffn_{kind}_exps.bias has shape {list(stack.bias.ne)}, "
                                  f"expected {[ne[1], E]} from the model config")


class Layer:
    def __init__(self, ckpt: Checkpoint, l: int, device, linear):
        b, T, opt = f"blk.{l}.", ckpt.tensor, ckpt.optional
        self.attn_norm = to_torch(T(b + "attn_norm.weight"), device)
        self.ffn_norm = to_torch(T(b + "post_attention_norm.weight"), device)
        self.q = linear(T(b + "attn_q.weight"), opt(b + "attn_q.bias"))
        self.k = linear(T(b + "attn_k.weight"), opt(b + "attn_k.bias"))
        self.v = linear(T(b + "attn_v.weight"), opt(b + "attn_v.bias"))
        self.o = linear(T(b + "attn_output.weight"), opt(b + "attn_output.bias"))
        self.sinks = to_torch(T(b + "attn_sinks.weight"), device)
        self.router = linear(T(b + "ffn_gate_inp.weight"), opt(b + "ffn_gate_inp.bias"))
        self.window = ckpt.config.sliding_window if l in ckpt.config.swa_layers else 0


def route(logits: torch.Tensor, k: int):
    """llama.cpp's SOFTMAX_WEIGHT gating -> (probs over all experts [n, E] for caches and traces, ids, weights)."""
    top, ids = torch.topk(logits, k, dim=-1)
    return torch.softmax(logits, -1), ids, torch.softmax(top, -1)


def attend_sinks(q, k, v, start: int, k0: int, sinks, scale: float, window: int) -> torch.Tensor:
    """Causal GQA attention with a sink logit per head and an optional sliding window, as ggml's soft_max_ext +
    add_sinks: q [n, H, d] at positions start.., k/v [T, Hkv, d] holding positions k0..k0+T-1 -> [n, H*d]."""
    n, H, d = q.shape
    T, Hkv = k.shape[:2]
    g = H // Hkv
    qg = q.view(n, Hkv, g, d).permute(1, 2, 0, 3).reshape(Hkv, g * n, d)
    s = torch.bmm(qg, k.permute(1, 2, 0)).view(Hkv, g, n, T) * scale
    if n > 1 or window:
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(k0, k0 + T, device=q.device)[None, :]
        masked = kpos > qpos
        if window:
            masked |= qpos - kpos >= window
        s = s.masked_fill(masked, float("-inf"))
    sink = sinks.view(Hkv, g, 1, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), sink)
    e = torch.exp(s - m)
    p = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
    out = torch.bmm(p.view(Hkv, g * n, T), v.transpose(0, 1))  # [Hkv, g*n, d]
    return out.view(Hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, H * d)


class GptOssTransformer(Transformer):
    """Transformer's forward pass with gpt-oss attention (sinks, sliding window) and routing."""

    def __init__(self, ckpt: Checkpoint, device, experts, linear=None, max_ctx: int | None = None):
        c = self.config = ckpt.config
        self.device = torch.device(device)
        linear = linear or (lambda w, b=None: TorchLinear(w, self.device, b))
        self.experts = experts  # experts(layer, hidden, ids, weights, scores) -> output: the executor seam
        self.embed = Embedding(ckpt.tensor("token_embd.weight"), self.device)
        self.layers = [Layer(ckpt, l, self.device, linear) for l in range(c.n_layer)]
        self.norm = to_torch(ckpt.tensor("output_norm.weight"), self.device)
        self.output = linear(ckpt.optional("output.weight") or ckpt.tensor("token_embd.weight"))
        self.max_ctx = max_ctx or c.n_ctx_train
        # YaRN as llama.cpp derives it (the rope part only: gpt-oss scales q.k by 1/sqrt(head_dim))
        y = yarn_params(dataclasses.replace(c, qk_nope_dim=0, qk_rope_dim=c.head_dim))
        y.pop("kq_scale")
        self.kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(c.head_dim)))
        self.rope = YarnRope(c.head_dim, c.rope_theta, True, self.max_ctx, self.device, **y)
        self.on_router = None  # optional hook(layer, probs, ids, weights)

    def attention(self, l, layer: Layer, h, pos, cache, start: int) -> torch.Tensor:
        c, n = self.config, h.shape[0]
        q = self.rope(layer.q(h).view(n, c.n_head, c.head_dim), pos)
        k = self.rope(layer.k(h).view(n, c.n_head_kv, c.head_dim), pos)
        end = start + n
        cache.k[l, start:end] = k
        cache.v[l, start:end] = layer.v(h).view(n, c.n_head_kv, c.head_dim)
        # a sliding-window layer never needs keys older than the window of its first query
        k0 = max(0, start - layer.window + 1) if layer.window else 0
        out = attend_sinks(q, cache.k[l, k0:end], cache.v[l, k0:end], start, k0, layer.sinks, self.kq_scale,
                           layer.window)
        return layer.o(out)

    def ffn(self, l, layer: Layer, h) -> torch.Tensor:
        return self.moe(l, layer, h)

    def moe(self, l, layer: Layer, h) -> torch.Tensor:
        c = self.config
        probs, ids, weights = route(layer.router(h), c.n_expert_used)
        if c.routed_scale not in (0.0, 1.0):
            weights = weights * np.float32(c.routed_scale).item()
        if self.on_router is not None:
            self.on_router(l, probs, ids, weights)
        return self.experts(l, h, ids, weights, probs)


TRANSFORMER = GptOssTransformer
