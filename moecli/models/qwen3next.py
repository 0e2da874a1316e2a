"""qwen3next / qwen35moe: Qwen3-Next-80B-A3B and Qwen3.5 / Qwen3.6 MoE (GGUF "qwen3next", "qwen35moe"), as
llama.cpp computes them.

Hybrid layers: every `full_attention_interval`-th layer (l + 1 divisible by it) is gated full attention, the others
Gated DeltaNet (linear attention with a recurrent state in place of a KV cache). Every layer: attn_norm, mixer,
residual, post_attention_norm, MoE (softmax top-k renormalised, one shared expert behind a sigmoid gate),
residual.

- Gated attention: attn_q gives query and gate interleaved per head [q_h | g_h], per-head q/k RMSNorm, RoPE on the
  first rope.dimension_count dims (NEOX; qwen35moe: IMRoPE with rope.dimension_sections, which for text positions
  rotates exactly like NEOX over the sections' pairs), softmax attention, times sigmoid(gate), attn_output.
- Gated DeltaNet: q/k/v (+ z, the output gate) and b/a projections (qwen3next: fused ssm_in + ssm_ba, grouped per
  k head; qwen35moe: attn_qkv, attn_gate, ssm_beta, ssm_alpha), a causal depthwise conv of ssm.conv_kernel over
  q|k|v (its last kernel-1 inputs kept), SiLU, L2-normalised q and k, beta = sigmoid(b), per-head decay
  g = softplus(a + dt_bias) * ssm_a, then per head the gated delta rule
      S <- S * exp(g);  S <- S + k (beta (v - S^T k))^T;  o = S^T q / sqrt(d)
  (the state S [d_k, d_v] carried across calls), RMSNorm(o) * silu(z), ssm_out. A v head reads k head h // r
  (qwen3next's repeat-interleave) or h % H_k (qwen35moe: ggml_gated_delta_net's own broadcast).
The ggml graph uses ggml_ssm_conv and ggml_gated_delta_net, llama.cpp's fused path (bit for bit); the torch engine
runs the same math recurrently (DeltaNet.torch_*).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.tensor import T as QT, TensorData
from moecli.kernels import ggml as G
from moecli.models import spec as S
from moecli.models.common import ATTN_NAMES, EXPERT_NAMES, FLOAT_ELEMENTS, ggml_tensor_of, gguf_common, \
    gguf_metadata, hf_common, synth_common
from moecli.models.config import ExpertStack
from moecli.models.layers import KVCache, attend, begin_recurrent, rms_norm, to_torch
from moecli.models.transformer import Transformer

T_F32 = 0  # GGML_TYPE_F32
_SSM_KEYS = ("conv_kernel", "inner_size", "state_size", "time_step_rank", "group_count")


# ------------------------------------------------------------------------------------------------ config

def _recurrent(n_layer: int, interval: int) -> tuple:
    return tuple(l for l in range(n_layer) if (l + 1) % interval)


def from_gguf(g):
    ssm = {k: int(g.require(f"ssm.{k}")) for k in _SSM_KEYS}
    interval = int(g.arch_get("full_attention_interval", 4) or 4)
    sections = ()
    if g.arch == "qwen35moe":
        sections = tuple(int(x) for x in g.require("rope.dimension_sections"))
        if len(sections) != 4:
            raise UnsupportedError(f"{g.path.name}: rope.dimension_sections needs 4 values, got {len(sections)}")
    if g.arch_get("attention.recurrent_layers") is not None:
        raise UnsupportedError(f"{g.path.name}: attention.recurrent_layers is not supported (full_attention_interval"
                               " only)")
    n_nextn = int(g.arch_get("nextn_predict_layers", 0) or 0)
    n_layer = int(g.require("block_count")) - n_nextn
    c = gguf_common(
        g, n_layer=n_layer, n_nextn_layers=n_nextn, n_ff_exp=int(g.require("expert_feed_forward_length")),
        n_ff_shexp=int(g.require("expert_shared_feed_forward_length")), n_shared=1, shared_expert_gate=True,
        shexp_gate="sigmoid", gating="softmax", norm_topk=True,
        routed_scale=float(g.arch_get("expert_weights_scale", 0.0) or 0.0), qk_norm="head",
        recurrent_layers=_recurrent(n_layer, interval), ssm_conv=ssm["conv_kernel"], ssm_state=ssm["state_size"],
        ssm_groups=ssm["group_count"], ssm_heads=ssm["time_step_rank"], rope_sections=sections)
    _check(c, ssm["inner_size"], g.path.name)
    return c


def _check(c, inner: int, name: str) -> None:
    if not (c.ssm_conv > 1 and c.ssm_state and c.ssm_groups and c.ssm_heads):
        raise UnsupportedError(f"{name}: ssm.* dims must be positive (conv_kernel > 1)")
    if inner != c.ssm_state * c.ssm_heads:
        raise UnsupportedError(f"{name}: ssm.inner_size {inner} != state_size x time_step_rank "
                               f"({c.ssm_state} x {c.ssm_heads}): k and v heads of different sizes")
    if c.ssm_heads % c.ssm_groups:
        raise UnsupportedError(f"{name}: ssm.time_step_rank {c.ssm_heads} is not a multiple of ssm.group_count "
                               f"{c.ssm_groups}")


def interval_of(c) -> int:
    """full_attention_interval back from the layer kinds."""
    attn = [l for l in range(c.n_layer) if l not in c.recurrent_layers]
    return attn[0] + 1 if attn else c.n_layer + 1


def _dims(c):
    """(key heads, value heads, head dim, key width, value width, conv channels)."""
    Hk, Hv, d = c.ssm_groups, c.ssm_heads, c.ssm_state
    return Hk, Hv, d, Hk * d, Hv * d, 2 * Hk * d + Hv * d


def state_shape(c) -> tuple[int, int, int]:
    """The ggml engine's recurrent state: (layers, conv floats, delta-rule floats) per sequence."""
    Hk, Hv, d, _, _, conv = _dims(c)
    return len(c.recurrent_layers), (c.ssm_conv - 1) * conv, d * d * Hv


