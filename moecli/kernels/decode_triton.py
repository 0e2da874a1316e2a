"""Triton kernels of the dense decode block (one token per sequence step), each one launch where torch needs many:

- `rms_norm_kernel`: (x + residual ->) RMSNorm * weight, ggml's rounding (float32 squares summed in double);
- `qk_rope_store_kernel`: per head, the Qwen3 q/k head RMSNorm, RoPE (NEOX or NORM layout, partial rotary) on q
  and k, and k, v stored into the static KV cache at the position read from the device;
- `decode_attn_kernel`: GQA attention of one query per head over the cache (F16 or F32), online softmax, the
  length read from the device (a CUDA graph replays it at every position), a sliding window and attention sinks;
- `route_kernel`: softmax / sigmoid / softmax-over-top-k scores, a selection-only bias, top-k, renormalisation and
  scale in one program per token, ids written as int32 (for the expert kernels) and as float32 (the HostLink's
  packed buffer the host reads);
- `glu_kernel` (silu(g) * u) and `shared_add_kernel` (routed + gated shared expert): the FFNs around the matmuls.

Their torch references and launchers (torch.library custom ops) are in moecli.kernels.decode_ops.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x, res, w, out_x, out_h, N, eps, HAS_RES: tl.constexpr, BN: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * N
    offs = tl.arange(0, BN)
    m = offs < N
    v = tl.load(x + row + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        v = v + tl.load(res + row + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_x + row + offs, v, mask=m)
    mean = tl.sum((v * v).to(tl.float64), axis=0) / N
    scale = 1.0 / tl.sqrt((mean + eps).to(tl.float32))
    tl.store(out_h + row + offs, (v * scale) * tl.load(w + offs, mask=m, other=0.0), mask=m)


@triton.jit
def _head_scale(src, d, md, eps, D: tl.constexpr):
    """1 / sqrt(mean(x^2) + eps) of one head (ggml's rounding)."""
    v = tl.load(src + d, mask=md, other=0.0)
    return 1.0 / tl.sqrt((tl.sum((v * v).to(tl.float64), axis=0) / D + eps).to(tl.float32))


@triton.jit
def qk_rope_store_kernel(q, k, v, qn, kn, cos, sin, pos_ptr, q_out, kc, vc, cache_off, H, HKV, eps,
                         D: tl.constexpr, R: tl.constexpr, NEOX: tl.constexpr, NORM: tl.constexpr,
                         ROPE: tl.constexpr, BD: tl.constexpr):
    """Program h < H: query head h -> q_out; h >= H: key head h - H (and its value) -> the cache at pos."""
    h = tl.program_id(0)
    pos = tl.load(pos_ptr).to(tl.int64)
    d = tl.arange(0, BD)
    md = d < D
    is_q = h < H
    hk = h - H
    src = tl.where(is_q, q + h * D, k + hk * D)
    nw = tl.where(is_q, qn, kn)
    # the partner of each dim in its rotation pair, and the pair's angle index
    if NEOX:
        half = R // 2
        lo = d < half
        pair = tl.where(lo, d + half, d - half)
        j = tl.where(lo, d, d - half)
    else:
        lo = (d % 2) == 0
        pair = tl.where(lo, d + 1, d - 1)
        j = d // 2
    rot = md & (d < R)
    a = tl.load(src + d, mask=md, other=0.0)
    b = tl.load(src + pair, mask=rot, other=0.0)
    if NORM:
        s = _head_scale(src, d, md, eps, D)
        a = (a * s) * tl.load(nw + d, mask=md, other=0.0)
        b = (b * s) * tl.load(nw + pair, mask=rot, other=0.0)
    out = a
    if ROPE:
        c = tl.load(cos + pos * (R // 2) + j, mask=rot, other=1.0)
        sn = tl.load(sin + pos * (R // 2) + j, mask=rot, other=0.0)
        # lo: a cos - b sin (a the first of the pair); hi: b sin + a cos (b the first), as the torch reference
        r = tl.where(lo, a * c - b * sn, b * sn + a * c)
        out = tl.where(rot, r, a)
    if is_q:
        tl.store(q_out + h * D + d, out, mask=md)
    else:
        dst = cache_off + pos * HKV * D + hk * D + d
        tl.store(kc + dst, out.to(kc.dtype.element_ty), mask=md)
        tl.store(vc + dst, tl.load(v + hk * D + d, mask=md, other=0.0).to(vc.dtype.element_ty), mask=md)


@triton.jit
def decode_attn_kernel(q, kc, vc, cache_off, pos_ptr, out, scale, HKV, G, sinks, window,
                       HAS_SINKS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr):
    """out[h] = softmax(q[h] K^T * scale) V over cache positions 0..pos (the last `window` of them if > 0) of KV
    head h // G; with a sink logit per head in the denominator (gpt-oss)."""
    h = tl.program_id(0)
    kvh = h // G
    L = tl.load(pos_ptr).to(tl.int64) + 1
    lo = tl.maximum(L - tl.where(window > 0, window, L), 0)
    d = tl.arange(0, BD)
    md = d < D
    qv = tl.load(q + h * D + d, mask=md, other=0.0).to(tl.float32)
    base = cache_off + kvh * D
    m_i = tl.max(tl.full((BN,), float("-inf"), tl.float32), axis=0)
    l_i = tl.sum(tl.zeros((BN,), tl.float32), axis=0)
    acc = tl.zeros((BD,), tl.float32)
    for start in range(lo, L, BN):
        n = start + tl.arange(0, BN)
        mn = n < L
        off = base + n[:, None].to(tl.int64) * (HKV * D) + d[None, :]
        m2 = mn[:, None] & md[None, :]
        kt = tl.load(kc + off, mask=m2, other=0.0).to(tl.float32)
        s = tl.where(mn, tl.sum(kt * qv[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m_i - m_new)
        vt = tl.load(vc + off, mask=m2, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        m_i = m_new
    if HAS_SINKS:  # one more logit in the denominator, no value
        sink = tl.load(sinks + h)
        m = tl.maximum(m_i, sink)
        alpha = tl.exp(m_i - m)
        l_i = l_i * alpha + tl.exp(sink - m)
        acc = acc * alpha
    tl.store(out + h * D + d, acc / l_i, mask=md)


@triton.jit
def route_kernel(logits, bias, ids_out, ids_f, w_out, probs_out, E, scale, MODE: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_IDS_F: tl.constexpr, NORM_TOPK: tl.constexpr, SCALE: tl.constexpr,
                 K: tl.constexpr, BK: tl.constexpr, BE: tl.constexpr):
    """MODE 0: softmax scores, 1: sigmoid, 2: softmax over the top-k logits (gpt-oss). The bias only selects."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BE)
    me = e < E
    lg = tl.load(logits + row * E + e, mask=me, other=float("-inf"))
    if MODE == 1:
        p = 1.0 / (1.0 + tl.exp(-lg))
    else:
        mx = tl.max(lg, axis=0)
        ex = tl.where(me, tl.exp(lg - mx), 0.0)
        p = ex / tl.sum(ex, axis=0)
    tl.store(probs_out + row * E + e, p, mask=me)
    if MODE == 2:
        sel = lg
        val = lg
    else:
        sel = p
        val = p
    if HAS_BIAS:
        sel = sel + tl.load(bias + e, mask=me, other=0.0)
    sel = tl.where(me, sel, float("-inf"))
    kk = tl.arange(0, BK)
    ids = tl.zeros((BK,), tl.int32)
    wv = tl.zeros((BK,), tl.float32)
    for j in tl.static_range(K):  # k argmax passes, the first index among equals (descending, as torch.topk)
        best = tl.max(sel, axis=0)
        idx = tl.min(tl.where(sel == best, e, BE), axis=0)
        hit = e == idx
        ids = tl.where(kk == j, idx, ids)
        wv = tl.where(kk == j, tl.sum(tl.where(hit, val, 0.0), axis=0), wv)
        sel = tl.where(hit, float("-inf"), sel)
    mk = kk < K
    if MODE == 2:
        top = tl.max(tl.where(mk, wv, float("-inf")), axis=0)
        ex = tl.where(mk, tl.exp(wv - top), 0.0)
        wv = ex / tl.sum(ex, axis=0)
    if NORM_TOPK:
        wv = wv / tl.maximum(tl.sum(tl.where(mk, wv, 0.0), axis=0), 6.103515625e-5)
    if SCALE:
        wv = wv * scale
    tl.store(ids_out + row * K + kk, ids, mask=mk)
    tl.store(w_out + row * K + kk, wv, mask=mk)
    if HAS_IDS_F:
        tl.store(ids_f + row * K + kk, ids.to(tl.float32), mask=mk)


@triton.jit
def glu_kernel(g, u, out, N, BN: tl.constexpr):
    """out = silu(g) * u (the dense and shared FFNs' SwiGLU)."""
    offs = tl.program_id(0) * BN + tl.arange(0, BN)
    m = offs < N
    a = tl.load(g + offs, mask=m, other=0.0)
    tl.store(out + offs, a / (1.0 + tl.exp(-a)) * tl.load(u + offs, mask=m, other=0.0), mask=m)


@triton.jit
def shared_add_kernel(routed, s, h, gate, out, N, HAS_GATE: tl.constexpr, BN: tl.constexpr):
    """out = routed + s (* sigmoid(h . gate): Qwen2-MoE's shared-expert gate), one row."""
    offs = tl.arange(0, BN)
    m = offs < N
    sv = tl.load(s + offs, mask=m, other=0.0)
    if HAS_GATE:
        z = tl.sum(tl.load(h + offs, mask=m, other=0.0) * tl.load(gate + offs, mask=m, other=0.0), axis=0)
        sv = sv * (1.0 / (1.0 + tl.exp(-z)))
    tl.store(out + offs, tl.load(routed + offs, mask=m, other=0.0) + sv, mask=m)
