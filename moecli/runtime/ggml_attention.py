"""The CPU engine's attention block as ONE ggml graph per layer, built as llama.cpp builds it (its non-flash path).

attn_norm -> q/k/v (+ biases, q/k RMSNorm) -> RoPE -> K and V stored in the cache -> kq = K·q, softmax with the
causal mask and 1/sqrt(d) -> kqv = V·kq -> o (+ bias) -> residual add -> ffn_norm. The KV cache has llama.cpp's
F32 layout (K [pos, kv_head, dim], V transposed [kv_head, dim, pos]) and its key count padded to 256, so every sum
runs over the same shapes as llama.cpp's and the logits can be bit-exact. Torch keeps the routing (the executor
and the router hooks read it) and nothing else of the block.

Decode pays no graph building: a layer's graph for one token is built once per 256-key bucket and cached, its
inputs (hidden row, position, mask) are written into buffers it points at, and the K/V destinations are re-pointed
at the current position. Bigger batches (prompts) build their graph per call.
"""
from __future__ import annotations

import ctypes as C

import numpy as np
import torch
from gguf import GGMLQuantizationType

from moecli.kernels import ggml as G
from moecli.models.config import Checkpoint

T = GGMLQuantizationType
KV_PAD = 256  # llama.cpp pads its cache size and the attended key count to 256
CACHED_MAX_N = 4  # batches up to this size keep their graphs (decode, short drafts)