# ------------------------------------------------------------------------------------------------ tensors

def _rec(c, l) -> bool:
    return l in c.recurrent_layers


def _attn(c, l) -> bool:
    return l not in c.recurrent_layers


def _fused(c, l) -> bool:  # qwen3next's ssm_in / ssm_ba
    return _rec(c, l) and c.arch == "qwen3next"


def _split(c, l) -> bool:  # qwen35moe's attn_qkv / attn_gate / ssm_alpha / ssm_beta
    return _rec(c, l) and c.arch != "qwen3next"


def _t(name, ne, when, init="w"):
    return S.TensorSpec(name, ne, init, when)


SPEC = S.Spec(layer=(
    S.norm("attn_norm.weight"),
    _t("attn_q.weight", lambda c: (c.n_embd, 2 * S.q_width(c)), _attn),
    _t("attn_k.weight", lambda c: (c.n_embd, S.kv_width(c)), _attn),
    _t("attn_v.weight", lambda c: (c.n_embd, S.kv_width(c)), _attn),
    S.norm("attn_q_norm.weight", _attn, lambda c: c.head_dim),
    S.norm("attn_k_norm.weight", _attn, lambda c: c.head_dim),
    _t("attn_output.weight", lambda c: (S.q_width(c), c.n_embd), _attn),
    _t("ssm_in.weight", lambda c: (c.n_embd, 2 * _dims(c)[3] + 2 * _dims(c)[4]), _fused),
    _t("ssm_ba.weight", lambda c: (c.n_embd, 2 * c.ssm_heads), _fused),
    _t("attn_qkv.weight", lambda c: (c.n_embd, _dims(c)[5]), _split),
    _t("attn_gate.weight", lambda c: (c.n_embd, _dims(c)[4]), _split),
    _t("ssm_beta.weight", lambda c: (c.n_embd, c.ssm_heads), _split),
    _t("ssm_alpha.weight", lambda c: (c.n_embd, c.ssm_heads), _split),
    _t("ssm_conv1d.weight", lambda c: (c.ssm_conv, _dims(c)[5]), _rec),
    _t("ssm_dt.bias", lambda c: (c.ssm_heads,), _rec, "bias"),
    _t("ssm_a", lambda c: (c.ssm_heads,), _rec, "ssm_a"),
    S.norm("ssm_norm.weight", _rec, lambda c: c.ssm_state),
    _t("ssm_out.weight", lambda c: (_dims(c)[4], c.n_embd), _rec),
    S.norm("post_attention_norm.weight"),
    *S.moe(),
    *S.shared_expert(),
), globals=S.GLOBALS)


# ------------------------------------------------------------------------------------------------ ggml graph

def kv_shape(c) -> tuple[int, int, int]:
    return c.n_head_kv, c.head_dim, c.head_dim


def build_layer(g, l: int, L: dict, x):
    """llama.cpp's qwen3next / qwen35moe layer: attn_norm, DeltaNet or gated attention, residual,
    post_attention_norm, MoE + gated shared expert, residual."""
    h = g.build_norm(x, L["attn_norm"])
    mix = _ggml_deltanet(g, l, L, h) if l in g.c.recurrent_layers else _ggml_attention(g, l, L, h)
    x = g.residual(l, mix, x)
    return g.build_moe_ffn(l, L, g.build_norm(x, L["post_attention_norm"]), x)


def _ggml_attention(g, l, L, h):
    p, c, n = g.p, g.c, g.n
    hd, H = c.head_dim, c.n_head
    qg = G.ggml_reshape_3d(p, g.linear(L["attn_q"], h), 2 * hd, H, n)  # [q_h | gate_h] per head
    q = G.ggml_view_3d(p, qg, hd, H, n, qg.contents.nb[1], qg.contents.nb[2], 0)
    gate = G.ggml_view_3d(p, qg, hd, H, n, qg.contents.nb[1], qg.contents.nb[2], hd * 4)
    k = g.heads(g.linear(L["attn_k"], h), hd, c.n_head_kv)
    v = g.linear(L["attn_v"], h)
    q, k = g.build_norm(q, L["attn_q_norm"]), g.build_norm(k, L["attn_k_norm"])
    q, k = g.rope_heads(q), g.rope_heads(k)
    return g.build_attn(l, L, q, k, v, gate=G.ggml_cont_2d(p, gate, hd * H, n))


