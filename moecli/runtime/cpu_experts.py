"""Routed experts on the CPU: ggml kernels on the checkpoint's quantized bytes in place (zero-copy on the mmap).

`CpuExperts.run(layer, x, tokens, experts, weights)` computes every (token, expert) pair given to the CPU in ONE ggml
graph: pairs are gathered into b = [d, 1, P] with ids = [1, P], then `mul_mat_id` gate & up -> `swiglu_split` ->
`mul_mat_id` down; the routing weights are applied and the pairs scatter-added per token in numpy, in pair order
(slot order when the caller lists pairs token-major, which reproduces llama.cpp's `ffn_moe_out` bit for bit).

Kernel by batch shape (FACTS §1): `mul_mat_id` ("id") everywhere by default; for Q8_0/F16/BF16/F32 experts with many
tokens per expert a per-expert `ggml_mul_mat` loop ("loop", llamafile sgemm) is 2-2.6x faster. Experts given as
separate 2-D tensors (safetensors) that are not evenly spaced in memory can only use the loop.

Decode pays no graph building: "id" graphs are built once per (layer, pair count) up to `max_cached_pairs`, with
their input/output buffers bound; a call copies the gathered rows and ids in, computes, and scatters.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData
from moecli.kernels import ggml as G
from moecli.models.graph import glu

T = GGMLQuantizationType
# Types whose per-expert mul_mat goes through llamafile's sgemm and beats mul_mat_id on big batches (FACTS §1).
LOOP_TYPES = {T.F32, T.F16, T.BF16, T.Q8_0}
LOOP_MIN_TOKENS_PER_EXPERT = 16  # below this the loop's per-expert graph nodes and small gemms lose (bench)
# Repacked experts (Q4_K...): mul_mat_id runs a gemv per row, the per-expert mul_mat the repacked gemm, which wins
# from 8 tokens per expert (qwen3-30b-a3b layer, 2 threads: 56 vs 56 ms at 8, 80 vs 109 ms at 16)
REPACKED_LOOP_MIN_TOKENS_PER_EXPERT = 8

Experts = TensorData | Sequence[TensorData]  # a 3-D `ffn_*_exps` tensor, or one 2-D tensor per expert


class _Layer:
    """One layer's expert weights: 3-D ggml tensors for mul_mat_id when the experts are evenly spaced in memory, and
    per-expert 2-D TensorData for the loop. `slot` (None: the identity) maps an expert id to its index in the 3-D
    tensors: safetensors files store tensors in name order, so expert 10 comes between 1 and 2 there.
    `biases` (gpt-oss): F32 TensorData of ne (out, E) per projection, or None; `act`: "swiglu" or "swiglu_oai"."""

    def __init__(self, layer: int, gate: Experts, up: Experts, down: Experts, biases=None, act: str = "swiglu"):
        self.act = act
        self.biases = [G.weight_tensor(b) if b is not None else None for b in (biases or (None,) * 3)]
        self.per_expert = [self._split(t) for t in (gate, up, down)]
        g, u, dn = (p[0] for p in self.per_expert)
        self.n_expert = len(self.per_expert[0])
        self.d, self.ff = g.ne
        if u.ne != g.ne or dn.ne != (self.ff, self.d) or any(len(p) != self.n_expert for p in self.per_expert):
            raise MoecliError(f"layer {layer}: expert shapes disagree: gate {g.ne}, up {u.ne}, down {dn.ne} "
                              f"(counts {[len(p) for p in self.per_expert]})")
        self.types = (g.type, u.type, dn.type)
        # stacks repacked for llama.cpp's interleaved kernels (per projection: Q4_K_M's Q6_K down has no repack
        # kernel on x86): the loop runs on 2-D views of the repacked copies, whose file pages are gone
        self.repacked_views = [G.repacked_experts(t) if isinstance(t, TensorData) else None for t in (gate, up, down)]
        self.repacked = any(v is not None for v in self.repacked_views)
        self._ctx = G.Ctx(3)
        stacked = [self._stack(t, p) for t, p in zip((gate, up, down), self.per_expert)]
        # one expert order for the three projections: mul_mat_id gets the same ids for each
        ok = all(s is not None for s in stacked) and all(np.array_equal(s[1], stacked[0][1]) for s in stacked)
        self.stacked = [s[0] for s in stacked] if ok else None
        order = stacked[0][1] if ok else None
        self.slot = None
        if order is not None and (order != np.arange(self.n_expert)).any():
            self.slot = np.empty(self.n_expert, dtype=np.int32)
            self.slot[order] = np.arange(self.n_expert, dtype=np.int32)
        self.plain = act == "swiglu" and not any(self.biases)  # the loop kernel handles only plain experts
        if not self.plain and self.stacked is None:
            raise MoecliError(f"layer {layer}: experts with biases or {act} need evenly spaced expert tensors")

    @staticmethod
    def _split(t: Experts) -> list[TensorData]:
        if isinstance(t, TensorData):
            if len(t.ne) != 3:
                raise MoecliError(f"{t.name}: expected a 3-D expert tensor, got ne={t.ne}")
            return [t.expert(e) for e in range(t.ne[2])]
        return list(t)

    def _stack(self, t: Experts, experts: list[TensorData]):
        """(3-D ggml tensor, expert ids in its order), or None."""
        if isinstance(t, TensorData):
            return G.weight_tensor(t), np.arange(len(experts))
        # Separate tensors: one 3-D tensor with stride nb[2] covers them when they are evenly spaced in memory, in
        # whatever order (mul_mat_id addresses slot s at data + s * nb[2]); otherwise only the loop can run them.
        addrs = np.array([e.raw.ctypes.data for e in experts], dtype=np.int64)
        order = np.argsort(addrs, kind="stable")
        spans = np.diff(addrs[order])
        step = int(spans[0]) if len(spans) else experts[0].raw.nbytes
        if step < experts[0].raw.nbytes or (spans != step).any():
            return None
        if len({(e.type, e.ne) for e in experts}) != 1:
            return None
        w = self._ctx.tensor(experts[0].type, *experts[0].ne, len(experts), data=int(addrs[order[0]]))
        w.contents.nb[2] = step
        w.contents.nb[3] = step * len(experts)
        self.keep = getattr(self, "keep", []) + [experts]  # the views must outlive the tensor
        return w, order


class _Bufs:
    """Gather/result buffers for one pair count (shared by the layers: calls are serialized)."""

    def __init__(self, n_pairs: int, d: int):
        self.x = np.empty((n_pairs, d), dtype=np.float32)
        self.ids = np.empty(n_pairs, dtype=np.int32)
        self.y = np.empty((n_pairs, d), dtype=np.float32)


class CpuExperts:
    """All routed experts of one model on the CPU.

    `layers` maps a layer index to (gate, up, down): each either a 3-D GGUF `ffn_{gate,up,down}_exps` tensor
    (gate/up ne = (d, ff, E), down ne = (ff, d, E)) or a list of per-expert 2-D tensors. Weights are never copied.
    `kernel`: "auto" (by batch shape), "id" (always mul_mat_id) or "loop" (always per-expert mul_mat).
    `biases` maps a layer to its (gate, up, down) bias tensors (gpt-oss); `act` is the gated activation.
    """

    def __init__(self, layers: Mapping[int, tuple[Experts, Experts, Experts]], kernel: str = "auto",
                 max_cached_pairs: int = 64, biases: Mapping[int, tuple] | None = None, act: str = "swiglu"):
        if kernel not in ("auto", "id", "loop"):
            raise MoecliError(f"unknown expert kernel {kernel!r} (auto, id, loop)")
        self.kernel = kernel
        biases = biases or {}
        self.layers = {int(l): _Layer(int(l), *gud, biases=biases.get(l), act=act) for l, gud in layers.items()}
        if not self.layers:
            raise MoecliError("CpuExperts needs at least one layer")
        self.d = next(iter(self.layers.values())).d
        if any(L.d != self.d for L in self.layers.values()):
            raise MoecliError("expert layers disagree on the hidden size")
        ff = max(L.ff for L in self.layers.values())
        self.max_cached_pairs = max_cached_pairs
        # gate, up and activation of every cached graph live here (one run at a time); biased experts add the
        # biased gate, up and the unbiased down projection.
        self._n_scratch = 3 if all(L.plain for L in self.layers.values()) else 6
        self._scratch = np.empty((self._n_scratch, max_cached_pairs, max(ff, self.d)), dtype=np.float32)
        self._bufs: dict[int, _Bufs] = {}
        self._loop_bufs: np.ndarray | None = None  # the loop kernel's result rows and expert scratch, grown
        self._graphs: dict[tuple[int, int], G.Graph] = {}
        self._lock = threading.Lock()
        self._worker: ThreadPoolExecutor | None = None
        self.busy_s = 0.0  # wall seconds inside `run`, cumulative (what bench and cpu_parity report per layer)
        self.runs = 0
        self.log: list | None = None  # a list: each call's (layer, x, tokens, experts, weights, seconds), copied

    # -- public ---------------------------------------------------------------------------------------------------

    def run(self, layer: int, x, tokens, experts, weights):
        """Sum over pairs i of weights[i] * expert_{experts[i]}(x[tokens[i]]), per token: x [n_tok, d] float32
        (numpy or CPU torch) -> [n_tok, d] of the same kind (rows with no pair are zero). Pairs are added in the
        order given. Raises MoecliError on an expert id or token index out of range (ggml would not check)."""
        is_torch = hasattr(x, "data_ptr")
        xn = x.numpy() if is_torch else x
        t0 = time.perf_counter()
        args = (xn, _np(tokens), _np(experts), _np(weights))
        out = self._run(layer, *args)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        self.runs += 1
        if self.log is not None:
            self.log.append((layer, *(a.copy() for a in args), dt))
        if is_torch:
            import torch

            return torch.from_numpy(out)
        return out

    def submit(self, layer: int, x, tokens, experts, weights) -> Future:
        """`run` on the worker thread (ggml computes without the GIL, so the caller overlaps). Do not modify the
        inputs until the future is done."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="moecli-cpu-experts")
        return self._worker.submit(self.run, layer, x, tokens, experts, weights)

    def warmup(self, max_pairs: int) -> None:
        """Build the mul_mat_id graphs for 1..max_pairs pairs in every layer (decode then never builds one)."""
        with self._lock:
            for l in self.layers:
                for p in range(1, min(max_pairs, self.max_cached_pairs) + 1):
                    self._id_graph(l, p)

    def release_buffers(self) -> None:
        """Drop the loop kernel's prompt-sized buffers (decode does not use them)."""
        with self._lock:
            self._loop_bufs = None

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
            self._worker = None

    def choose_kernel(self, layer: int, n_pairs: int, n_active: int) -> str:
        L = self.layers[layer]
        if not L.plain:
            return "id"
        if self.kernel != "auto":
            return "loop" if L.stacked is None else self.kernel
        if L.stacked is None:
            return "loop"
        if set(L.types) <= LOOP_TYPES and n_pairs >= LOOP_MIN_TOKENS_PER_EXPERT * n_active:
            return "loop"
        if L.repacked and n_pairs >= REPACKED_LOOP_MIN_TOKENS_PER_EXPERT * n_active:
            return "loop"
        return "id"

    # -- internals ------------------------------------------------------------------------------------------------

    def _run(self, layer, x, tok, ids, w) -> np.ndarray:
        L = self.layers.get(layer)
        if L is None:
            raise MoecliError(f"no CPU experts for layer {layer}")
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != L.d:
            raise MoecliError(f"layer {layer}: x must be float32 [n_tok, {L.d}], got {x.dtype} {x.shape}")
        P = len(ids)
        if len(tok) != P or len(w) != P:
            raise MoecliError(f"layer {layer}: {len(tok)} token indices, {P} expert ids, {len(w)} weights")
        n_tok = x.shape[0]
        out = np.zeros((n_tok, L.d), dtype=np.float32)
        if P == 0:
            return out
        # ggml's mul_mat_id reads expert ids unchecked: validate every call.
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= L.n_expert:
            raise MoecliError(f"layer {layer}: expert id {lo if lo < 0 else hi} out of range (0..{L.n_expert - 1})")
        lo, hi = int(tok.min()), int(tok.max())
        if lo < 0 or hi >= n_tok:
            raise MoecliError(f"layer {layer}: token index {lo if lo < 0 else hi} out of range (0..{n_tok - 1})")
        w = w.astype(np.float32, copy=False)
        with self._lock:
            if P > self.max_cached_pairs:
                active = len(np.unique(ids))
            else:
                active = P  # small batches: "id" unless forced; skip the unique
            if self.choose_kernel(layer, P, active) == "loop":
                y = self._loop(L, x, tok, ids)
            elif P <= self.max_cached_pairs:
                g = self._id_graph(layer, P)
                b = self._bufs[P]
                np.take(x, tok, axis=0, out=b.x)
                b.ids[:] = ids if L.slot is None else L.slot[ids]
                g.compute()
                y = b.y
            else:
                y = self._id_uncached(L, x, tok, ids)
            y *= w[:, None]
            _scatter_add(out, tok, y)
        return out

    def _id_graph(self, layer: int, P: int) -> G.Graph:
        g = self._graphs.get((layer, P))
        if g is None:
            b = self._bufs.get(P)
            if b is None:
                b = self._bufs[P] = _Bufs(P, self.d)
            s = self._scratch
            g = self._graphs[(layer, P)] = self._build_id(self.layers[layer], P, b.x, b.ids, b.y,
                                                          [s[i, :P].ctypes.data for i in range(self._n_scratch)])
        return g

    def _id_uncached(self, L: _Layer, x, tok, ids) -> np.ndarray:
        P = len(ids)
        xb = np.take(x, tok, axis=0)
        idb = (ids if L.slot is None else L.slot[ids]).astype(np.int32)
        y = np.empty((P, L.d), dtype=np.float32)
        s = np.empty((self._n_scratch, P, max(L.ff, L.d)), dtype=np.float32)
        self._build_id(L, P, xb, idb, y, [s[i].ctypes.data for i in range(self._n_scratch)], keep=[s]).compute()
        return y

    @staticmethod
    def _build_id(L: _Layer, P: int, xb, idb, yb, scratch, keep=()) -> G.Graph:
        gate, up, down = L.stacked
        bg, bu, bd = L.biases
        ctx = G.Ctx(12, 12)
        xt = ctx.tensor(T.F32, L.d, 1, P, data=xb.ctypes.data)
        it = ctx.tensor(G.GGML_TYPE_I32, 1, P, data=idb.ctypes.data)
        nodes = [G.ggml_mul_mat_id(ctx.ptr, gate, xt, it), G.ggml_mul_mat_id(ctx.ptr, up, xt, it)]
        g, u = nodes
        if bg:  # as llama.cpp's build_moe_ffn: each pair's expert bias added by ggml_add_id
            g = G.ggml_add_id(ctx.ptr, g, bg, it)
            nodes.append(g)
        if bu:
            u = G.ggml_add_id(ctx.ptr, u, bu, it)
            nodes.append(u)
        a = glu(ctx.ptr, g, u, L.act)
        y = G.ggml_mul_mat_id(ctx.ptr, down, a, it)
        nodes += [a, y]
        if bd:
            y = G.ggml_add_id(ctx.ptr, y, bd, it)
            nodes.append(y)
        for t, p in zip(nodes[:-1], scratch):
            t.contents.data = p
        nodes[-1].contents.data = yb.ctypes.data
        return G.Graph(ctx, [y], 12, keep=[xb, idb, yb, *keep])

    def _loop_buffers(self, P: int, d: int, rows: int, ff: int):
        """The result rows [P, d] and one expert's scratch (its gathered rows, gate/activation, up, output: `rows`
        deep), kept from one prompt-sized call to the next: the result is tens of MB, which malloc would map fresh
        (and the kernel fault in page by page) every call. `release_buffers` drops them (the one-graph forward
        does when it starts decoding)."""
        size = P * d + rows * (2 * d + 2 * ff)
        if self._loop_bufs is None or self._loop_bufs.size < size:
            self._loop_bufs = np.empty(size, dtype=np.float32)
        return self._loop_bufs[:P * d].reshape(P, d), self._loop_bufs[P * d:size]

    def _loop(self, L: _Layer, x, tok, ids) -> np.ndarray:
        """Per-expert ggml_mul_mat in one graph built for this call (its shape depends on the routing): per expert,
        get_rows gathers its tokens' rows, gate/up/swiglu/down run on them in one scratch (ggml runs the nodes one
        after another), set_rows writes the outputs at the pairs' places. The result is a view of a buffer the
        next call reuses (calls are serialized under the lock)."""
        P, x = len(ids), np.ascontiguousarray(x)
        order = np.argsort(ids, kind="stable")
        experts, starts, counts = np.unique(ids[order], return_index=True, return_counts=True)
        rows = np.ascontiguousarray(tok[order], dtype=np.int32)  # the token row of each pair, by expert
        dest = order.astype(np.int32)  # where each pair's output goes (the caller's pair order)
        n_tok, c_max = x.shape[0], int(counts.max())
        out, scratch = self._loop_buffers(P, L.d, c_max, L.ff)
        ctx = G.Ctx(10 * len(experts) + 4, 8 * len(experts))
        x_t = ctx.tensor(T.F32, L.d, n_tok, data=x.ctypes.data)
        out_t = ctx.tensor(T.F32, L.d, P, data=out.ctypes.data)
        rows_t = ctx.tensor(G.GGML_TYPE_I32, P, data=rows.ctypes.data)
        dest_t = ctx.tensor(G.GGML_TYPE_I32, P, data=dest.ctypes.data)
        base = scratch.ctypes.data
        xs, gs, us, ys = base, base + 4 * c_max * L.d, base + 4 * c_max * (L.d + L.ff), \
            base + 4 * c_max * (L.d + 2 * L.ff)
        views = L.repacked_views

        def W(i, e):
            return views[i][e] if views[i] is not None else G.weight_tensor(L.per_expert[i][e])
        outs = []
        for e, s0, c in zip(experts.tolist(), starts.tolist(), counts.tolist()):
            xe = G.ggml_get_rows(ctx.ptr, x_t, G.ggml_view_1d(ctx.ptr, rows_t, c, 4 * s0))
            g = G.ggml_mul_mat(ctx.ptr, W(0, e), xe)
            u = G.ggml_mul_mat(ctx.ptr, W(1, e), xe)
            a = G.ggml_swiglu_split(ctx.ptr, g, u)  # elementwise: written over the gate rows
            y = G.ggml_mul_mat(ctx.ptr, W(2, e), a)
            for t, p in ((xe, xs), (g, gs), (u, us), (a, gs), (y, ys)):
                t.contents.data = p
            outs.append(G.ggml_set_rows(ctx.ptr, out_t, y, G.ggml_view_1d(ctx.ptr, dest_t, c, 4 * s0)))
        G.Graph(ctx, outs, 8 * len(experts), keep=[x, rows, dest, out, scratch]).compute()
        return out