class GgmlKVCache:
    """K [layer, pos, kv_head, dim] and V transposed [layer, kv_head, dim, pos], float32, capacity padded to 256."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int):
        cap = -(-n_ctx // KV_PAD) * KV_PAD
        self.k = torch.zeros(n_layer, cap, n_head_kv, head_dim)
        self.vt = torch.zeros(n_layer, n_head_kv, head_dim, cap)
        self.n_ctx, self.capacity = n_ctx, cap
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * 4


class _Graph:
    """One layer's block for n tokens over n_kv keys: the built graph, its input buffers and what to re-point."""

    def __init__(self, block: "GgmlAttention", l: int, n: int, n_kv: int, cache: GgmlKVCache):
        c, L = block.config, block.layers[l]
        d, H, Hkv, hd = c.n_embd, c.n_head, c.n_head_kv, c.head_dim
        cap = cache.capacity
        self.cache_ptrs = (cache.k.data_ptr(), cache.vt.data_ptr())
        self.bufs: list[np.ndarray] = []
        ctx = self.ctx = G.Ctx(64, 64)
        p = ctx.ptr
        own = self._own

        self.x = self._input((n, d), np.float32)
        self.pos = self._input((n,), np.int32)
        self.mask = self._input((n, n_kv), np.float32)
        xt = ctx.tensor(T.F32, d, n, data=self.x.ctypes.data)
        post = ctx.tensor(G.GGML_TYPE_I32, n, data=self.pos.ctypes.data)
        maskt = ctx.tensor(T.F32, n_kv, n, data=self.mask.ctypes.data)

        def norm(a, w, eps=c.rms_eps):
            return own(G.ggml_mul(p, own(G.ggml_rms_norm(p, a, eps)), w))

        def linear(w, bias, a):
            y = own(G.ggml_mul_mat(p, G.weight_tensor(w), a))
            return own(G.ggml_add(p, y, bias)) if bias is not None else y

        h = norm(xt, L["attn_norm"])
        q, k, v = (linear(*L[name], h) for name in ("q", "k", "v"))
        if c.qk_norm == "full":  # OLMoE: over the whole projection
            q, k = norm(q, L["q_norm"]), norm(k, L["k_norm"])
        q = G.ggml_reshape_3d(p, q, hd, H, n)
        k = G.ggml_reshape_3d(p, k, hd, Hkv, n)
        if c.qk_norm == "head":  # Qwen3: per head
            q, k = norm(q, L["q_norm"]), norm(k, L["k_norm"])
        mode = G.GGML_ROPE_TYPE_NEOX if c.rope_neox else G.GGML_ROPE_TYPE_NORMAL
        q = own(G.ggml_rope_ext(p, q, post, None, c.rope_dim, mode, c.n_ctx_train, c.rope_theta, 1.0, 0.0, 1.0,
                                32.0, 1.0))
        k = own(G.ggml_rope_ext(p, k, post, None, c.rope_dim, mode, c.n_ctx_train, c.rope_theta, 1.0, 0.0, 1.0,
                                32.0, 1.0))
        # store K rows and V columns at positions start.. (their destinations are re-pointed per call)
        kc = ctx.tensor(T.F32, hd * Hkv * cap * c.n_layer, data=self.cache_ptrs[0])
        vc = ctx.tensor(T.F32, cap * Hkv * hd * c.n_layer, data=self.cache_ptrs[1])
        self.k_dst = G.ggml_view_2d(p, kc, hd * Hkv, n, hd * Hkv * 4, 0)
        self.v_dst = G.ggml_view_2d(p, vc, n, hd * Hkv, cap * 4, 0)
        k_store = G.ggml_cpy(p, G.ggml_reshape_2d(p, k, hd * Hkv, n), self.k_dst)
        v_store = G.ggml_cpy(p, G.ggml_transpose(p, v), self.v_dst)
        self.stores = (k_store, v_store)
        self.k_base = self.cache_ptrs[0] + l * cap * Hkv * hd * 4
        self.v_base = self.cache_ptrs[1] + l * Hkv * hd * cap * 4
        # attention over the first n_kv cached positions, as llama.cpp's build_attn_mha (non-flash)
        K = G.ggml_view_3d(p, kc, hd, Hkv, n_kv, hd * 4, hd * Hkv * 4, l * cap * Hkv * hd * 4)
        V = G.ggml_view_3d(p, vc, n_kv, Hkv, hd, cap * hd * 4, cap * 4, l * Hkv * hd * cap * 4)
        qp = G.ggml_permute(p, q, 0, 2, 1, 3)
        kq = own(G.ggml_mul_mat(p, G.ggml_permute(p, K, 0, 2, 1, 3), qp))
        kq = own(G.ggml_soft_max_ext(p, kq, maskt, block.kq_scale, 0.0))
        kqv = own(G.ggml_mul_mat(p, G.ggml_permute(p, V, 0, 2, 1, 3), kq))
        att = own(G.ggml_cont_2d(p, G.ggml_permute(p, kqv, 0, 2, 1, 3), hd * H, n))
        x1 = own(G.ggml_add(p, linear(*L["o"], att), xt))
        h2 = norm(x1, L["ffn_norm"])
        self.out = (x1, h2)
        self.graph = G.Graph(ctx, [], 64, keep=self.bufs)
        for t in (k_store, v_store, h2):  # the stores first: the attention reads what they write
            G.ggml_build_forward_expand(self.graph.ptr, t)
        self.n, self.d = n, d
        self._outs = [np.frombuffer((C.c_char * (n * d * 4)).from_address(t.contents.data), np.float32)
                      .reshape(n, d) for t in self.out]

    def _input(self, shape, dtype) -> np.ndarray:
        a = np.zeros(shape, dtype=dtype)
        self.bufs.append(a)
        return a

    def _own(self, t):
        """Give an op's result its own memory (the context allocates none)."""
        buf = np.empty(G.ggml_nbytes(t), dtype=np.uint8)
        self.bufs.append(buf)
        t.contents.data = buf.ctypes.data
        return t

    def run(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.n
        self.x[:] = x.numpy()
        qpos = np.arange(start, start + n, dtype=np.int32)
        self.pos[:] = qpos
        # causal: token start+i sees keys 0..start+i; the padding keys beyond are masked too
        self.mask[:] = np.where(np.arange(self.mask.shape[1])[None, :] <= qpos[:, None], 0.0, -np.inf)
        # a cpy writes through its result (a view of the destination): re-point both at this position
        k_store, v_store = self.stores
        self.k_dst.contents.data = k_store.contents.data = self.k_base + start * self.k_dst.contents.nb[1]
        self.v_dst.contents.data = v_store.contents.data = self.v_base + start * 4
        self.graph.compute()
        return tuple(torch.from_numpy(o.copy()) for o in self._outs)


class GgmlAttention:
    """`Transformer.fused_attention` for the ggml engine (families on the shared decoder: llama/Mixtral, Qwen2-MoE,
    Qwen3-MoE, OLMoE)."""

    def __init__(self, ckpt: Checkpoint, max_ctx: int):
        c = self.config = ckpt.config
        self.max_ctx = max_ctx
        self.kq_scale = float(np.float32(1.0) / np.sqrt(np.float32(c.head_dim)))
        self.layers = []
        for l in range(c.n_layer):
            b, opt = f"blk.{l}.", ckpt.optional
            L = {"attn_norm": G.weight_tensor(ckpt.tensor(b + "attn_norm.weight")),
                 "ffn_norm": G.weight_tensor(ckpt.tensor(b + "ffn_norm.weight"))}
            for name, w in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output")):
                bias = opt(f"{b}{w}.bias")
                L[name] = (ckpt.tensor(f"{b}{w}.weight"), G.weight_tensor(bias) if bias is not None else None)
            if c.qk_norm:
                L["q_norm"] = G.weight_tensor(ckpt.tensor(b + "attn_q_norm.weight"))
                L["k_norm"] = G.weight_tensor(ckpt.tensor(b + "attn_k_norm.weight"))
            self.layers.append(L)
        self._graphs: dict[tuple, _Graph] = {}

    def new_cache(self, n_ctx: int | None = None) -> GgmlKVCache:
        c = self.config
        return GgmlKVCache(c.n_layer, min(n_ctx or self.max_ctx, self.max_ctx), c.n_head_kv, c.head_dim)

    def __call__(self, l: int, x: torch.Tensor, cache: GgmlKVCache, start: int):
        """(residual stream after attention, FFN input) for hidden rows x [n, d] at positions start.."""
        n = x.shape[0]
        n_kv = min(cache.capacity, max(KV_PAD, -(-(start + n) // KV_PAD) * KV_PAD))  # llama.cpp's get_n_kv
        key = (l, n, n_kv)
        g = self._graphs.get(key)
        if g is None or g.cache_ptrs != (cache.k.data_ptr(), cache.vt.data_ptr()):
            g = _Graph(self, l, n, n_kv, cache)
            if n <= CACHED_MAX_N:
                self._graphs[key] = g
        return g.run(x.contiguous(), start)
