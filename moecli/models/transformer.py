"""The decoder shared by llama / Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (they differ only by config flags).

Plain tensors rather than nn.Modules: no autograd, no hooks, nothing between a step and its kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moecli.models import spec as S
from moecli.models.config import Checkpoint
from moecli.models.layers import Embedding, KVCache, TorchLinear, attend, rms_norm, route, to_torch
from moecli.models.rope import torch_rope


# The tensors of the shared decoder (llama / Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), what the config switches on.
SPEC = S.Spec(layer=S.attention(bias=lambda c, l: c.attn_bias) + (S.norm("ffn_norm.weight"),) + S.ffn() + S.moe()
              + S.shared_expert(), globals=S.GLOBALS)


class Layer:
    """One decoder layer's tensors on the device, read through the family's layer spec."""

    def __init__(self, ckpt: Checkpoint, spec: S.Spec, l: int, device, linear):
        T = S.layer_tensors(ckpt, spec, l)
        self.attn_norm = to_torch(T["attn_norm"], device)
        self.ffn_norm = to_torch(T["ffn_norm"] if "ffn_norm" in T else T["post_attention_norm"], device)
        self.q, self.k, self.v = (linear(T[f"attn_{p}"], T.get(f"attn_{p}.bias")) for p in "qkv")
        self.o = linear(T["attn_output"], T.get("attn_output.bias"))
        self.q_norm = to_torch(T["attn_q_norm"], device) if "attn_q_norm" in T else None
        self.k_norm = to_torch(T["attn_k_norm"], device) if "attn_k_norm" in T else None
        self.ffn = self.router = self.exp_bias = self.shared = self.shared_gate = None
        if "ffn_gate_inp" not in T:  # dense models, and the leading dense layers of MoE ones
            self.ffn = tuple(linear(T[f"ffn_{p}"]) for p in ("gate", "up", "down"))
            return
        self.router = linear(T["ffn_gate_inp"], T.get("ffn_gate_inp.bias"))
        if "exp_probs_b.bias" in T:  # selection-only expert bias
            self.exp_bias = to_torch(T["exp_probs_b.bias"], device)
        if "ffn_gate_shexp" in T:
            self.shared = tuple(linear(T[f"ffn_{p}_shexp"]) for p in ("gate", "up", "down"))
            if "ffn_gate_inp_shexp" in T:  # GGUF [n_embd]; HF [n_embd, 1]
                self.shared_gate = to_torch(T["ffn_gate_inp_shexp"], device).reshape(-1)


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    fused = getattr(gate, "swiglu", None)  # the ggml engine runs the whole FFN as one graph
    if fused is not None:
        return fused(up, down, x)
    return down(F.silu(gate(x)) * up(x))


class Transformer:
    fused_forward = None  # the ggml engine's whole forward as one graph (moecli.runtime.ggml_forward)
    decode = None  # moecli.models.decode.DecodeBlock: the one-token step on the device kernels
    LAYER = Layer  # a family's own layer class (gpt-oss: sinks, window)

    def __init__(self, ckpt: Checkpoint, device, experts, linear=None, max_ctx: int | None = None):
        c = self.config = ckpt.config
        self.device = torch.device(device)
        linear = linear or (lambda w, b=None: TorchLinear(w, self.device, b))
        self.experts = experts  # experts(layer, hidden, ids, weights, scores) -> output: the executor seam
        self.embed = Embedding(ckpt.tensor("token_embd.weight"), self.device)
        from moecli.models.loader import GGUF_ARCHS  # the family's layer spec (the loader imports this module)

        spec = GGUF_ARCHS[c.arch].SPEC
        self.layers = [self.LAYER(ckpt, spec, l, self.device, linear) for l in range(c.n_layer)]
        self.norm = to_torch(ckpt.tensor("output_norm.weight"), self.device)
        self.output = linear(ckpt.optional("output.weight") or ckpt.tensor("token_embd.weight"))
        self.max_ctx = max_ctx or c.n_ctx_train
        self.rope, self.kq_scale = torch_rope(c, self.max_ctx, self.device)
        self.on_router = None  # optional hook(layer, probs, ids, weights): tests and traces read routing here
        self._no_sinks = None  # -inf per head, for sliding-window layers without sinks
        from moecli.models.decode import DecodeBlock

        self.decode = DecodeBlock.build(self)  # one-token steps on the device kernels (None: torch)

    def new_cache(self, n_ctx: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for n_ctx tokens; `dtype` None: f16 on an accelerator, float32 on the CPU device."""
        if self.fused_forward is not None:
            return self.fused_forward.new_cache(n_ctx)
        c = self.config
        return KVCache(c.n_layer, min(n_ctx or self.max_ctx, self.max_ctx), c.n_head_kv, c.head_dim, self.device,
                       dtype)

    @torch.inference_mode()
    def forward(self, tokens: list[int], cache: KVCache, all_logits: bool = True) -> torch.Tensor:
        """Run `tokens` at positions cache.pos.. and append them to the cache. Returns logits [n or 1, vocab]."""
        c, start, n = self.config, cache.pos, len(tokens)
        if start + n > cache.n_ctx:
            raise ValueError(f"context full: {start + n} tokens > {cache.n_ctx}")
        if self.fused_forward is not None:
            logits = self.fused_forward(list(tokens), cache, all_logits, self.on_router)
            cache.pos = start + n
            return logits
        pos = torch.arange(start, start + n, device=self.device)
        x = self.embed(tokens)
        for l, layer in enumerate(self.layers):
            self.layer_input = x  # what a SmallThinker router reads
            self._early = self.route_early(l, layer, x)
            x, h = self.attention_block(l, layer, x, pos, cache, start)
            x = x + self.ffn(l, layer, h)
        cache.pos = start + n
        if not all_logits:
            x = x[-1:]
        return self.output(rms_norm(x, self.norm, c.rms_eps))

    @torch.inference_mode()
    def forward_batch(self, work: list[tuple[list[int], KVCache]]) -> torch.Tensor:
        """Several sequences, each `tokens` at its own cache's pos.., appended to their caches: the last token's
        logits of each [len(work), vocab]. One forward pass on the one-graph engine (continuous batching); one per
        sequence on the others."""
        if self.fused_forward is not None:
            logits = self.fused_forward.decode_batch([(list(t), cache) for t, cache in work], self.on_router)
            for t, cache in work:
                cache.pos += len(t)
            return logits
        return torch.cat([self.forward(t, cache, all_logits=False) for t, cache in work])

    def attention_block(self, l, layer, x, pos, cache, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """attn_norm -> attention -> residual -> ffn_norm: (residual stream, FFN input)."""
        if self.decode is not None and x.shape[0] == 1 and self.decode.attends(l):
            return self.decode.attention_block(l, layer, x, pos, cache)
        eps = self.config.rms_eps
        x = x + self.attention(l, layer, rms_norm(x, layer.attn_norm, eps), pos, cache, start)
        return x, rms_norm(x, layer.ffn_norm, eps)

    def ffn(self, l, layer: Layer, h) -> torch.Tensor:
        return self._swiglu(layer.ffn, h) if layer.ffn is not None else self.moe(l, layer, h)

    def _swiglu(self, lins, h):
        if self.decode is not None and h.shape[0] == 1 and self.decode.on_kernels(lins):
            return self.decode.swiglu(lins, h)
        return swiglu(h, *lins)

    def attention(self, l, layer: Layer, h, pos, cache: KVCache, start: int) -> torch.Tensor:
        c, n = self.config, h.shape[0]
        q, k, v = layer.q(h), layer.k(h), layer.v(h)
        if c.qk_norm == "full":
            q, k = rms_norm(q, layer.q_norm, c.rms_eps), rms_norm(k, layer.k_norm, c.rms_eps)
        q = q.view(n, c.n_head, c.head_dim)
        k = k.view(n, c.n_head_kv, c.head_dim)
        if c.qk_norm == "head":
            q, k = rms_norm(q, layer.q_norm, c.rms_eps), rms_norm(k, layer.k_norm, c.rms_eps)
        if l not in c.nope_layers:
            q, k = self.rope(q, pos), self.rope(k, pos)
        cache.k[l, start:start + n] = k
        cache.v[l, start:start + n] = v.view(n, c.n_head_kv, c.head_dim)
        window = c.sliding_window if l in c.swa_layers else 0
        if window and start + n > window:  # SmallThinker's sliding-window layers, once the window bites
            return layer.o(self._attend_window(l, q, cache, start, n, window))
        out = attend(q, cache.k[l, :start + n], cache.v[l, :start + n], start)
        return layer.o(out)

    def _attend_window(self, l, q, cache: KVCache, start: int, n: int, window: int) -> torch.Tensor:
        """Causal attention over the last `window` keys of each query: gpt-oss's masked softmax without sinks
        (a -inf sink adds exp(-inf) = 0 to every denominator)."""
        from moecli.models.gpt_oss import attend_sinks  # gpt_oss imports this module

        k0 = max(0, start - window + 1)
        if self._no_sinks is None:
            self._no_sinks = torch.full((self.config.n_head,), float("-inf"), device=self.device)
        end = start + n
        return attend_sinks(q, cache.k[l, k0:end], cache.v[l, k0:end], start, k0, self._no_sinks, self.kq_scale,
                            window)

    def route_early(self, l, layer: Layer, x):
        """A router on the layer input (SmallThinker) routes before attention: the executor is told at once
        (`experts.known`), so it can copy the layer's experts while attention runs. None for other routers."""
        if self.config.router_input != "layer" or layer.router is None:
            return None
        r = self._route(layer, x)
        known = getattr(self.experts, "known", None)
        if known is not None:
            known(l, r[1])
        return r

    def _route(self, layer: Layer, inp):
        """(scores, ids, weights) of the layer's router on `inp`: one token through the decode kernels."""
        if self.decode is not None and inp.shape[0] == 1 and self.decode.routing:
            return self.decode.route(layer, inp)
        return route(self.config, layer.router(inp), layer.exp_bias)

    def moe(self, l, layer: Layer, h) -> torch.Tensor:
        c = self.config
        early, self._early = getattr(self, "_early", None), None
        probs, ids, weights = early or self._route(layer, self.layer_input if c.router_input == "layer" else h)
        if self.on_router is not None:
            if self.decode is not None and h.shape[0] == 1 and self.decode.routing:  # buffers the next layer reuses
                self.on_router(l, probs.clone(), ids.long(), weights.clone())
            else:
                self.on_router(l, probs, ids, weights)
        if c.weight_input:
            out = self._weighted_inputs(l, h, ids, weights, probs)
        else:
            out = self.experts(l, h, ids, weights, probs)
        if layer.shared is not None:
            s = self._swiglu(layer.shared, h)
            if self.decode is not None and h.shape[0] == 1 and self.decode.combines(out, layer.shared):
                return self.decode.shared_add(out, s, h, layer.shared_gate)
            if layer.shared_gate is not None:
                s = s * torch.sigmoid(h @ layer.shared_gate)[:, None]
            out = out + s
        return out

    def _weighted_inputs(self, l, h, ids, weights, probs) -> torch.Tensor:
        """llama4: each (token, slot) pair's expert reads the token's row times its weight: one row per pair
        through the experts seam (weight 1, exact), the slots added in order."""
        n, k = ids.shape
        hw = (h[:, None, :] * weights[:, :, None]).reshape(n * k, -1)
        y = self.experts(l, hw, ids.reshape(-1, 1), torch.ones_like(weights).reshape(-1, 1),
                         probs.repeat_interleave(k, 0)).view(n, k, -1)
        out = y[:, 0]
        for i in range(1, k):
            out = out + y[:, i]
        return out


# ------------------------------------------------------------------------------------------------ ggml graph

def ggml_qkv(g, L: dict, h, rope: bool = True):
    """q [hd, H, n], k [hd, Hkv, n] roped (unless not `rope`), v [hd * Hkv, n]: projections (+ biases), q/k RMSNorm
    over the projection (OLMoE) or per head (Qwen3)."""
    c = g.c
    q, k, v = (g.linear((L[f"attn_{p}"], L.get(f"attn_{p}.bias")), h) for p in "qkv")
    if c.qk_norm == "full":
        q, k = g.build_norm(q, L["attn_q_norm"]), g.build_norm(k, L["attn_k_norm"])
    q, k = g.heads(q, c.head_dim, c.n_head), g.heads(k, c.head_dim, c.n_head_kv)
    if c.qk_norm == "head":
        q, k = g.build_norm(q, L["attn_q_norm"]), g.build_norm(k, L["attn_k_norm"])
    return (g.rope_heads(q), g.rope_heads(k), v) if rope else (q, k, v)


def kv_shape(c) -> tuple[int, int, int]:
    """(KV heads, K dims, V dims) of the ggml cache."""
    return c.n_head_kv, c.head_dim, c.head_dim


def build_layer(g, l: int, L: dict, x, qkv=ggml_qkv):
    """A pre-norm decoder layer: attention (inputs from `qkv`), residual, FFN norm, dense or MoE FFN, residual."""
    h = g.build_norm(x, L["attn_norm"])
    x = g.residual(l, g.build_attn(l, L, *qkv(g, L, h)), x)
    h = g.build_norm(x, L["ffn_norm"] if "ffn_norm" in L else L["post_attention_norm"])
    if "ffn_gate_inp" not in L:
        return g.add(g.build_ffn(L["ffn_gate"], L["ffn_up"], L["ffn_down"], h), x)
    return g.build_moe_ffn(l, L, h, x)