def _ggml_projections(g, L, h):
    """qkv [conv channels, n], z [v width, n], beta [1, Hv, n], alpha [Hv, n], as llama.cpp's build_qkvz and the
    b/a split (qwen3next's fused tensors are grouped per k head: [q | k | v_r | z_r] and [b_r | a_r])."""
    p, c, n = g.p, g.c, g.n
    Hk, Hv, d, kw, vw, _ = _dims(c)
    if "ssm_in" not in L:
        qkv, z = g.linear(L["attn_qkv"], h), g.linear(L["attn_gate"], h)
        beta = G.ggml_sigmoid(p, G.ggml_reshape_3d(p, g.linear(L["ssm_beta"], h), 1, Hv, n))
        return qkv, z, beta, g.linear(L["ssm_alpha"], h)
    r = Hv // Hk
    m = G.ggml_reshape_3d(p, g.linear(L["ssm_in"], h), 2 * d + 2 * d * r, Hk, n)
    nb1, nb2 = m.contents.nb[1], m.contents.nb[2]
    part = lambda w, off: G.ggml_view_3d(p, m, w, Hk, n, nb1, nb2, off * 4)  # noqa: E731
    q, k, v, z = part(d, 0), part(d, d), part(d * r, 2 * d), part(d * r, 2 * d + d * r)
    z = G.ggml_cont(p, z)
    qkv = G.ggml_concat(p, G.ggml_concat(p, G.ggml_cont_2d(p, q, kw, n), G.ggml_cont_2d(p, k, kw, n), 0),
                        G.ggml_cont_2d(p, v, vw, n), 0)
    ba = G.ggml_reshape_3d(p, g.linear(L["ssm_ba"], h), 2 * r, Hk, n)
    nb1, nb2 = ba.contents.nb[1], ba.contents.nb[2]
    b = G.ggml_cont(p, G.ggml_view_3d(p, ba, r, Hk, n, nb1, nb2, 0))
    a = G.ggml_cont_2d(p, G.ggml_view_3d(p, ba, r, Hk, n, nb1, nb2, r * 4), Hv, n)
    return qkv, z, G.ggml_reshape_3d(p, G.ggml_sigmoid(p, b), 1, Hv, n), a


def _ggml_deltanet(g, l, L, h):
    """The DeltaNet mixer: projections over the whole batch, then per sequence its conv and delta rule on its own
    state (read from and written back into its cache), the outputs side by side in batch order."""
    p, c, W, n = g.p, g.c, g.W, g.n
    Hk, Hv, d, kw, vw, ch = _dims(c)
    K = c.ssm_conv
    qkv, z, beta, alpha = _ggml_projections(g, L, h)
    gate = G.ggml_mul(p, G.ggml_softplus(p, G.ggml_add(p, alpha, W(L["ssm_dt.bias"]))), W(L["ssm_a"]))  # [Hv, n]
    slot = c.recurrent_layers.index(l)
    eps = c.rms_eps
    outs = []
    for si, s in enumerate(g.att_seqs):
        n_i, off, cache = s["n"], s["off"], s["cache"]
        conv_row, ssm_row = cache.conv.shape[1] * 4, cache.ssm.shape[1] * 4
        conv_ptr, ssm_ptr = cache.conv.data_ptr() + slot * conv_row, cache.ssm.data_ptr() + slot * ssm_row
        x = qkv if g.single else G.ggml_view_2d(p, qkv, ch, n_i, ch * 4, off * ch * 4)
        # the convolution over the kept K-1 inputs and these, and the last K-1 of them kept for the next call
        state = g.ctx.tensor(T_F32, K - 1, ch, data=conv_ptr)
        xin = G.ggml_concat(p, state, G.ggml_transpose(p, G.ggml_reshape_3d(p, x, ch, n_i, 1)), 0)
        last = G.ggml_view_3d(p, xin, K - 1, ch, 1, xin.contents.nb[1], xin.contents.nb[2], n_i * 4)
        dst = g.ctx.tensor(T_F32, (K - 1) * ch, 1, data=conv_ptr)
        g.stores.append((dst, G.ggml_cpy(p, last, dst), conv_ptr, 0, si))
        co = G.ggml_silu(p, G.ggml_ssm_conv(p, xin, W(L["ssm_conv1d"])))  # [ch, n_i, 1]
        view = lambda w, heads, o: G.ggml_view_4d(p, co, w, heads, n_i, 1, w * 4, ch * 4, ch * 4 * n_i,  # noqa
                                                  o * 4)
        q, k, v = view(d, Hk, 0), view(d, Hk, kw), view(d, Hv, 2 * kw)
        q, k = _l2_norm(p, q, d, eps), _l2_norm(p, k, d, eps)
        if c.arch == "qwen3next" and Hk != Hv:  # repeat-interleave the k heads (llama.cpp's qwen3next graph)
            r = Hv // Hk
            q, k = (G.ggml_reshape_4d(p, G.ggml_repeat_4d(p, G.ggml_reshape_4d(p, t, d, 1, Hk, n_i), d, r, Hk, n_i),
                                      d, Hv, n_i, 1) for t in (q, k))
        g_i = gate if g.single else G.ggml_view_2d(p, gate, Hv, n_i, Hv * 4, off * Hv * 4)
        b_i = beta if g.single else G.ggml_view_3d(p, beta, 1, Hv, n_i, 4, Hv * 4, off * Hv * 4)
        S0 = g.ctx.tensor(T_F32, d, d, Hv, data=ssm_ptr)
        gdn = G.ggml_gated_delta_net(p, q, k, v, G.ggml_reshape_4d(p, g_i, 1, Hv, n_i, 1),
                                     G.ggml_reshape_4d(p, b_i, 1, Hv, n_i, 1), S0, 1)
        outs.append(G.ggml_view_4d(p, gdn, d, Hv, n_i, 1, d * 4, d * Hv * 4, d * Hv * n_i * 4, 0))
        new = G.ggml_view_2d(p, gdn, d * d * Hv, 1, d * d * Hv * 4, d * Hv * n_i * 4)
        dst = g.ctx.tensor(T_F32, d * d * Hv, 1, data=ssm_ptr)
        g.stores.append((dst, G.ggml_cpy(p, new, dst), ssm_ptr, 0, si))
    o = outs[0]
    for t in outs[1:]:
        o = G.ggml_concat(p, o, t, 2)
    o = G.ggml_mul(p, g.build_norm(o, L["ssm_norm"]), G.ggml_silu(p, G.ggml_reshape_4d(p, z, d, Hv, n, 1)))
    return g.linear(L["ssm_out"], G.ggml_reshape_2d(p, o, vw, n))


