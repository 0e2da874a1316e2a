"""The CPU engine's forward pass as ONE ggml graph, built as llama.cpp builds it, for every
family: llama/Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, deepseek2 (both MLA forms) and gpt-oss (sinks, sliding window,
biased experts with the clamped SwiGLU).

Per layer: attn_norm -> q/k/v (+ biases, q/k RMSNorm) -> RoPE -> K and V stored in the cache -> kq = K·q,
softmax with the causal mask and 1/sqrt(d) -> kqv = V·kq -> o (+ bias) -> residual -> ffn_norm -> router ->
softmax -> top-k -> weights (renormalised where the family does) -> gate/up `mul_mat_id` -> swiglu -> down ->
weighted sum in slot order (+ the shared expert behind its sigmoid gate) -> residual; then output_norm and the
output head. The KV cache has llama.cpp's F32 layout (K [pos, kv_head, dim], V transposed [kv_head, dim, pos]) and
its attended key count padded to 256, so every sum runs over llama.cpp's shapes and the logits are bit-exact where
the weights need no repacking.

Attention: decode steps take llama.cpp's non-flash path (kq, soft_max, kqv: faster for one row here); prompts by
default ggml's flash attention over the same cache (V rows copied out of the transposed cache): the causal mask's
keys are skipped and no n x n_kv score matrix is made, 1.9x faster at 512 tokens and more with depth, equal to
float rounding. `flash_attn=False` keeps the non-flash path for prompts too: llama.cpp's logits bit for bit.

Why one graph: a decode step then costs one call into ggml (no Python between layers), as in llama.cpp. The
routing each layer chose is still reported (`on_router`) from the graph's outputs. Graphs for small batches
(decode) are built once per 256-key bucket and kept; their inputs (token ids, positions, mask) are written into
buffers they point at and the K/V destinations are re-pointed at the current position. Prompts build theirs per
call. ggml's graph allocator lays out the intermediate tensors (reusing memory between layers).
"""
from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moecli.kernels import ggml as G
from moecli.models.config import Checkpoint
from moecli.runtime.experts import OAI_ALPHA, OAI_LIMIT

T = GGMLQuantizationType
KV_PAD = 256  # llama.cpp pads its cache size and the attended key count to 256
CACHED_MAX_N = 4  # batches up to this size keep their graphs (decode, short drafts)
KEPT_GRAPHS = 32  # decode graphs kept (one per batch shape and caches: several slots, their 256-key buckets)
UBATCH = 512  # the most tokens one graph takes (llama.cpp's default n_ubatch)
_SEGMENT_NODES = 256  # graph size of one layer's segment in split mode (a layer has ~60 nodes)