def _scatter_add(out: np.ndarray, tok: np.ndarray, y: np.ndarray) -> None:
    """out[tok[i]] += y[i] for every pair, each token's pairs added in the given order (llama.cpp adds its k expert
    outputs in slot order; float addition is not associative). np.add.at does this but ~40x slower. Instead lay the
    pairs out as [n_tok, pairs per token, d] (a no-op when the caller lists them token-major with k per token, the
    usual case) and reduce over the middle axis, which numpy does row after row, in order."""
    n_tok, P = out.shape[0], len(tok)
    if n_tok == 1:
        np.add.reduce(y, axis=0, out=out[0])
        return
    if P > 1 and not (tok[1:] >= tok[:-1]).all():
        order = np.argsort(tok, kind="stable")
        tok, y = tok[order], y[order]
    counts = np.bincount(tok, minlength=n_tok)
    c = int(counts.max())
    if P == c * n_tok:  # every token has c pairs
        np.add.reduce(y.reshape(n_tok, c, -1), axis=1, out=out)
        return
    rank = np.arange(P) - (np.cumsum(counts) - counts)[tok]  # position of each pair within its token
    padded = np.zeros((n_tok, c, y.shape[1]), dtype=np.float32)
    padded[tok, rank] = y  # trailing zeros add nothing
    np.add.reduce(padded, axis=1, out=out)


def _np(a) -> np.ndarray:
    if hasattr(a, "numpy"):
        a = a.detach().cpu().numpy() if hasattr(a, "detach") else a.numpy()
    return np.asarray(a).reshape(-1)