def _l2_norm(p, x, d: int, eps: float):
    """llama.cpp's build_gdn_l2_norm: rms_norm with eps / d, scaled by 1/sqrt(d) (float32 arithmetic, as in C)."""
    return G.ggml_scale(p, G.ggml_rms_norm(p, x, float(np.float32(eps) / np.float32(d))),
                        float(np.float32(1) / np.sqrt(np.float32(d))))


# ------------------------------------------------------------------------------------------------ torch engine

class Layer:
    """One layer's tensors on the device: norms, the mixer's (gated attention or DeltaNet), the MoE's."""

    def __init__(self, ckpt, spec, l: int, device, linear):
        T = S.layer_tensors(ckpt, spec, l)
        dev = lambda k: to_torch(T[k], device)  # noqa: E731
        self.attn_norm, self.ffn_norm = dev("attn_norm"), dev("post_attention_norm")
        self.recurrent = "ssm_out" in T
        if self.recurrent:
            self.proj = {k: linear(T[k]) for k in ("ssm_in", "ssm_ba", "attn_qkv", "attn_gate", "ssm_beta",
                                                   "ssm_alpha") if k in T}
            self.conv = dev("ssm_conv1d")  # [channels, kernel]
            self.dt_bias, self.ssm_a, self.ssm_norm = dev("ssm_dt.bias"), dev("ssm_a"), dev("ssm_norm")
            self.ssm_out = linear(T["ssm_out"])
        else:
            self.q, self.k, self.v, self.o = (linear(T[f"attn_{p}"]) for p in ("q", "k", "v", "output"))
            self.q_norm, self.k_norm = dev("attn_q_norm"), dev("attn_k_norm")
        self.router, self.exp_bias, self.ffn = linear(T["ffn_gate_inp"]), None, None
        self.shared = tuple(linear(T[f"ffn_{p}_shexp"]) for p in ("gate", "up", "down"))
        self.shared_gate = dev("ffn_gate_inp_shexp").reshape(-1)


class RecurrentCache(KVCache):
    """The torch engine's cache: K/V of the attention layers, conv inputs [layer, kernel-1, channels] and delta
    states [layer, v head, d_k, d_v] of the DeltaNet layers (GgmlKVCache.begin's rule)."""

    def __init__(self, c, n_ctx: int, device, dtype=None):
        super().__init__(c.n_layer - len(c.recurrent_layers), n_ctx, c.n_head_kv, c.head_dim, device, dtype)
        Hk, Hv, d, _, _, ch = _dims(c)
        self.conv = torch.zeros(len(c.recurrent_layers), c.ssm_conv - 1, ch, device=device)
        self.ssm = torch.zeros(len(c.recurrent_layers), Hv, d, d, device=device)
        self.state_pos = 0

    @property
    def nbytes(self) -> int:
        return super().nbytes + (self.conv.numel() + self.ssm.numel()) * 4

    begin = begin_recurrent


