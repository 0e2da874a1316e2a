"""The CPU engine's forward pass as ONE ggml graph, built as llama.cpp builds it, for every family: each layer by
its family's `build_layer` (models/<arch>.py) on the shared blocks of models/graph.py, from the tensors its layer
spec names (models/spec.py). This module runs the graphs: shapes, caches, kept decode graphs, split mode.

Per layer: attn_norm -> q/k/v (+ biases, q/k RMSNorm) -> RoPE -> K and V stored in the cache -> kq = K·q,
softmax with the causal mask and 1/sqrt(d) -> kqv = V·kq -> o (+ bias) -> residual -> ffn_norm -> router ->
softmax -> top-k -> weights (renormalised where the family does) -> gate/up `mul_mat_id` -> swiglu -> down ->
weighted sum in slot order (+ the shared expert behind its sigmoid gate) -> residual; then output_norm and the
output head. The KV cache has llama.cpp's F32 layout (K [pos, kv_head, dim], V transposed [kv_head, dim, pos]) and
its attended key count padded to 256, so every sum runs over llama.cpp's shapes and the logits are bit-exact where
the weights need no repacking (and in exact mode for every type).

Attention: decode steps take llama.cpp's non-flash path (kq, soft_max, kqv: faster for one row here); prompts by
default ggml's flash attention over the same cache (V rows copied out of the transposed cache): the causal mask's
keys are skipped and no n x n_kv score matrix is made, 1.9x faster at 512 tokens and more with depth, equal to
float rounding. Exact mode (runtime/exact.py: llama.cpp's kernel choices, non-flash attention included) gives
llama.cpp's logits bit for bit for every weight type.

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

from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G
from moecli.models.config import Checkpoint
from moecli.models.graph import SEGMENT_NODES, GraphBuilder
from moecli.models.layers import begin_recurrent
from moecli.models.loader import GGUF_ARCHS
from moecli.models.rope import attn_temperature, ggml_rope
from moecli.models.spec import layer_tensors
from moecli.runtime.exact import DEFAULT, Kernels

T = GGMLQuantizationType
KV_PAD = 256  # llama.cpp pads its cache size and the attended key count to 256
CACHED_MAX_N = 4  # batches up to this size keep their graphs (decode, short drafts)
KEPT_GRAPHS = 32  # decode graphs kept (one per batch shape and caches: several slots, their 256-key buckets)
UBATCH = 512  # the most tokens one graph takes (llama.cpp's default n_ubatch)


class GgmlKVCache:
    """K [layer, pos, kv_head, dim] and V transposed [layer, kv_head, v_dim, pos], float32, capacity padded to 256
    (DeepSeek's MLA: v_dim differs from dim, or is 0 where the values are the cached latents), for the attention
    layers. `states` (n_layers, conv floats, delta-rule floats): the recurrent layers' state per layer (Gated
    DeltaNet: the short convolution's last inputs and the delta rule's matrices), which stands for every position
    before `state_pos` at once, so the sequence can only go on from there (or start again at 0)."""

    def __init__(self, n_layer: int, n_ctx: int, n_head_kv: int, head_dim: int, v_dim: int | None = None,
                 states: tuple[int, int, int] | None = None):
        cap = -(-n_ctx // KV_PAD) * KV_PAD
        self.k = torch.zeros(n_layer, cap, n_head_kv, head_dim)
        self.vt = torch.zeros(n_layer, n_head_kv, head_dim if v_dim is None else v_dim, cap)  # 0: none (MLA)
        self.n_ctx, self.capacity = n_ctx, cap
        self.pos = 0
        self.conv = self.ssm = None
        if states is not None:
            n_rec, conv, ssm = states
            self.conv, self.ssm = torch.zeros(n_rec, conv), torch.zeros(n_rec, ssm)
        self.state_pos = 0  # the position the recurrent state has reached

    @property
    def nbytes(self) -> int:
        rs = 0 if self.conv is None else self.conv.numel() + self.ssm.numel()
        return (self.k.numel() + self.vt.numel() + rs) * 4

    begin = begin_recurrent


def supported(ckpt: Checkpoint, experts) -> bool:
    """Whether the one-graph forward can run this checkpoint: expert stacks ggml can address as 3-D tensors, plain
    SwiGLU experts without biases, gpt-oss's clamped SwiGLU with them, SmallThinker's ReGLU (GraphBuilder.build_moe_ffn)."""
    c = ckpt.config
    if c.rope_scaling == "yarn" and not c.yarn_truncate:  # ggml's rope rounds YaRN's correction range
        return False
    if c.group_score != "top2":  # transformers' DeepSeek-V2 group scoring: not llama.cpp's
        return False
    if not c.is_moe:
        return True
    return experts is not None and all(L.stacked is not None and (L.plain or c.expert_act != "swiglu")
                                       for L in experts.engine.layers.values())


class _Step:
    """The graph of one forward shape: a batch of sequences, each n_i tokens of its own cache over its first n_kv_i
    keys (`seqs`: (cache, n_i, n_kv_i)), logits of every token or of each sequence's last one, built by the family's
    `build_layer` on a GraphBuilder (models/graph.py).

    Every matmul (dense weights, router, experts) runs over the whole batch's tokens; only the attention is per
    sequence (its K/V store and its masked softmax over its own cache), as llama.cpp's batch of several seq ids.
    One sequence is the plain forward; several are continuous batching's decode step."""

    def __init__(self, fwd: "GgmlForward", seqs: list[tuple[GgmlKVCache, int, int]], all_logits: bool,
                 kept: bool, split: bool = False):
        c = fwd.config
        self.fwd = fwd
        n = self.n = sum(n_i for _, n_i, _ in seqs)
        single = len(seqs) == 1
        # decode reads llama.cpp's repacked copies of the dense weights where they exist (its faster gemv);
        # prompts the file's own layout (this CPU's AVX-512 kernels beat the repacked ones on big batches), except
        # in exact mode (runtime/exact.py)
        rp = fwd.kernels.dense_repacked(n <= CACHED_MAX_N or not single)
        W = lambda t: None if t is None else G.weight_tensor(t, rp)  # noqa: E731
        n_nodes = (96 + 24 * len(seqs)) * c.n_layer + 64 + 4 * len(seqs)  # each sequence adds its attention
        # room for one graph of the whole pass, or (split) one graph per layer plus the head
        ctx = self.ctx = G.Ctx(n_nodes, 2 * n_nodes if not split else SEGMENT_NODES * 2 * (c.n_layer + 1))
        # prompts: flash attention (its masked keys are skipped, no n x n_kv scores); decode: llama.cpp's
        # non-flash path, faster for one row here. The latent (absorbed MLA) form keeps the non-flash path.
        Hkv, hd, dv = fwd.kv_shape
        flash = fwd.kernels.flash_attn and single and n > CACHED_MAX_N and dv > 0
        # `split` (prompts whose experts run faster as per-expert matmuls, see CpuExperts): one graph per layer
        # that ends at the routing; the experts then run through CpuExperts and their sum feeds the next graph
        g = self.g = GraphBuilder(ctx, c, W, fwd.rope, seqs=seqs, kv_shape=fwd.kv_shape, flash=flash,
                                  all_logits=all_logits, split=split, attn_v_dim=c.v_head_dim or dv)
        self.split = split
        x = g.embed(fwd.token_embd)
        for l, L in enumerate(fwd.layers):
            x = fwd.build_layer(g, l, L, x)
        logits = g.output(x, fwd.output_norm, fwd.output)
        self.logits, self.m, self.n_vocab = logits, g.m, c.n_vocab
        self.stores, self.routing, self.segments = g.stores, g.routing, g.segments
        # decode graphs are kept, each with its own allocation; prompt graphs (used once) share the forward's, which
        # keeps its buffer from one prompt batch to the next (micro-batches, back-to-back prompts) as llama.cpp
        # keeps its compute buffer: a fresh one of ~100 MB is faulted in page by page (~10 % of a 512-token pass).
        # Decoding gives it back, so the model decodes in no more memory than its file.
        self.owns_galloc = kept
        self.galloc = G.ggml_gallocr_new(G.ggml_backend_cpu_buffer_type()) if self.owns_galloc else \
            fwd.prompt_galloc()
        if split:
            self.segments.append(g.segment([logits], None))
            return
        self.graph = G.Graph(ctx, [], 2 * n_nodes)
        for _, store, *_ in self.stores:  # the stores first: the attention reads what they write
            G.ggml_build_forward_expand(self.graph.ptr, store)
        G.ggml_build_forward_expand(self.graph.ptr, logits)
        for _, probs, _, _ in self.routing:  # reported to on_router; nothing else may consume them (gpt-oss)
            G.ggml_build_forward_expand(self.graph.ptr, probs)
        if not G.ggml_gallocr_alloc_graph(self.galloc, self.graph.ptr):
            raise MemoryError("ggml could not allocate the forward graph")

    def run(self, tokens: list[int], starts: list[int], on_router=None) -> torch.Tensor:
        """Logits of the batch `tokens` (each sequence's n_i in order), sequence i's at positions starts[i].."""
        g = self.g
        g.tokens[:] = tokens
        row = 0
        for n, start, mask, mask_swa in zip(g.sizes, starts, g.masks, g.masks_swa):
            qpos = np.arange(start, start + n, dtype=np.int32)
            g.pos[row:row + n] = qpos
            row += n
            # causal: token start+i sees its own sequence's keys 0..start+i; the padding keys beyond are masked too
            kpos = np.arange(mask.shape[1])[None, :]
            np.copyto(mask, np.where(kpos <= qpos[:, None], 0.0, -np.inf))
            if mask_swa is not None:
                np.copyto(mask_swa, np.where(swa_visible(self.fwd.config, qpos[:, None], kpos), 0.0, -np.inf))
            if g.attn_scale is not None:
                g.attn_scale[row - n:row] = attn_temperature(self.fwd.config, qpos)
        if g.pos4 is not None:
            g.pos4[:3 * g.n] = np.tile(g.pos, 3)
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
            if c.weight_input:  # llama4: each pair's expert reads its token's row times its weight
                hw = np.ascontiguousarray((h[:, None, :] * wt.reshape(m, k, 1)).reshape(m * k, d))
                y = engine.run(l, hw, np.arange(m * k, dtype=np.int32), ids, np.ones_like(wt)).reshape(m, k, d)
                out = y[:, 0].copy()
                for i in range(1, k):  # in slot order, as the graph adds them
                    out += y[:, i]
            else:
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