class GgmlKVCache:
    """K [layer, pos, kv_head, dim] and V transposed [layer, kv_head, v_dim, pos], float32, capacity padded to 256
    (DeepSeek's MLA: v_dim differs from dim, or is 0 where the values are the cached latents)."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, v_dim: int | None = None):
        cap = -(-n_ctx // KV_PAD) * KV_PAD
        self.k = torch.zeros(n_layer, cap, n_head_kv, head_dim)
        self.vt = torch.zeros(n_layer, n_head_kv, head_dim if v_dim is None else v_dim, cap)  # 0: none (MLA)
        self.n_ctx, self.capacity = n_ctx, cap
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return (self.k.numel() + self.vt.numel()) * 4


def supported(ckpt: Checkpoint, experts) -> bool:
    """Whether the one-graph forward can run this checkpoint: expert stacks ggml can address as 3-D tensors (and,
    but for gpt-oss's, plain SwiGLU experts without biases)."""
    c = ckpt.config
    if c.rope_scaling == "yarn" and not c.yarn_truncate:  # ggml's rope rounds YaRN's correction range
        return False
    if c.arch == "deepseek2" and c.group_score != "top2":  # transformers' V2 group scoring: not llama.cpp's
        return False
    if not c.is_moe:
        return True
    return experts is not None and all(L.stacked is not None and (L.plain or c.arch == "gpt-oss")
                                       for L in experts.engine.layers.values())


class _Step:
    """The graph of one forward shape: a batch of sequences, each n_i tokens of its own cache over its first n_kv_i
    keys (`seqs`: (cache, n_i, n_kv_i)), logits of every token or of each sequence's last one.

    Every matmul (dense weights, router, experts) runs over the whole batch's tokens; only the attention is per
    sequence (its K/V store and its masked softmax over its own cache), as llama.cpp's batch of several seq ids.
    One sequence is the plain forward; several are continuous batching's decode step."""

    def __init__(self, fwd: "GgmlForward", seqs: list[tuple[GgmlKVCache, int, int]], all_logits: bool,
                 kept: bool, split: bool = False):
        c = fwd.config
        d, H = c.n_embd, c.n_head
        Hkv, hd, dv = fwd.kv_shape
        sizes = [n_i for _, n_i, _ in seqs]
        offsets = np.cumsum([0] + sizes)[:-1].tolist()  # each sequence's first row in the batch
        n = self.n = sum(sizes)
        self.sizes = sizes
        single = len(seqs) == 1
        # decode reads llama.cpp's repacked copies of the dense weights where they exist (its faster gemv);
        # prompts the file's own layout (this CPU's AVX-512 kernels beat the repacked ones on big batches)
        rp = n <= CACHED_MAX_N or not single
        W = lambda t: None if t is None else G.weight_tensor(t, rp)  # noqa: E731
        n_nodes = (96 + 24 * len(seqs)) * c.n_layer + 64 + 4 * len(seqs)  # each sequence adds its attention
        # room for one graph of the whole pass, or (split) one graph per layer plus the head
        ctx = self.ctx = G.Ctx(n_nodes, 2 * n_nodes if not split else _SEGMENT_NODES * 2 * (c.n_layer + 1))
        p = ctx.ptr
        # prompts: flash attention (its masked keys are skipped, no n x n_kv scores); decode: llama.cpp's
        # non-flash path, faster for one row here. The latent (absorbed MLA) form keeps the non-flash path.
        flash = fwd.flash_attn and single and n > CACHED_MAX_N and dv > 0
        mask_type, mask_dtype = (T.F16, np.float16) if flash else (T.F32, np.float32)  # ggml's FA takes F16 masks
        self.tokens = np.zeros(n, dtype=np.int32)
        self.pos = np.zeros(n, dtype=np.int32)
        tok_t = ctx.tensor(G.GGML_TYPE_I32, n, data=self.tokens.ctypes.data)
        pos_t = ctx.tensor(G.GGML_TYPE_I32, n, data=self.pos.ctypes.data)
        # per sequence: its mask(s) [n_i, n_kv_i], its cache's K and V, its rows' offset in the batch
        self.masks, self.masks_swa, att_seqs = [], [], []
        for (cache, n_i, n_kv_i), off in zip(seqs, offsets):
            cap = cache.capacity
            mask = np.zeros((n_i, n_kv_i), dtype=mask_dtype)
            swa = np.zeros((n_i, n_kv_i), dtype=mask_dtype) if c.sliding_window else None
            self.masks.append(mask)
            self.masks_swa.append(swa)
            att_seqs.append(dict(
                n=n_i, n_kv=n_kv_i, off=off, cap=cap,
                mask=ctx.tensor(mask_type, n_kv_i, n_i, data=mask.ctypes.data),
                swa=ctx.tensor(mask_type, n_kv_i, n_i, data=swa.ctypes.data) if swa is not None else None,
                kc=ctx.tensor(T.F32, cap * Hkv * hd * c.n_layer, data=cache.k.data_ptr()),
                vc=ctx.tensor(T.F32, cap * Hkv * dv * c.n_layer, data=cache.vt.data_ptr()),
                k_layer=cap * Hkv * hd * 4, v_layer=cap * Hkv * dv * 4))
        # the rows that go on past the last layer: all, or each sequence's last (llama.cpp's out_ids)
        self.out_ids = np.array([off + n_i - 1 for off, n_i in zip(offsets, sizes)], dtype=np.int32)
        out_ids_t = ctx.tensor(G.GGML_TYPE_I32, len(seqs), data=self.out_ids.ctypes.data)

        def norm(a, w):
            return G.ggml_mul(p, G.ggml_rms_norm(p, a, c.rms_eps), w)

        def linear(wb, a):
            w, b = wb
            y = G.ggml_mul_mat(p, W(w), a)
            return G.ggml_add(p, y, W(b)) if b is not None else y

        def swiglu(gate, up, down, a):
            return G.ggml_mul_mat(p, W(down), G.ggml_swiglu_split(p, G.ggml_mul_mat(p, W(gate), a),
                                                                  G.ggml_mul_mat(p, W(up), a)))
        self.W = W

        mode = G.GGML_ROPE_TYPE_NEOX if c.rope_neox else G.GGML_ROPE_TYPE_NORMAL
        self.stores, self.routing = [], []
        self._seg_stores, self._seg_layer = 0, 0  # split mode: the stores and layers already in a segment
        c_dv = c.v_head_dim if c.arch == "deepseek2" else dv  # per-head output width of the attention
        # `split` (prompts whose experts run faster as per-expert matmuls, see CpuExperts): one graph per layer
        # that ends at the routing; the experts then run through CpuExperts and their sum feeds the next graph
        self.split, self.fwd, self.segments = split, fwd, []
        x = G.ggml_get_rows(p, W(fwd.token_embd), tok_t)
        m = n
        for l, L in enumerate(fwd.layers):
            inp = x
            h = norm(x, W(L["attn_norm"]))
            if c.arch == "deepseek2":
                q, k, v = self._mla(p, c, L, h, n, pos_t, norm, linear)
            else:
                q, k, v = (linear(L[name], h) for name in ("q", "k", "v"))
                if c.qk_norm == "full":  # OLMoE: over the whole projection
                    q, k = norm(q, W(L["q_norm"])), norm(k, W(L["k_norm"]))
                q = G.ggml_reshape_3d(p, q, hd, H, n)
                k = G.ggml_reshape_3d(p, k, hd, Hkv, n)
                if c.qk_norm == "head":  # Qwen3: per head
                    q, k = norm(q, W(L["q_norm"])), norm(k, W(L["k_norm"]))
                q = G.ggml_rope_ext(p, q, pos_t, None, c.rope_dim, mode, *fwd.rope_args)
                k = G.ggml_rope_ext(p, k, pos_t, None, c.rope_dim, mode, *fwd.rope_args)
            att = linear(L["o"], self._attention(p, fwd, L, q, k, v, att_seqs, l, flash, c_dv))
            if l == c.n_layer - 1 and not all_logits and n > len(seqs):  # only the last tokens go on (llama.cpp)
                if single:
                    att = G.ggml_view_2d(p, att, d, 1, d * 4, (n - 1) * d * 4)
                    inp = G.ggml_view_2d(p, inp, d, 1, d * 4, (n - 1) * d * 4)
                else:
                    att, inp = G.ggml_get_rows(p, att, out_ids_t), G.ggml_get_rows(p, inp, out_ids_t)
                m = len(seqs)
            ffn_inp = G.ggml_add(p, att, inp)
            h = norm(ffn_inp, W(L["ffn_norm"]))
            if "ffn" in L:  # dense models, and deepseek2's leading dense layers
                out = swiglu(*L["ffn"], h)
            elif split:
                shared = self._moe(p, c, L, h, m, l, experts=False)
                for t in (ffn_inp, h) + ((shared,) if shared is not None else ()):
                    G.ggml_set_output(t)
                self.segments.append(self._segment([ffn_inp, h, shared, *self.routing[-1][1:]], l, m, ffn_inp, h,
                                                   shared))
                x_buf = np.zeros((m, d), dtype=np.float32)
                x = ctx.tensor(T.F32, d, m, data=x_buf.ctypes.data)
                self.segments[-1]["next_x"] = x_buf
                continue
            else:
                out = self._moe(p, c, L, h, m, l)
            x = G.ggml_add(p, out, ffn_inp)
        logits = G.ggml_mul_mat(p, W(fwd.output), norm(x, W(fwd.output_norm)))
        G.ggml_set_output(logits)
        self.logits, self.m, self.n_vocab = logits, m, c.n_vocab
        # decode graphs are kept, each with its own allocation; prompt graphs (used once) share the forward's, which
        # keeps its buffer from one prompt batch to the next (micro-batches, back-to-back prompts) as llama.cpp
        # keeps its compute buffer: a fresh one of ~100 MB is faulted in page by page (~10 % of a 512-token pass).
        # Decoding gives it back, so the model decodes in no more memory than its file.
        self.owns_galloc = kept
        self.galloc = G.ggml_gallocr_new(G.ggml_backend_cpu_buffer_type()) if self.owns_galloc else \
            fwd.prompt_galloc()
        if split:
            self.segments.append(self._segment([logits], None, m))
            return
        self.graph = G.Graph(ctx, [], 2 * n_nodes)
        for _, store, *_ in self.stores:  # the stores first: the attention reads what they write
            G.ggml_build_forward_expand(self.graph.ptr, store)
        G.ggml_build_forward_expand(self.graph.ptr, logits)
        for _, probs, _, _ in self.routing:  # reported to on_router; nothing else may consume them (gpt-oss)
            G.ggml_build_forward_expand(self.graph.ptr, probs)
        if not G.ggml_gallocr_alloc_graph(self.galloc, self.graph.ptr):
            raise MemoryError("ggml could not allocate the forward graph")

    def _segment(self, outs, l, m, ffn_inp=None, h=None, shared=None) -> dict:
        """A graph over the nodes added since the previous segment: the stores of its layers first (deepseek2's
        leading dense layers share the segment of the first MoE layer; nothing else reaches their stores), then
        `outs`."""
        last = self.fwd.config.n_layer if l is None else l
        g = G.Graph(self.ctx, [], _SEGMENT_NODES * (last - self._seg_layer + 1))
        self._seg_layer = last + 1
        for _, store, *_ in self.stores[self._seg_stores:]:
            G.ggml_build_forward_expand(g.ptr, store)
        self._seg_stores = len(self.stores)
        for t in outs:
            if t is not None:
                G.ggml_build_forward_expand(g.ptr, t)
        return dict(graph=g, layer=l, m=m, ffn_inp=ffn_inp, h=h, shared=shared)

    def _attention(self, p, fwd, L, q, k, v, att_seqs, l: int, flash: bool, c_dv: int):
        """Each sequence's K/V stored in its cache (destinations re-pointed at its position per call), then its
        attention over its first n_kv positions as llama.cpp's build_attn_mha; the outputs [c_dv * H, n] side by
        side in batch order."""
        c, H = fwd.config, fwd.config.n_head
        Hkv, hd, dv = fwd.kv_shape
        single = len(att_seqs) == 1
        N = sum(s["n"] for s in att_seqs)
        q_row = q.contents.nb[2]
        k2 = G.ggml_reshape_2d(p, k, hd * Hkv, N)
        v2 = G.ggml_reshape_2d(p, v, dv * Hkv, N) if v is not None else None
        outs = []
        for si, s in enumerate(att_seqs):
            n, n_kv, off, cap, kc, vc = s["n"], s["n_kv"], s["off"], s["cap"], s["kc"], s["vc"]
            k_layer, v_layer = s["k_layer"], s["v_layer"]
            qs = q if single else G.ggml_view_3d(p, q, q.contents.ne[0], H, n, q.contents.nb[1], q_row, off * q_row)
            ks = k2 if single else G.ggml_view_2d(p, k2, hd * Hkv, n, hd * Hkv * 4, off * hd * Hkv * 4)
            # store K rows (and V columns) at positions start.. (destinations re-pointed per call)
            k_dst = G.ggml_view_2d(p, kc, hd * Hkv, n, hd * Hkv * 4, 0)
            k_store = G.ggml_cpy(p, ks, k_dst)
            self.stores.append((k_dst, k_store, kc.contents.data + l * k_layer, hd * Hkv * 4, si))
            K = G.ggml_view_3d(p, kc, hd, Hkv, n_kv, hd * 4, hd * Hkv * 4, l * k_layer)
            if v is None:  # latent attention: the values are the cached latents (the first kv_lora_rank dims)
                r = c.kv_lora_rank
                Vt = G.ggml_view_3d(p, kc, r, Hkv, n_kv, hd * 4, hd * Hkv * 4, l * k_layer)
                V = G.ggml_cont(p, G.ggml_transpose(p, G.ggml_permute(p, Vt, 0, 2, 1, 3)))  # [n_kv, r, 1]
            else:
                vs = v2 if single else G.ggml_view_2d(p, v2, dv * Hkv, n, dv * Hkv * 4, off * dv * Hkv * 4)
                v_dst = G.ggml_view_2d(p, vc, n, dv * Hkv, cap * 4, 0)
                v_store = G.ggml_cpy(p, G.ggml_transpose(p, vs), v_dst)
                self.stores.append((v_dst, v_store, vc.contents.data + l * v_layer, 4, si))
                V = G.ggml_permute(p, G.ggml_view_3d(p, vc, n_kv, Hkv, dv, cap * dv * 4, cap * 4, l * v_layer),
                                   0, 2, 1, 3)
            qp, Kp, mask_l = G.ggml_permute(p, qs, 0, 2, 1, 3), G.ggml_permute(p, K, 0, 2, 1, 3), \
                s["swa"] if L.get("swa") else s["mask"]
            if flash:  # V rows [dv, n_kv, Hkv] out of the transposed cache (a copy of n_kv x dv x Hkv floats)
                o = G.ggml_flash_attn_ext(p, qp, Kp, G.ggml_cont(p, G.ggml_transpose(p, V)), mask_l,
                                          fwd.kq_scale, 0.0, 0.0)
                if "sinks" in L:
                    G.ggml_flash_attn_ext_add_sinks(o, self.W(L["sinks"]))
                o = G.ggml_reshape_2d(p, o, c_dv * H, n)  # o is [dv, H, n]
            else:
                kq = G.ggml_soft_max_ext(p, G.ggml_mul_mat(p, Kp, qp), mask_l, fwd.kq_scale, 0.0)
                if "sinks" in L:  # gpt-oss: a per-head logit joins every softmax denominator
                    G.ggml_soft_max_add_sinks(kq, self.W(L["sinks"]))
                kqv = G.ggml_mul_mat(p, V, kq)
                if v is None:  # back from the latent space, per head: v_b [r, dv, H]
                    kqv = G.ggml_mul_mat(p, self.W(L["v_b"]), kqv)
                o = G.ggml_cont_2d(p, G.ggml_permute(p, kqv, 0, 2, 1, 3), c_dv * H, n)
            outs.append(o)
        out = outs[0]
        for o in outs[1:]:
            out = G.ggml_concat(p, out, o, 1)
        return out

    def _mla(self, p, c, L, h, n: int, pos_t, norm, linear):
        """deepseek2's attention inputs as llama.cpp builds them for a decompressed cache: q (or q_a -> norm -> q_b)
        roped on its last qk_rope dims, the compressed kv split into the normed latent and one roped k_pe head,
        kv_b's k_nope and v per head; K = [k_nope | k_pe repeated over the heads]."""
        W, H, nope, rope, r, dv = self.W, c.n_head, c.qk_nope_dim, c.qk_rope_dim, c.kv_lora_rank, c.v_head_dim
        dk = nope + rope
        mode = G.GGML_ROPE_TYPE_NEOX if c.rope_neox else G.GGML_ROPE_TYPE_NORMAL  # NEOX: HF V3, rope_interleave off
        q = linear((L["q"], None), h) if "q" in L else \
            G.ggml_mul_mat(p, W(L["q_b"]), norm(G.ggml_mul_mat(p, W(L["q_a"]), h), W(L["q_a_norm"])))
        q = G.ggml_reshape_3d(p, q, dk, H, n)
        kv_pe = G.ggml_mul_mat(p, W(L["kv_a"]), h)  # [r + rope, n]
        row = (r + rope) * 4
        latent = norm(G.ggml_view_2d(p, kv_pe, r, n, row, 0), W(L["kv_a_norm"]))
        k_pe = G.ggml_view_3d(p, kv_pe, rope, 1, n, row, row, r * 4)
        k_pe = G.ggml_rope_ext(p, k_pe, pos_t, None, rope, mode, *self.fwd.rope_args)
        if c.mla_split:  # absorbed: q_nope into the latent space, attention over [latent | k_pe], one KV head
            q_nope = G.ggml_view_3d(p, q, nope, H, n, dk * 4, dk * H * 4, 0)
            q_pe = G.ggml_view_3d(p, q, rope, H, n, dk * 4, dk * H * 4, nope * 4)
            q_pe = G.ggml_rope_ext(p, q_pe, pos_t, None, rope, mode, *self.fwd.rope_args)
            q_abs = G.ggml_mul_mat(p, W(L["k_b"]), G.ggml_permute(p, q_nope, 0, 2, 1, 3))  # [r, n, H]
            q = G.ggml_concat(p, G.ggml_permute(p, q_abs, 0, 2, 1, 3), q_pe, 0)  # [r + rope, H, n]
            k = G.ggml_concat(p, G.ggml_reshape_3d(p, latent, r, 1, n), k_pe, 0)  # [r + rope, 1, n]
            return q, k, None
        kv = G.ggml_mul_mat(p, W(L["kv_b"]), latent)  # [(nope + dv) * H, n]
        k_nope = G.ggml_view_3d(p, kv, nope, H, n, (nope + dv) * 4, (nope + dv) * H * 4, 0)
        v = G.ggml_cont(p, G.ggml_view_3d(p, kv, dv, H, n, (nope + dv) * 4, (nope + dv) * H * 4, nope * 4))
        q = G.ggml_rope_set_offset(G.ggml_rope_ext(p, q, pos_t, None, rope, mode, *self.fwd.rope_args), nope)
        k = G.ggml_concat(p, k_nope, G.ggml_repeat_4d(p, k_pe, rope, H, n, 1), 0)
        return q, k, v

    def _moe(self, p, c, L, h, m: int, l: int, experts: bool = True):
        """llama.cpp's build_moe_ffn with softmax gating (+ Qwen2-MoE's gated shared expert). Without `experts`:
        the routing and the shared expert's output only (None without one)."""
        E, k, d, W = c.n_expert, c.n_expert_used, c.n_embd, self.W
        logits = G.ggml_mul_mat(p, W(L["router"]), h)  # [E, m]
        if L.get("router_b") is not None:
            logits = G.ggml_add(p, logits, W(L["router_b"]))
        probs = G.ggml_sigmoid(p, logits) if c.gating == "sigmoid" else G.ggml_soft_max(p, logits)
        if c.gating == "softmax_weight":  # gpt-oss: top-k of the logits, softmax over those k
            sel = G.ggml_argsort_top_k(p, logits, k)
            w = G.ggml_get_rows(p, G.ggml_reshape_3d(p, logits, 1, E, m), sel)
            w = G.ggml_reshape_3d(p, G.ggml_soft_max(p, G.ggml_reshape_2d(p, w, k, m)), 1, k, m)
        else:
            sel = G.ggml_argsort_top_k(p, self._selection(p, c, L, probs, m), k)  # [k, m]
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
            return self._shared(p, L, h)
        gate, up, down = L["experts"]
        bg, bu, bd = (W(b) for b in L.get("expert_biases", (None,) * 3))
        x3 = G.ggml_reshape_3d(p, h, d, 1, m)
        ids = sel
        if L.get("slot") is not None:  # experts stored out of id order (safetensors' name order)
            table = self.ctx.tensor(G.GGML_TYPE_I32, 1, E, data=L["slot"].ctypes.data)
            flat = G.ggml_reshape_1d(p, G.ggml_cont(p, sel), k * m)
            ids = G.ggml_reshape_2d(p, G.ggml_get_rows(p, table, flat), k, m)
        g, u = G.ggml_mul_mat_id(p, gate, x3, ids), G.ggml_mul_mat_id(p, up, x3, ids)
        if bg is not None:  # gpt-oss: each pair's expert bias (llama.cpp's add_id)
            g, u = G.ggml_add_id(p, g, bg, sel), G.ggml_add_id(p, u, bu, sel)
        if c.expert_act == "swiglu_oai":
            a = G.ggml_swiglu_oai(p, g, u, OAI_ALPHA, OAI_LIMIT)
        else:
            a = G.ggml_swiglu_split(p, g, u)
        y = G.ggml_mul_mat_id(p, down, a, ids)
        if bd is not None:
            y = G.ggml_add_id(p, y, bd, sel)
        y = G.ggml_mul(p, y, w)  # [d, k, m]
        nb1, nb2 = d * 4, d * k * 4
        out = G.ggml_view_2d(p, y, d, m, nb2, 0)
        for i in range(1, k):  # the k expert outputs added in slot order
            out = G.ggml_add(p, out, G.ggml_view_2d(p, y, d, m, nb2, i * nb1))
        if k == 1:
            out = G.ggml_cont(p, out)
        shared = self._shared(p, L, h)
        return out if shared is None else G.ggml_add(p, out, shared)

    def _selection(self, p, c, L, probs, m: int):
        """The scores experts are picked by: probs (+ DeepSeek-V3's selection bias), restricted to the best
        `topk_group` of `n_group` groups, each scored by its two best experts (llama.cpp's build_moe_ffn)."""
        W, E = self.W, c.n_expert
        sel = G.ggml_add(p, probs, W(L["exp_probs_b"])) if L.get("exp_probs_b") is not None else probs
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

    def _shared(self, p, L, h):
        """Qwen2-MoE's shared expert behind its sigmoid gate, or None."""
        W, s = self.W, None
        if "shared" in L:
            down_s, gate_s, up_s = (W(t) for t in L["shared"])
            s = G.ggml_mul_mat(p, down_s, G.ggml_swiglu_split(p, G.ggml_mul_mat(p, gate_s, h),
                                                              G.ggml_mul_mat(p, up_s, h)))
            if L.get("shared_gate") is not None:  # sigmoid as llama.cpp writes it: silu(g) / g
                g = G.ggml_mul_mat(p, W(L["shared_gate"]), h)
                s = G.ggml_mul(p, s, G.ggml_div(p, G.ggml_silu(p, g), g))
        return s

    def run(self, tokens: list[int], starts: list[int], on_router=None) -> torch.Tensor:
        """Logits of the batch `tokens` (each sequence's n_i in order), sequence i's at positions starts[i].."""
        self.tokens[:] = tokens
        row = 0
        for n, start, mask, mask_swa in zip(self.sizes, starts, self.masks, self.masks_swa):
            qpos = np.arange(start, start + n, dtype=np.int32)
            self.pos[row:row + n] = qpos
            row += n
            # causal: token start+i sees its own sequence's keys 0..start+i; the padding keys beyond are masked too
            kpos = np.arange(mask.shape[1])[None, :]
            np.copyto(mask, np.where(kpos <= qpos[:, None], 0.0, -np.inf))
            if mask_swa is not None:  # and within the window (llama.cpp's LLAMA_SWA_TYPE_STANDARD)
                window = self.fwd.config.sliding_window
                np.copyto(mask_swa, np.where((kpos <= qpos[:, None]) & (qpos[:, None] - kpos < window), 0.0, -np.inf))
        for dst, store, base, stride, seq in self.stores:  # a cpy writes through its result, a view of dst
            dst.contents.data = store.contents.data = base + starts[seq] * stride
        if self.split:
            self._run_split(on_router)
        else:
            self.graph.compute()
            for route in self.routing if on_router is not None else ():
                self._report(on_router, *route)
        return torch.from_numpy(_read(self.logits, (self.m, self.n_vocab), np.float32).copy())

    def _run_split(self, on_router) -> None:
        """The segments share one allocation, so a layer's outputs (routing included) are read before the next."""
        c, engine = self.fwd.config, self.fwd.experts.engine
        k, d = c.n_expert_used, c.n_embd
        routing = {route[0]: route for route in self.routing}
        for seg in self.segments:
            if not G.ggml_gallocr_alloc_graph(self.galloc, seg["graph"].ptr):
                raise MemoryError("ggml could not allocate the forward graph")
            seg["graph"].compute()
            l, m = seg["layer"], seg["m"]
            if l is None:
                return
            if on_router is not None:
                self._report(on_router, *routing[l])
            _, _, sel, w = routing[l]
            ids = _read(sel, (m, k), np.int32).reshape(-1).copy()
            wt = _read(w, (m, k), np.float32, row_dim=2).reshape(-1).copy()
            h = _read(seg["h"], (m, d), np.float32)
            out = engine.run(l, np.ascontiguousarray(h), np.repeat(np.arange(m, dtype=np.int32), k), ids, wt)
            if seg["shared"] is not None:  # the order of llama.cpp's adds: (experts + shared) + residual
                out += _read(seg["shared"], (m, d), np.float32)
            np.add(out, _read(seg["ffn_inp"], (m, d), np.float32), out=seg["next_x"])

    @staticmethod
    def _report(hook, l, probs, sel, w) -> None:
        E, k = probs.contents.ne[0], sel.contents.ne[0]
        m = sel.contents.ne[1]
        hook(l, torch.from_numpy(_read(probs, (m, E), np.float32).copy()),
             torch.from_numpy(_read(sel, (m, k), np.int32).astype(np.int64)),
             torch.from_numpy(_read(w, (m, k), np.float32, row_dim=2).copy()))  # w is [1, k, m]

    def __del__(self):
        if getattr(self, "galloc", None) and self.owns_galloc and G.ggml_gallocr_free is not None:
            G.ggml_gallocr_free(self.galloc)
            self.galloc = None


def _read(t, shape, dtype, row_dim: int = 1) -> np.ndarray:
    """A tensor's values as numpy [rows, cols]: cols along ne[0], rows along ne[row_dim] with its stride (a view;
    argsort_top_k's result is itself a strided view)."""
    rows, cols = shape
    size = np.dtype(dtype).itemsize
    row_bytes = t.contents.nb[row_dim]
    buf = (G.C.c_char * (row_bytes * (rows - 1) + cols * size)).from_address(t.contents.data)
    return np.lib.stride_tricks.as_strided(np.frombuffer(buf, dtype=dtype), shape, (row_bytes, size))


class GgmlForward:
    """`Transformer.fused_forward` of the ggml engine."""

    def __init__(self, ckpt: Checkpoint, experts, max_ctx: int, flash_attn: bool = True):
        c = self.config = ckpt.config
        self.max_ctx, self.experts, self.flash_attn = max_ctx, experts, flash_attn
        self._prompt_galloc = None
        self.kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(c.head_dim)))
        self.kv_shape = (c.n_head_kv, c.head_dim, c.head_dim)  # KV heads, K dims, V dims
        # ggml_rope_ext's n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow
        self.rope_args = (c.n_ctx_train, c.rope_theta, 1.0, 0.0, 1.0, 32.0, 1.0)
        if c.arch == "deepseek2":  # decompressed MLA: every head keeps [k_nope | k_pe] and its own v;
            self.kv_shape = (c.n_head, c.qk_nope_dim + c.qk_rope_dim, c.v_head_dim)  # absorbed: one latent head
            if c.mla_split:
                self.kv_shape = (1, c.kv_lora_rank + c.qk_rope_dim, 0)
        if c.rope_scaling == "yarn" or c.arch == "deepseek2":
            import dataclasses

            from moecli.models.deepseek2 import yarn_params

            ds = c.arch == "deepseek2"  # its own kq scale (mscale^2 / sqrt(dk)); gpt-oss keeps 1/sqrt(d)
            y = yarn_params(c if ds else dataclasses.replace(c, qk_nope_dim=0, qk_rope_dim=c.rope_dim))
            if ds:
                self.kq_scale = float(y["kq_scale"])
            self.rope_args = (c.yarn_orig_ctx or c.n_ctx_train, c.rope_theta, float(y["freq_scale"]),
                              float(y["ext_factor"]), float(y["attn_factor"]), c.yarn_beta_fast, c.yarn_beta_slow)
        W, opt = ckpt.tensor, ckpt.optional
        self.token_embd = W("token_embd.weight")
        self.output_norm = W("output_norm.weight")
        self.output = W("output.weight") if opt("output.weight") is not None else self.token_embd
        self.layers = []
        for l in range(c.n_layer):
            b = f"blk.{l}."
            gpt_oss = c.arch == "gpt-oss"
            L = {"attn_norm": W(b + "attn_norm.weight"),
                 "ffn_norm": W(b + ("post_attention_norm.weight" if gpt_oss else "ffn_norm.weight"))}
            if gpt_oss:
                L["sinks"], L["swa"] = W(b + "attn_sinks.weight"), l in c.swa_layers
                L["router_b"] = opt(b + "ffn_gate_inp.bias")
                stacks = [ckpt.experts[f"{b}ffn_{p}_exps"] for p in ("gate", "up", "down")]
                if all(st.bias is not None for st in stacks):
                    L["expert_biases"] = tuple(st.bias for st in stacks)
            if c.arch == "deepseek2":
                for key, name in (("q", "attn_q"), ("q_a", "attn_q_a"), ("q_a_norm", "attn_q_a_norm"),
                                  ("q_b", "attn_q_b"), ("kv_a", "attn_kv_a_mqa"), ("kv_a_norm", "attn_kv_a_norm"),
                                  ("kv_b", "attn_kv_b"), ("k_b", "attn_k_b"), ("v_b", "attn_v_b")):
                    if opt(f"{b}{name}.weight") is not None:
                        L[key] = W(f"{b}{name}.weight")
                L["o"] = (W(b + "attn_output.weight"), None)
            else:
                for name, w in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                    bias = opt(f"{b}{w}.bias")
                    L[name] = (W(f"{b}{w}.weight"), bias)
            if c.qk_norm:
                L["q_norm"], L["k_norm"] = W(b + "attn_q_norm.weight"), W(b + "attn_k_norm.weight")
            if c.is_moe and l >= c.n_dense_layers:
                L["router"] = W(b + "ffn_gate_inp.weight")
                L["exp_probs_b"] = opt(b + "exp_probs_b.bias")
                L["experts"] = experts.engine.layers[l].stacked
                L["slot"] = experts.engine.layers[l].slot  # expert id -> index in those tensors, or None
                if c.n_ff_shexp:
                    L["shared"] = tuple(W(f"{b}ffn_{p}_shexp.weight") for p in ("down", "gate", "up"))
                    g = opt(b + "ffn_gate_inp_shexp.weight")
                    L["shared_gate"] = g
            else:
                L["ffn"] = tuple(W(f"{b}ffn_{p}.weight") for p in ("gate", "up", "down"))
            self.layers.append(L)
        for t in self._dense_weights():  # repacked copies for decode; the file's bytes stay for prompts
            G.repack(t, release_source=False)
        self._steps: dict[tuple, _Step] = {}

    def _dense_weights(self):
        for L in self.layers:
            for key in ("q", "k", "v", "o"):
                if key in L:
                    yield L[key][0] if isinstance(L[key], tuple) else L[key]
            for key in ("q_a", "q_b", "kv_a", "kv_b"):
                if key in L:
                    yield L[key]
            yield from L.get("ffn", ())
            yield from L.get("shared", ())
        if self.output is not self.token_embd:
            yield self.output

    def _split(self, n: int) -> bool:
        """Run this batch's experts outside the graph? When CpuExperts would pick its per-expert matmul kernel
        (Q8_0/F16/BF16/F32 experts and prompt-sized batches: llamafile's sgemm beats mul_mat_id there)."""
        c = self.config
        if not c.is_moe or n <= CACHED_MAX_N:
            return False
        pairs = n * c.n_expert_used
        first = next(iter(self.experts.engine.layers))  # deepseek2's leading layers are dense
        return self.experts.engine.choose_kernel(first, pairs, min(c.n_expert, pairs)) == "loop"

    def prompt_galloc(self):
        """The graph allocator shared by prompt batches (one runs at a time)."""
        if self._prompt_galloc is None:
            self._prompt_galloc = G.ggml_gallocr_new(G.ggml_backend_cpu_buffer_type())
        return self._prompt_galloc

    def __del__(self):
        if getattr(self, "_prompt_galloc", None) and G.ggml_gallocr_free is not None:
            self._steps = {}
            G.ggml_gallocr_free(self._prompt_galloc)
            self._prompt_galloc = None

    def new_cache(self, n_ctx: int | None = None) -> GgmlKVCache:
        c = self.config
        Hkv, dk, dv = self.kv_shape
        return GgmlKVCache(c.n_layer, min(n_ctx or self.max_ctx, self.max_ctx), Hkv, dk, dv)

    def __call__(self, tokens: list[int], cache: GgmlKVCache, all_logits: bool, on_router=None) -> torch.Tensor:
        """Logits of `tokens` at positions cache.pos.. (all of them or the last one); the caller advances pos.
        Long prompts go in micro-batches of UBATCH tokens, as llama.cpp's n_ubatch (the attention scores of one
        batch are n x n_kv floats per head)."""
        self._check_ids(tokens)
        start, out = cache.pos, []
        for i in range(0, len(tokens), UBATCH):
            chunk = tokens[i:i + UBATCH]
            last = i + UBATCH >= len(tokens)
            logits = self._batch([(chunk, cache, start + i)], all_logits or len(chunk) == 1, on_router)
            if all_logits or last:
                out.append(logits)
        return out[0] if len(out) == 1 else torch.cat(out)

    def decode_batch(self, work: list[tuple[list[int], GgmlKVCache]], on_router=None) -> torch.Tensor:
        """Several sequences in ONE forward pass (continuous batching): `tokens` of each at its cache.pos.., every
        cache a different sequence's. Returns each sequence's last-token logits [len(work), n_vocab]; the caller
        advances each pos. The batch takes at most UBATCH tokens."""
        if sum(len(t) for t, _ in work) > UBATCH:
            raise ValueError(f"a batch takes at most {UBATCH} tokens")
        if len({id(cache) for _, cache in work}) != len(work):
            raise ValueError("each sequence of a batch needs its own cache")
        for tokens, cache in work:
            self._check_ids(tokens)
            if cache.pos + len(tokens) > cache.n_ctx:
                raise ValueError(f"context full: {cache.pos + len(tokens)} tokens > {cache.n_ctx}")
        return self._batch([(t, cache, cache.pos) for t, cache in work], len(work) == 1 and len(work[0][0]) == 1,
                           on_router)

    def _check_ids(self, tokens: list[int]) -> None:
        if min(tokens) < 0 or max(tokens) >= self.config.n_vocab:  # ggml's get_rows would read out of bounds
            from moecli.errors import MoecliError

            raise MoecliError(f"token id out of range [0, {self.config.n_vocab})")

    def _batch(self, batch: list[tuple[list[int], GgmlKVCache, int]], all_logits: bool, on_router):
        """One graph over (tokens, cache, start) per sequence. Decode-sized graphs (one sequence of a few tokens, or
        several sequences) are kept, keyed by their shapes and caches, the least recently used dropped."""
        seqs = [(cache, len(t), min(cache.capacity, max(KV_PAD, -(-(start + len(t)) // KV_PAD) * KV_PAD)))
                for t, cache, start in batch]  # n_kv: llama.cpp's get_n_kv
        n = sum(len(t) for t, _, _ in batch)
        keep = n <= CACHED_MAX_N or len(batch) > 1
        if keep and self._prompt_galloc is not None:  # decoding: the prompt's buffers go back
            G.ggml_gallocr_free(self._prompt_galloc)
            self._prompt_galloc = None
            if self.experts is not None:
                self.experts.engine.release_buffers()
            G.trim_heap()
        key = (tuple((cache.k.data_ptr(), cache.vt.data_ptr(), cache.capacity, n_i, n_kv) for cache, n_i, n_kv in seqs),
               all_logits)
        step = self._steps.pop(key, None)
        if step is None:
            step = _Step(self, seqs, all_logits, keep, split=len(batch) == 1 and self._split(n))
        if keep:
            self._steps[key] = step  # (re)inserted last: the most recently used
            while len(self._steps) > KEPT_GRAPHS:
                self._steps.pop(next(iter(self._steps)))
        return step.run([t for b in batch for t in b[0]], [start for _, _, start in batch], on_router)
