"""The graph-building context of the ggml engine (llama.cpp's llm_graph_context): the blocks every architecture's
graph is made of, so that a family's builder (`build_layer` in models/<arch>.py) is a few lines of its own math.

  build_norm      RMSNorm times its weight
  linear          x W (+ b)
  build_ffn       SwiGLU FFN (dense layers, shared experts)
  build_attn      K/V into llama.cpp's F32 cache layout, then flash or non-flash attention over n_kv keys (causal or
                  sliding-window mask, attention sinks, MLA's latent values and per-head v_b), then the output
                  projection
  residual        the attention's residual add, cut to the last token in the last layer when only it is wanted
  build_moe_ffn   llama.cpp's build_moe_ffn: router (+ bias), softmax / sigmoid / softmax-of-top-k gating, selection
                  bias and grouped top-k, weights renormalised and scaled, gate/up `mul_mat_id`, SwiGLU (or gpt-oss's
                  clamped one, expert biases), down, the weighted sum in slot order, the shared expert; then the
                  residual. Split mode ends a graph segment at the routing instead (the experts then run outside).

The KV cache: K [layer, pos, kv_head, dim] and V transposed [layer, kv_head, v_dim, pos], float32; its stores are
views re-pointed at the current position before each run (`stores`). A graph may hold several sequences, each with
its own cache (continuous batching): every matmul runs over the whole batch, only the attention is per sequence.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from moecli.kernels import ggml as G
from moecli.models.config import OAI_ALPHA, OAI_LIMIT, ModelConfig

T = GGMLQuantizationType
SEGMENT_NODES = 256  # graph size of one layer's segment in split mode (a layer has ~60 nodes)


class GraphBuilder:
    """One forward graph of n tokens over n_kv cached keys. `W` maps a checkpoint tensor to its ggml tensor."""

    def __init__(self, ctx: G.Ctx, c: ModelConfig, W, rope, *, seqs, kv_shape, flash: bool, all_logits: bool,
                 split: bool, attn_v_dim: int):
        """`seqs`: (cache, n_i, n_kv_i) per sequence of the batch: every matmul runs over all their tokens, the
        attention per sequence over its own cache's first n_kv_i keys (several: continuous batching's decode)."""
        self.ctx, self.p, self.c, self.W, self.rope = ctx, ctx.ptr, c, W, rope
        sizes = [n_i for _, n_i, _ in seqs]
        offsets = np.cumsum([0] + sizes)[:-1].tolist()  # each sequence's first row in the batch
        self.n, self.sizes, self.single = sum(sizes), sizes, len(seqs) == 1
        self.flash, self.all_logits, self.split = flash, all_logits, split
        self.m = self.n  # rows that go on (one per sequence after the last layer's cut)
        self.kv_shape, self.attn_v_dim = kv_shape, attn_v_dim
        self.stores, self.routing, self.segments = [], [], []
        self._seg_stores, self._seg_layer = 0, 0  # split mode: the stores and layers already in a segment
        mask_type, mask_dtype = (T.F16, np.float16) if flash else (T.F32, np.float32)  # ggml's FA takes F16 masks
        self.tokens = np.zeros(self.n, dtype=np.int32)
        self.pos = np.zeros(self.n, dtype=np.int32)
        self.tok_t = ctx.tensor(G.GGML_TYPE_I32, self.n, data=self.tokens.ctypes.data)
        self.pos_t = ctx.tensor(G.GGML_TYPE_I32, self.n, data=self.pos.ctypes.data)
        self.pos4 = None  # IMRoPE's positions: 3 copies of pos, then zeros (llama.cpp's text positions)
        if c.rope_sections:
            self.pos4 = np.zeros(4 * self.n, dtype=np.int32)
            self.pos_t = ctx.tensor(G.GGML_TYPE_I32, 4 * self.n, data=self.pos4.ctypes.data)
        self.rope_factors = self.rope_factors_t = self.attn_scale = self.attn_scale_t = None
        if c.rope_factors:  # rope_freqs.weight, as llama.cpp passes it to every ggml_rope_ext
            self.rope_factors = np.asarray(c.rope_factors, dtype=np.float32)
            self.rope_factors_t = ctx.tensor(T.F32, len(self.rope_factors), data=self.rope_factors.ctypes.data)
        if c.attn_temp_scale:  # llama4's per-token query scale on NoPE layers [1, 1, n], written per run
            self.attn_scale = np.ones(self.n, dtype=np.float32)
            self.attn_scale_t = ctx.tensor(T.F32, 1, 1, self.n, data=self.attn_scale.ctypes.data)
        # per sequence: its mask(s) [n_i, n_kv_i], its cache's K and V, its rows' offset in the batch
        Hkv, hd, dv = kv_shape
        # the cache holds the attention layers only (DeltaNet layers keep a recurrent state instead)
        kv_layers = [l for l in range(c.n_layer) if l not in c.recurrent_layers]
        self.kv_slot = {l: i for i, l in enumerate(kv_layers)}
        self.masks, self.masks_swa, self.att_seqs = [], [], []
        for (cache, n_i, n_kv_i), off in zip(seqs, offsets):
            cap = cache.capacity
            mask = np.zeros((n_i, n_kv_i), dtype=mask_dtype)
            swa = np.zeros((n_i, n_kv_i), dtype=mask_dtype) if c.sliding_window or c.attn_chunk else None
            self.masks.append(mask)
            self.masks_swa.append(swa)
            self.att_seqs.append(dict(
                n=n_i, n_kv=n_kv_i, off=off, cap=cap, cache=cache,
                mask=ctx.tensor(mask_type, n_kv_i, n_i, data=mask.ctypes.data),
                swa=ctx.tensor(mask_type, n_kv_i, n_i, data=swa.ctypes.data) if swa is not None else None,
                kc=ctx.tensor(T.F32, cap * Hkv * hd * max(len(kv_layers), 1), data=cache.k.data_ptr()),
                vc=ctx.tensor(T.F32, cap * Hkv * dv * max(len(kv_layers), 1), data=cache.vt.data_ptr()),
                k_layer=cap * Hkv * hd * 4, v_layer=cap * Hkv * dv * 4))
        # the rows that go on past the last layer: all, or each sequence's last (llama.cpp's out_ids)
        self.out_ids = np.array([off + n_i - 1 for off, n_i in zip(offsets, sizes)], dtype=np.int32)
        self.out_ids_t = ctx.tensor(G.GGML_TYPE_I32, len(seqs), data=self.out_ids.ctypes.data)

    # ------------------------------------------------------------------------------------------------ blocks

    def add(self, a, b):
        return G.ggml_add(self.p, a, b)

    def build_norm(self, a, w):
        return G.ggml_mul(self.p, G.ggml_rms_norm(self.p, a, self.c.rms_eps), self.W(w))

    def linear(self, wb, a):
        """wb: a weight or (weight, bias or None)."""
        w, b = wb if isinstance(wb, tuple) else (wb, None)
        y = G.ggml_mul_mat(self.p, self.W(w), a)
        return G.ggml_add(self.p, y, self.W(b)) if b is not None else y

    def build_ffn(self, gate, up, down, a):
        p, W = self.p, self.W
        return G.ggml_mul_mat(p, W(down), G.ggml_swiglu_split(p, G.ggml_mul_mat(p, W(gate), a),
                                                              G.ggml_mul_mat(p, W(up), a)))

    def heads(self, a, head_dim: int, n_heads: int):
        return G.ggml_reshape_3d(self.p, a, head_dim, n_heads, self.n)

    def rope_heads(self, a, n_dims: int | None = None):
        return self.rope(self.p, a, self.pos_t, n_dims, self.rope_factors_t)

    def embed(self, token_embd):
        # the file's layout: get_rows cannot read a repacked copy (exact mode repacks a tied output head's)
        return G.ggml_get_rows(self.p, G.weight_tensor(token_embd, repacked=False), self.tok_t)

    def output(self, x, output_norm, output):
        logits = G.ggml_mul_mat(self.p, self.W(output), self.build_norm(x, output_norm))
        G.ggml_set_output(logits)
        return logits

    def build_attn(self, l: int, L: dict, q, k, v, gate=None):
        """q [dk, H, n], k [dk, Hkv, n], v [dv * Hkv, n] (None: MLA's latent form, the values are the first
        kv_lora_rank dims of the cached keys and L["attn_v_b"] maps the result back per head) -> attn_output(...).
        Each sequence's K/V stored in its cache (destinations re-pointed at its position per call), then its
        attention over its first n_kv positions as llama.cpp's build_attn_mha; the outputs side by side in batch
        order. `gate` [dv * H, n]: the outputs times its sigmoid before the projection (Qwen3-Next's gated
        attention)."""
        p, c, W = self.p, self.c, self.W
        slot = self.kv_slot[l]
        Hkv, hd, dv = self.kv_shape
        H, out_dim, single, N = c.n_head, self.attn_v_dim, self.single, self.n
        q_row = q.contents.nb[2]
        k2 = G.ggml_reshape_2d(p, k, hd * Hkv, N)
        v2 = G.ggml_reshape_2d(p, v, dv * Hkv, N) if v is not None else None
        outs = []
        for si, s in enumerate(self.att_seqs):
            n, n_kv, off, cap, kc, vc = s["n"], s["n_kv"], s["off"], s["cap"], s["kc"], s["vc"]
            k_layer, v_layer = s["k_layer"], s["v_layer"]
            qs = q if single else G.ggml_view_3d(p, q, q.contents.ne[0], H, n, q.contents.nb[1], q_row, off * q_row)
            ks = k2 if single else G.ggml_view_2d(p, k2, hd * Hkv, n, hd * Hkv * 4, off * hd * Hkv * 4)
            # store K rows (and V columns) at positions start.. (destinations re-pointed per call)
            k_dst = G.ggml_view_2d(p, kc, hd * Hkv, n, hd * Hkv * 4, 0)
            k_store = G.ggml_cpy(p, ks, k_dst)
            self.stores.append((k_dst, k_store, kc.contents.data + slot * k_layer, hd * Hkv * 4, si))
            K = G.ggml_view_3d(p, kc, hd, Hkv, n_kv, hd * 4, hd * Hkv * 4, slot * k_layer)
            if v is None:
                r = c.kv_lora_rank
                Vt = G.ggml_view_3d(p, kc, r, Hkv, n_kv, hd * 4, hd * Hkv * 4, slot * k_layer)
                V = G.ggml_cont(p, G.ggml_transpose(p, G.ggml_permute(p, Vt, 0, 2, 1, 3)))  # [n_kv, r, 1]
            else:
                vs = v2 if single else G.ggml_view_2d(p, v2, dv * Hkv, n, dv * Hkv * 4, off * dv * Hkv * 4)
                v_dst = G.ggml_view_2d(p, vc, n, dv * Hkv, cap * 4, 0)
                v_store = G.ggml_cpy(p, G.ggml_transpose(p, vs), v_dst)
                self.stores.append((v_dst, v_store, vc.contents.data + slot * v_layer, 4, si))
                V = G.ggml_permute(p, G.ggml_view_3d(p, vc, n_kv, Hkv, dv, cap * dv * 4, cap * 4, slot * v_layer),
                                   0, 2, 1, 3)
            qp, Kp = G.ggml_permute(p, qs, 0, 2, 1, 3), G.ggml_permute(p, K, 0, 2, 1, 3)
            mask = s["swa"] if l in c.swa_layers else s["mask"]
            if self.flash:  # V rows [dv, n_kv, Hkv] out of the transposed cache (a copy of n_kv x dv x Hkv floats)
                o = G.ggml_flash_attn_ext(p, qp, Kp, G.ggml_cont(p, G.ggml_transpose(p, V)), mask,
                                          self.rope.kq_scale, 0.0, 0.0)
                if "attn_sinks" in L:
                    G.ggml_flash_attn_ext_add_sinks(o, W(L["attn_sinks"]))
                o = G.ggml_reshape_2d(p, o, out_dim * H, n)  # o is [dv, H, n]
            else:
                kq = G.ggml_soft_max_ext(p, G.ggml_mul_mat(p, Kp, qp), mask, self.rope.kq_scale, 0.0)
                if "attn_sinks" in L:  # gpt-oss: a per-head logit joins every softmax denominator
                    G.ggml_soft_max_add_sinks(kq, W(L["attn_sinks"]))
                kqv = G.ggml_mul_mat(p, V, kq)
                if v is None:  # back from the latent space, per head: v_b [r, dv, H]
                    kqv = G.ggml_mul_mat(p, W(L["attn_v_b"]), kqv)
                o = G.ggml_cont_2d(p, G.ggml_permute(p, kqv, 0, 2, 1, 3), out_dim * H, n)
            outs.append(o)
        out = outs[0]
        for o in outs[1:]:
            out = G.ggml_concat(p, out, o, 1)
        if gate is not None:
            out = G.ggml_mul(p, out, G.ggml_sigmoid(p, gate))
        return self.linear((L["attn_output"], L.get("attn_output.bias")), out)

    def residual(self, l: int, att, inp):
        """att + inp; in the last layer only each sequence's last token goes on unless every token's logits are
        wanted."""
        att, inp = self.kept_rows(l, att), self.kept_rows(l, inp)
        if self.drops_rows(l):
            self.m = len(self.sizes)
        return G.ggml_add(self.p, att, inp)

    def drops_rows(self, l: int) -> bool:
        return l == self.c.n_layer - 1 and not self.all_logits and self.n > len(self.sizes)

    def kept_rows(self, l: int, t):
        """t [w, n] reduced to the rows that go on past the last layer (see residual)."""
        if not self.drops_rows(l):
            return t
        p, n, w = self.p, self.n, t.contents.ne[0]
        if self.single:
            return G.ggml_view_2d(p, t, w, 1, w * 4, (n - 1) * w * 4)
        return G.ggml_get_rows(p, t, self.out_ids_t)

    def build_moe_ffn(self, l: int, L: dict, h, residual, logits=None):
        """experts (+ shared expert) + residual. Split mode: the graph segment ends at the routing and the shared
        expert; the next layer reads x from a buffer the experts' sum is written into (`segments`)."""
        if not self.split:
            return G.ggml_add(self.p, self._moe(l, L, h, logits=logits), residual)
        m, d = self.m, self.c.n_embd
        shared = self._moe(l, L, h, experts=False, logits=logits)
        for t in (residual, h) + ((shared,) if shared is not None else ()):
            G.ggml_set_output(t)
        self.segments.append(self.segment([residual, h, shared, *self.routing[-1][1:]], l, residual, h, shared))
        x_buf = np.zeros((m, d), dtype=np.float32)
        self.segments[-1]["next_x"] = x_buf
        return self.ctx.tensor(T.F32, d, m, data=x_buf.ctypes.data)

    def segment(self, outs, l, ffn_inp=None, h=None, shared=None) -> dict:
        """A graph over the nodes added since the previous segment: the stores of its layers first (leading dense
        layers share the segment of the first MoE layer; nothing else reaches their stores), then `outs`."""
        last = self.c.n_layer if l is None else l
        g = G.Graph(self.ctx, [], SEGMENT_NODES * (last - self._seg_layer + 1))
        self._seg_layer = last + 1
        for _, store, *_ in self.stores[self._seg_stores:]:
            G.ggml_build_forward_expand(g.ptr, store)
        self._seg_stores = len(self.stores)
        for t in outs:
            if t is not None:
                G.ggml_build_forward_expand(g.ptr, t)
        return dict(graph=g, layer=l, m=self.m, ffn_inp=ffn_inp, h=h, shared=shared)

    # ------------------------------------------------------------------------------------------------ MoE

    def _moe(self, l: int, L: dict, h, experts: bool = True, logits=None):
        """Without `experts`: the routing and the shared expert's output only (None without one). `logits`: the
        router's, when it read something else than h (SmallThinker: the layer input)."""
        p, c, W, m = self.p, self.c, self.W, self.m
        E, k, d = c.n_expert, c.n_expert_used, c.n_embd
        if logits is None:
            logits = G.ggml_mul_mat(p, W(L["ffn_gate_inp"]), h)  # [E, m]
        if L.get("ffn_gate_inp.bias") is not None:
            logits = G.ggml_add(p, logits, W(L["ffn_gate_inp.bias"]))
        probs = G.ggml_sigmoid(p, logits) if c.gating == "sigmoid" else G.ggml_soft_max(p, logits)
        if c.gating == "softmax_weight":  # gpt-oss: top-k of the logits, softmax over those k
            sel = G.ggml_argsort_top_k(p, logits, k)
            w = G.ggml_get_rows(p, G.ggml_reshape_3d(p, logits, 1, E, m), sel)
            w = G.ggml_reshape_3d(p, G.ggml_soft_max(p, G.ggml_reshape_2d(p, w, k, m)), 1, k, m)
        else:
            sel = G.ggml_argsort_top_k(p, logits if c.select_logits else self._selection(L, probs), k)  # [k, m]
            w = G.ggml_get_rows(p, G.ggml_reshape_3d(p, probs, 1, E, m), sel)  # [1, k, m]
        if c.norm_topk:
            w2 = G.ggml_reshape_2d(p, w, k, m)
            total = G.ggml_clamp(p, G.ggml_sum_rows(p, w2), 6.103515625e-5, float("inf"))
            w = G.ggml_reshape_3d(p, G.ggml_div(p, w2, total), 1, k, m)
        if c.routed_scale not in (0.0, 1.0):  # DeepSeek's routed_scaling_factor
            w = G.ggml_scale(p, w, c.routed_scale)
        for t in (probs, sel, w):
            G.ggml_set_output(t)
        self.routing.append((l, probs, sel, w))
        if not experts:
            return self._shared(L, h)
        gate, up, down = L["experts"]
        bg, bu, bd = (W(b) for b in L.get("expert_biases", (None,) * 3))
        x3 = G.ggml_reshape_3d(p, h, d, 1, m)
        if c.weight_input:  # llama4: each slot's expert reads the input times its weight
            x3 = G.ggml_mul(p, G.ggml_repeat_4d(p, x3, d, k, m, 1), w)
        ids = sel
        if L.get("slot") is not None:  # experts stored out of id order (safetensors' name order)
            table = self.ctx.tensor(G.GGML_TYPE_I32, 1, E, data=L["slot"].ctypes.data)
            flat = G.ggml_reshape_1d(p, G.ggml_cont(p, sel), k * m)
            ids = G.ggml_reshape_2d(p, G.ggml_get_rows(p, table, flat), k, m)
        g, u = G.ggml_mul_mat_id(p, gate, x3, ids), G.ggml_mul_mat_id(p, up, x3, ids)
        if bg is not None:  # gpt-oss: each pair's expert bias (llama.cpp's add_id)
            g, u = G.ggml_add_id(p, g, bg, sel), G.ggml_add_id(p, u, bu, sel)
        a = glu(p, g, u, c.expert_act)
        y = G.ggml_mul_mat_id(p, down, a, ids)
        if bd is not None:
            y = G.ggml_add_id(p, y, bd, sel)
        if not c.weight_input:
            y = G.ggml_mul(p, y, w)  # [d, k, m]
        nb1, nb2 = d * 4, d * k * 4
        out = G.ggml_view_2d(p, y, d, m, nb2, 0)
        for i in range(1, k):  # the k expert outputs added in slot order
            out = G.ggml_add(p, out, G.ggml_view_2d(p, y, d, m, nb2, i * nb1))
        if k == 1:
            out = G.ggml_cont(p, out)
        shared = self._shared(L, h)
        return out if shared is None else G.ggml_add(p, out, shared)

    def _selection(self, L: dict, probs):
        """The scores experts are picked by: probs (+ DeepSeek-V3's selection bias), restricted to the best
        `topk_group` of `n_group` groups, each scored by its two best experts (llama.cpp's build_moe_ffn)."""
        p, c, W, m, E = self.p, self.c, self.W, self.m, self.c.n_expert
        sel = G.ggml_add(p, probs, W(L["exp_probs_b.bias"])) if L.get("exp_probs_b.bias") is not None else probs
        if c.n_group <= 1:
            return sel
        per = E // c.n_group
        groups = G.ggml_reshape_3d(p, sel, per, c.n_group, m)
        best2 = G.ggml_get_rows(p, G.ggml_reshape_4d(p, groups, 1, per, c.n_group, m),
                                G.ggml_argsort_top_k(p, groups, 2))  # [1, 2, n_group, m]
        score = G.ggml_reshape_2d(p, G.ggml_sum_rows(p, G.ggml_reshape_3d(p, best2, 2, c.n_group, m)), c.n_group, m)
        keep = G.ggml_argsort_top_k(p, score, c.topk_group)  # [topk_group, m]
        kept = G.ggml_get_rows(p, groups, keep)
        masked = G.ggml_set_rows(p, G.ggml_fill(p, groups, float("-inf")), kept, keep)
        return G.ggml_reshape_2d(p, masked, E, m)

    def _shared(self, L: dict, h):
        """The shared expert (Qwen2-MoE's behind its sigmoid gate), or None."""
        p, W, s = self.p, self.W, None
        if "ffn_gate_shexp" in L:
            s = self.build_ffn(L["ffn_gate_shexp"], L["ffn_up_shexp"], L["ffn_down_shexp"], h)
            if L.get("ffn_gate_inp_shexp") is not None:  # sigmoid as llama.cpp writes it: silu(g) / g, or sigmoid
                g = G.ggml_mul_mat(p, W(L["ffn_gate_inp_shexp"]), h)
                g = G.ggml_sigmoid(p, g) if self.c.shexp_gate == "sigmoid" else G.ggml_div(p, G.ggml_silu(p, g), g)
                s = G.ggml_mul(p, s, g)
        return s


def glu(p, g, u, act: str):
    """The experts' gated activation node, as llama.cpp's build_moe_ffn picks it."""
    if act == "swiglu_oai":
        return G.ggml_swiglu_oai(p, g, u, OAI_ALPHA, OAI_LIMIT)
    if act == "reglu":
        return G.ggml_reglu_split(p, g, u)
    return G.ggml_swiglu_split(p, g, u)