class Qwen3Next(Transformer):
    """The torch decoder: gated attention and Gated DeltaNet layers (plain torch: the conv as K shifted products,
    the delta rule token by token, float32 state)."""
    LAYER = Layer

    def __init__(self, ckpt, device, experts, linear=None, max_ctx=None):
        super().__init__(ckpt, device, experts, linear, max_ctx)
        c = self.config
        self.kv_slot = {l: i for i, l in enumerate(l for l in range(c.n_layer) if l not in c.recurrent_layers)}
        if c.rope_sections:  # IMRoPE on text: pairs outside the three text sections keep position 0 (no rotation)
            s, keep = c.rope_sections, []
            for i in range(c.rope_dim // 2):
                sec = i % sum(s)
                keep.append(sec % 3 == 1 and sec < 3 * s[1] or sec % 3 == 2 and sec < 3 * s[2]
                            or sec % 3 == 0 and sec < 3 * s[0])
            off = ~torch.tensor(keep, device=self.device)
            self.rope.cos[:, off], self.rope.sin[:, off] = 1.0, 0.0

    def new_cache(self, n_ctx=None, dtype=None):
        if self.fused_forward is not None:
            return self.fused_forward.new_cache(n_ctx)
        return RecurrentCache(self.config, min(n_ctx or self.max_ctx, self.max_ctx), self.device, dtype)

    @torch.inference_mode()
    def forward(self, tokens, cache, all_logits: bool = True):
        if self.fused_forward is None:
            cache.begin(cache.pos)
        out = super().forward(tokens, cache, all_logits)
        cache.state_pos = cache.pos
        return out

    def attention_block(self, l, layer, x, pos, cache, start: int):
        eps = self.config.rms_eps
        h = rms_norm(x, layer.attn_norm, eps)
        x = x + (self.deltanet(l, layer, h, cache) if layer.recurrent else self.attention(l, layer, h, pos, cache,
                                                                                              start))
        return x, rms_norm(x, layer.ffn_norm, eps)

    def attention(self, l, layer, h, pos, cache, start: int):
        c, n = self.config, h.shape[0]
        hd = c.head_dim
        qg = layer.q(h).view(n, c.n_head, 2 * hd)
        q, gate = rms_norm(qg[..., :hd], layer.q_norm, c.rms_eps), qg[..., hd:].reshape(n, -1)
        k = rms_norm(layer.k(h).view(n, c.n_head_kv, hd), layer.k_norm, c.rms_eps)
        q, k = self.rope(q, pos), self.rope(k, pos)
        s = self.kv_slot[l]
        cache.k[s, start:start + n] = k
        cache.v[s, start:start + n] = layer.v(h).view(n, c.n_head_kv, hd)
        out = attend(q, cache.k[s, :start + n], cache.v[s, :start + n], start).float()
        return layer.o(out * torch.sigmoid(gate))

    def deltanet(self, l, layer, h, cache):
        c, n = self.config, h.shape[0]
        qkv, z, beta, g = self._projections(layer, h)
        slot = c.recurrent_layers.index(l)
        conv, S_ = torch_conv(cache.conv[slot], qkv, layer.conv)
        cache.conv[slot] = conv
        Hk, Hv, d, kw, vw, _ = _dims(c)
        q, k, v = S_[:, :kw].view(n, Hk, d), S_[:, kw:2 * kw].view(n, Hk, d), S_[:, 2 * kw:].view(n, Hv, d)
        heads = torch.arange(Hv, device=h.device)
        heads = heads // (Hv // Hk) if c.arch == "qwen3next" else heads % Hk
        q, k = l2_norm(q, c.rms_eps)[:, heads], l2_norm(k, c.rms_eps)[:, heads]
        o, cache.ssm[slot] = torch_delta_rule(q, k, v, g, beta, cache.ssm[slot])
        o = rms_norm(o, layer.ssm_norm, c.rms_eps) * F.silu(z.view(n, Hv, d))
        return layer.ssm_out(o.reshape(n, vw))

    def _projections(self, layer, h):
        """qkv [n, channels], z [n, v width], beta [n, Hv], g [n, Hv] (the log-decay)."""
        c, n, P = self.config, h.shape[0], layer.proj
        Hk, Hv, d, kw, vw, _ = _dims(c)
        if "ssm_in" in P:  # grouped per k head: [q | k | v_r | z_r], [b_r | a_r]
            r = Hv // Hk
            m = P["ssm_in"](h).view(n, Hk, 2 * d + 2 * d * r)
            qkv = torch.cat([m[..., :d].reshape(n, kw), m[..., d:2 * d].reshape(n, kw),
                             m[..., 2 * d:2 * d + d * r].reshape(n, vw)], -1)
            z = m[..., 2 * d + d * r:].reshape(n, vw)
            ba = P["ssm_ba"](h).view(n, Hk, 2 * r)
            b, a = ba[..., :r].reshape(n, Hv), ba[..., r:].reshape(n, Hv)
        else:
            qkv, z, b, a = P["attn_qkv"](h), P["attn_gate"](h), P["ssm_beta"](h), P["ssm_alpha"](h)
        return qkv, z, torch.sigmoid(b), F.softplus(a + layer.dt_bias) * layer.ssm_a


def torch_conv(state: torch.Tensor, x: torch.Tensor, w: torch.Tensor):
    """ggml_ssm_conv + SiLU: state [K-1, C] (the previous inputs), x [n, C], w [C, K] -> (new state, y [n, C])."""
    K, n = w.shape[1], x.shape[0]
    xs = torch.cat([state, x])  # [K-1+n, C]
    y = sum(xs[j:j + n] * w[:, j] for j in range(K))
    return xs[n:].clone(), F.silu(y)


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the last dim (llama.cpp: rms_norm with eps / d, times 1/sqrt(d))."""
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def torch_delta_rule(q, k, v, g, beta, S0):
    """The gated delta rule, token by token: q, k, v [n, H, d], g, beta [n, H], S0 [H, d_k, d_v] -> (o [n, H, d_v],
    final state)."""
    s, out = S0.clone(), torch.empty_like(v)
    scale = q.shape[-1] ** -0.5
    for t in range(q.shape[0]):
        s = s * torch.exp(g[t])[:, None, None]
        delta = (v[t] - torch.einsum("hij,hi->hj", s, k[t])) * beta[t][:, None]
        s = s + k[t][:, :, None] * delta[:, None, :]
        out[t] = torch.einsum("hij,hi->hj", s, q[t]) * scale
    return out, s


TRANSFORMER = Qwen3Next


# ------------------------------------------------------------------------------------------------ Hugging Face

_L = r"model\.(?:language_model\.)?layers\.(\d+)\."  # Qwen3.5's multimodal checkpoints nest the text model
_LA = _L + r"linear_attn\."
HF_NAMES = [(p.replace(r"model\.", r"model\.(?:language_model\.)?", 1), t) for p, t in ATTN_NAMES + EXPERT_NAMES
            if "post_attention" not in p] + [
    (_L + r"post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
    (_LA + r"in_proj_qkvz\.weight", r"blk.\1.ssm_in.weight"),  # Qwen3-Next: grouped per k head, as ssm_in
    (_LA + r"in_proj_ba\.weight", r"blk.\1.ssm_ba.weight"),
    (_LA + r"in_proj_qkv\.weight", r"blk.\1.attn_qkv.weight"),  # Qwen3.5: separate projections
    (_LA + r"in_proj_z\.weight", r"blk.\1.attn_gate.weight"),
    (_LA + r"in_proj_b\.weight", r"blk.\1.ssm_beta.weight"),
    (_LA + r"in_proj_a\.weight", r"blk.\1.ssm_alpha.weight"),
    (_LA + r"conv1d\.weight", r"blk.\1.ssm_conv1d.weight"),
    (_LA + r"dt_bias", r"blk.\1.ssm_dt.bias"),
    (_LA + r"A_log", r"blk.\1.ssm_a"),
    (_LA + r"norm\.weight", r"blk.\1.ssm_norm.weight"),
    (_LA + r"out_proj\.weight", r"blk.\1.ssm_out.weight"),
    (_L + r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (_L + r"mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
]  # the multi-token-prediction head (mtp.*) and the vision tower (model.visual.*) match nothing: skipped
_KINDS = ("linear_attention", "full_attention")


def from_hf(cfg: dict):
    """Qwen3-Next (`qwen3_next`) and Qwen3.5 / 3.6 MoE (`qwen3_5_moe_text`, the text model of `qwen3_5_moe`)
    config.json, as transformers computes them (modeling_qwen3_next / modeling_qwen3_5_moe)."""
    arch = "qwen3next" if cfg.get("model_type") == "qwen3_next" else "qwen35moe"
    try:
        n_layer, n_embd, n_head = (int(cfg[k]) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
        head_dim = int(cfg.get("head_dim") or n_embd // n_head)
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))  # transformers' default
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise MoecliError(f"config.json: partial_rotary_factor {factor!r} is not a number in (0, 1]")
        rope_dim = int(head_dim * factor)
        interval = cfg.get("full_attention_interval") or 4
        if interval < 1:
            raise MoecliError(f"config.json: full_attention_interval {interval} must be positive")
        types = cfg.get("layer_types") or [_KINDS[(l + 1) % interval == 0] for l in range(n_layer)]
        if len(types) != n_layer or any(t not in _KINDS for t in types):
            raise UnsupportedError(f"config.json: layer_types must be {n_layer} of {' / '.join(_KINDS)}, got "
                                   f"{str(types)[:60]}")
        for k in ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                  "linear_num_value_heads"):
            if k in cfg and not 1 <= cfg[k] <= 1 << 20:
                raise MoecliError(f"config.json: {k} = {cfg[k]} is out of range")
        k_dim, v_dim = int(cfg.get("linear_key_head_dim", 128)), int(cfg.get("linear_value_head_dim", 128))
        if k_dim != v_dim:
            raise UnsupportedError(f"config.json: linear_key_head_dim {k_dim} != linear_value_head_dim {v_dim} "
                                   "(the DeltaNet state must be square)")
        _refuse_hf(cfg, arch)
        sections = ()
        if arch == "qwen35moe":  # text positions rotate every pair alike, whatever the split: keep the file's
            half, mrope = rope_dim // 2, list(rope.get("mrope_section") or [])
            ok = len(mrope) == 3 and all(type(x) is int for x in mrope) and sum(mrope) == half
            sections = (*mrope, 0) if ok else \
                (half - 2 * (half // 3), half // 3, half // 3, 0)
        c = hf_common(
            cfg, arch, n_expert=int(cfg["num_experts"]), n_expert_used=int(cfg["num_experts_per_tok"]),
            n_ff_exp=int(cfg["moe_intermediate_size"]), n_ff_shexp=int(cfg["shared_expert_intermediate_size"]),
            n_shared=1, shared_expert_gate=True, shexp_gate="sigmoid", gating="softmax",
            norm_topk=bool(cfg.get("norm_topk_prob", True)), qk_norm="head", rope_dim=rope_dim,
            recurrent_layers=tuple(l for l, t in enumerate(types) if t == "linear_attention"),
            ssm_conv=int(cfg.get("linear_conv_kernel_dim", 4)), ssm_state=k_dim,
            ssm_groups=int(cfg.get("linear_num_key_heads", 16)), ssm_heads=int(cfg.get("linear_num_value_heads", 32)),
            rope_sections=sections)
    except KeyError as e:
        raise MoecliError(f"config.json lacks {e.args[0]}") from None
    _check(c, c.ssm_state * c.ssm_heads, "config.json")
    return c


def _refuse_hf(cfg: dict, arch: str) -> None:
    """What transformers can compute and these layers cannot: one error each."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"config.json: hidden_act {cfg['hidden_act']!r} is not supported (silu only)")
    if cfg.get("attention_bias"):
        raise UnsupportedError("config.json: attention_bias is not supported for qwen3next / qwen35moe")
    if cfg.get("attn_output_gate") is False:
        raise UnsupportedError("config.json: attn_output_gate false is not supported (gated attention only)")
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
        raise UnsupportedError("config.json: dense layers (mlp_only_layers / decoder_sparse_step) are not supported")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if arch == "qwen35moe" and "mrope_section" in rope and not isinstance(rope["mrope_section"], list):
        raise MoecliError(f"config.json: mrope_section {rope['mrope_section']!r} is not a list")


def _f32(name: str, a) -> TensorData:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return ggml_tensor_of(name, QT.F32, tuple(reversed(a.shape)), a)


def hf_tensors(t: dict, c) -> dict:
    """transformers' values -> the ones the GGUF side holds (what llama.cpp's convert_hf_to_gguf.py writes): the
    zero-centred RMSNorm weights w as 1 + w (all but the gated ssm_norm), A_log as ssm_a = -exp(A_log), the conv
    weight [C, 1, K] as {K, C}, these small tensors in float32 (ggml_ssm_conv takes no other); and Qwen3.5's value
    heads from transformers' grouped order (v head h reads k head h // r) to the tiled one ggml_gated_delta_net
    broadcasts to (h % H_k). Shapes that disagree are left for the loader's validation to name."""
    out = dict(t)

    def f32(name, fn=lambda x: x):
        if name in out:
            out[name] = _f32(name, fn(torch.from_numpy(out[name].numpy()).float()))

    f32("output_norm.weight", lambda w: w + 1.0)
    for l in range(c.n_layer):
        for k in ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm"):
            f32(f"blk.{l}.{k}.weight", lambda w: w + 1.0)
    Hk, Hv, d, kw, vw, ch = _dims(c)
    r = Hv // Hk
    perm = np.array([(j % Hk) * r + j // Hk for j in range(Hv)])  # GGUF v head j <- transformers' perm[j]
    for l in c.recurrent_layers:
        b = f"blk.{l}."
        conv = out.get(b + "ssm_conv1d.weight")
        if conv is not None and len(conv.ne) == 3 and conv.ne[1] == 1:
            out[b + "ssm_conv1d.weight"] = TensorData(conv.name, conv.type, (conv.ne[0], conv.ne[2]), conv.raw)
        f32(b + "ssm_a", lambda a: -a.exp())
        for k in ("ssm_conv1d.weight", "ssm_dt.bias", "ssm_norm.weight"):
            f32(b + k)
        if c.arch != "qwen35moe" or r == 1:
            continue
        for key, ne, axis, start, width in (
                ("attn_qkv.weight", (c.n_embd, ch), 0, 2 * kw, d),
                ("ssm_conv1d.weight", (c.ssm_conv, ch), 0, 2 * kw, d), ("attn_gate.weight", (c.n_embd, vw), 0, 0, d),
                ("ssm_beta.weight", (c.n_embd, Hv), 0, 0, 1), ("ssm_alpha.weight", (c.n_embd, Hv), 0, 0, 1),
                ("ssm_dt.bias", (Hv,), 0, 0, 1), ("ssm_a", (Hv,), 0, 0, 1),
                ("ssm_out.weight", (vw, c.n_embd), 1, 0, d)):
            w = out.get(b + key)
            if w is not None and tuple(w.ne) == ne and w.type in FLOAT_ELEMENTS:
                out[b + key] = _heads_tiled(w, perm, axis, start, width)
    return out


def _heads_tiled(w: TensorData, perm, axis: int, start: int, width: int) -> TensorData:
    """w with the `width`-wide head blocks from `start` along numpy `axis` reordered by perm (a copy)."""
    a = w.raw.view(FLOAT_ELEMENTS[w.type]).reshape(w.shape)
    idx = np.arange(a.shape[axis])
    idx[start:start + len(perm) * width] = (start + perm[:, None] * width + np.arange(width)).reshape(-1)
    moved = np.ascontiguousarray(np.take(a, idx, axis=axis))
    return TensorData(w.name, w.type, w.ne, moved.reshape(-1).view(np.uint8))


def hf_experts(m, c) -> dict:
    """The released Qwen3.5 / 3.6 checkpoints' fused experts, per layer mlp.experts.gate_up_proj [E, 2 ff, d] (gate
    rows, then up rows) and down_proj [E, d, ff], as zero-copy per-expert views (ggml layouts already: rows of d,
    rows of ff; unlike gpt-oss / Llama 4's [E, in, out], nothing to transpose or copy). transformers' save_pretrained
    writes per-expert tensors instead (the loader's EXPERT_NAMES)."""
    out = {}
    for l in range(c.n_layer):
        for prefix in (f"model.language_model.layers.{l}.mlp.experts.", f"model.layers.{l}.mlp.experts."):
            gate_up, down = m.tensors.get(prefix + "gate_up_proj"), m.tensors.get(prefix + "down_proj")
            if gate_up is not None or down is not None:
                break
        else:
            continue
        ff, d, E = c.n_ff_exp, c.n_embd, c.n_expert
        if gate_up is None or down is None or tuple(gate_up.ne) != (d, 2 * ff, E) or tuple(down.ne) != (ff, d, E):
            raise MoecliError(f"{m.path.name}: {prefix}gate_up_proj / down_proj must be [{E}, {2 * ff}, {d}] and "
                              f"[{E}, {d}, {ff}], got {None if gate_up is None else list(gate_up.shape)} and "
                              f"{None if down is None else list(down.shape)}")
        rows = gate_up.row_bytes * ff  # one expert's gate (or up) block
        part = lambda e, k: TensorData(f"{gate_up.name}[{e}]", gate_up.type, (d, ff),  # noqa: E731
                                       gate_up.raw[(2 * e + k) * rows:(2 * e + k + 1) * rows])
        b = f"blk.{l}."
        out[b + "ffn_gate_exps"] = ExpertStack(experts=[part(e, 0) for e in range(E)])
        out[b + "ffn_up_exps"] = ExpertStack(experts=[part(e, 1) for e in range(E)])
        out[b + "ffn_down_exps"] = ExpertStack(stacked=down)
    return out


# ------------------------------------------------------------------------------------------------ synthetic

ARCHS = ("qwen3next", "qwen35moe")  # the GGUF architectures this file reads and writes


def synth_config(d, arch: str = "qwen3next"):
    """moecli.synth.SynthDims as the config its file loads into (n_ff: routed expert FFN, n_ff_shexp the shared
    one). `extra`: ("interval", 4),
    ("ssm_state", head dim), ("ssm_groups", k heads), ("ssm_heads", v heads), ("ssm_conv", 4), ("rope_dim", n),
    ("rope_sections", (s0, s1, s2, s3)) (qwen35moe; default all rotary pairs in the first three)."""
    x = dict(d.extra)
    interval = x.pop("interval", 4)
    rope_dim = x.pop("rope_dim", d.head_dim)
    sections = tuple(x.pop("rope_sections", ()))
    if arch == "qwen35moe" and not sections:
        half = rope_dim // 2
        sections = (half - 2 * (half // 3), half // 3, half // 3, 0)
    return synth_common(d, arch, n_ff_shexp=d.n_ff_shexp, n_shared=1, shared_expert_gate=True, shexp_gate="sigmoid",
                        gating="softmax", norm_topk=True, qk_norm="head", rope_dim=rope_dim,
                        recurrent_layers=_recurrent(d.n_layer, interval), ssm_conv=x.pop("ssm_conv", 4),
                        ssm_state=x.pop("ssm_state", d.head_dim), ssm_groups=x.pop("ssm_groups", d.n_head_kv),
                        ssm_heads=x.pop("ssm_heads", d.n_head), rope_sections=sections, **x)


def to_gguf(c) -> dict:
    m = dict(expert_feed_forward_length=c.n_ff_exp, expert_shared_feed_forward_length=c.n_ff_shexp,
             full_attention_interval=interval_of(c), **{"ssm.conv_kernel": c.ssm_conv,
                                                        "ssm.inner_size": c.ssm_state * c.ssm_heads,
                                                        "ssm.state_size": c.ssm_state,
                                                        "ssm.time_step_rank": c.ssm_heads,
                                                        "ssm.group_count": c.ssm_groups})
    if c.arch == "qwen35moe":
        m["rope.dimension_sections"] = list(c.rope_sections)
    return gguf_metadata(c, **m)