def swa_visible(c, qpos, kpos):
    """Causal, and within the sliding window (llama.cpp's LLAMA_SWA_TYPE_STANDARD) or the query's own chunk
    (LLAMA_SWA_TYPE_CHUNKED: llama4)."""
    causal = kpos <= qpos
    if c.attn_chunk:
        return causal & (kpos >= qpos // c.attn_chunk * c.attn_chunk)
    return causal & (qpos - kpos < c.sliding_window)


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

    def __init__(self, ckpt: Checkpoint, experts, max_ctx: int, kernels: Kernels = DEFAULT):
        """`kernels`: the kernel choices (runtime/exact.py): the fast default or llama.cpp's own (exact mode)."""
        c = self.config = ckpt.config
        self.max_ctx, self.experts, self.kernels = max_ctx, experts, kernels
        self._prompt_galloc = None
        family = GGUF_ARCHS[c.arch]
        self.build_layer, self.kv_shape = family.build_layer, family.kv_shape(c)
        self.rope = ggml_rope(c)
        W, opt = ckpt.tensor, ckpt.optional
        self.token_embd = W("token_embd.weight")
        self.output_norm = W("output_norm.weight")
        self.output = W("output.weight") if opt("output.weight") is not None else self.token_embd
        self.layers = []
        for l in range(c.n_layer):
            L = layer_tensors(ckpt, family.SPEC, l)
            b = f"blk.{l}."
            if "ffn_gate_inp" in L:  # the experts' stacks as the CPU experts engine holds them
                L["experts"] = experts.engine.layers[l].stacked
                L["slot"] = experts.engine.layers[l].slot  # expert id -> index in those tensors, or None
                stacks = [ckpt.experts[f"{b}ffn_{p}_exps"] for p in ("gate", "up", "down")]
                if all(st.bias is not None for st in stacks):  # gpt-oss
                    L["expert_biases"] = tuple(st.bias for st in stacks)
            self.layers.append(L)
        for t in self._dense_weights():  # repacked copies (for decode; the file's bytes stay for prompts)
            G.repack(t, release_source=not kernels.keep_file_layout and t is not self.token_embd)
        self._steps: dict[tuple, _Step] = {}

    @property
    def flash_attn(self) -> bool:
        return self.kernels.flash_attn

    def _dense_weights(self):
        """The 2-D matrices the graph multiplies by (not the embeddings, read by get_rows, nor MLA's per-head 3-D
        k_b/v_b; routers and a tied output head as the kernel choices say)."""
        for L in self.layers:
            for key, t in L.items():
                if isinstance(t, TensorData) and len(t.ne) == 2 and self.kernels.repacks(key) \
                        and not key.startswith("ssm_conv1d"):  # DeltaNet's conv weights: ggml_ssm_conv reads them
                    yield t
        if self.output is not self.token_embd or self.kernels.tied_output_repacked:
            yield self.output

    def _split(self, n: int) -> bool:
        """Run this batch's experts outside the graph? When CpuExperts would pick its per-expert matmul kernel
        (Q8_0/F16/BF16/F32 experts and prompt-sized batches: llamafile's sgemm beats mul_mat_id there)."""
        c = self.config
        if not c.is_moe or n <= CACHED_MAX_N or not self.kernels.split_experts():
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
        family = GGUF_ARCHS[c.arch]
        states = family.state_shape(c) if hasattr(family, "state_shape") else None
        return GgmlKVCache(c.n_layer - len(c.recurrent_layers), min(n_ctx or self.max_ctx, self.max_ctx), Hkv, dk,
                           dv, states)

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
        for t, cache, start in batch:
            cache.begin(start)
        logits = step.run([t for b in batch for t in b[0]], [start for _, _, start in batch], on_router)
        for t, cache, start in batch:
            cache.state_pos = start + len(t)
        return logits
