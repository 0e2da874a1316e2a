"""Triton kernels that multiply by GGUF weights in their quantized form: the bytes are read in place and each weight
tile is dequantized in registers inside the matmul, never written back as a dequantized copy.

- `linear_kernel`: y[M, N] = x[M, K] W[N, K]^T (+ b) for one 2-D weight; DOT=False is the decode form (1-16 rows:
  broadcast multiply + row sums), DOT=True the prompt form (tl.dot on the dequantized tiles: tensor cores).
- `gate_up_kernel` / `down_kernel`: grouped experts, one launch each for all (token, expert) pairs of a layer, like
  llama.cpp's `mul_mat_id`. A block is BM pairs of one expert (built by `moecli.kernels.device_ops.pair_blocks`);
  the expert's weights are found through the layer's slot table (expert id -> slot of the byte storage; -1: not on
  the device in this call, the block exits). gate+up are fused with the (gpt-oss clamped) SwiGLU and the biases;
  down adds its bias and applies the routing weight.

Dequantization follows ggml's `dequantize_row_*` (ggml-quants.c) element by element: for element j of a block the
kernel computes which bytes hold its bits and its scales, so every type is one branch of `dequant` and one layout
description in a comment. Everything is byte loads (GGUF blocks of 17, 18, 22... bytes are not aligned for wider
loads); fp16 scales are assembled from two bytes and bitcast. Float arithmetic is ggml's ((d * sc) * q - dmin * m),
in float32; a GPU compiler may contract it into FMAs, so results match `to_float` to fp32 rounding, not bit for bit.
`lut` holds the two 4-bit codebooks as float32: kvalues_iq4nl at 0-15, kvalues_mxfp4 (E2M1 doubled) at 16-31.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ggml type ids (gguf.GGMLQuantizationType values). Compiled kernels may only read globals that are constexpr.
_c = tl.constexpr
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = _c(0), _c(1), _c(2), _c(3), _c(6), _c(7), _c(8)
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = _c(10), _c(11), _c(12), _c(13), _c(14)
IQ4_NL, IQ4_XS, BF16, MXFP4 = _c(20), _c(23), _c(30), _c(39)

OAI_ALPHA, OAI_LIMIT = _c(1.702), _c(7.0)  # gpt-oss's clamped SwiGLU (the constants of moecli.runtime.experts)


@triton.jit
def _u8(p, mask):
    return tl.load(p, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, mask):
    """The little-endian fp16 at byte address p, as float32 (exact)."""
    u = _u8(p, mask) | (_u8(p + 1, mask) << 8)
    return u.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nib32(qs, j, mask):
    """4-bit code of element j (0-31) of a 32-element block: low nibble of qs[j] for j < 16, else high of qs[j-16]."""
    return (_u8(qs + (j & 15), mask) >> ((j >> 4) * 4)) & 15


@triton.jit
def _k_scale_min(s, sb, mask):
    """Q4_K/Q5_K sub-block sb's 6-bit scale and min from the 12 bytes at s (ggml's get_scale_min_k4)."""
    a = _u8(s + sb, mask)
    b = _u8(s + sb + 4, mask)
    c = _u8(s + (sb & 3), mask)
    lo = sb < 4
    sc = tl.where(lo, a & 63, (b & 15) | ((c >> 6) << 4))
    m = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def dequant(row, k, mask, lut, TYPE: tl.constexpr):
    """float32 values of elements k ([1, BK] column indices) of the rows starting at byte pointers `row` ([BN, 1])."""
    if TYPE == F32:
        u = (_u8(row + 4 * k, mask) | (_u8(row + 4 * k + 1, mask) << 8) | (_u8(row + 4 * k + 2, mask) << 16)
             | (_u8(row + 4 * k + 3, mask) << 24))
        v = u.to(tl.float32, bitcast=True)
    elif TYPE == F16:
        v = _f16(row + 2 * k, mask)
    elif TYPE == BF16:
        u = _u8(row + 2 * k, mask) | (_u8(row + 2 * k + 1, mask) << 8)
        v = (u << 16).to(tl.float32, bitcast=True)
    elif TYPE == Q4_0:  # d:f16 | qs[16]; (q - 8) * d
        blk = row + (k >> 5) * 18
        v = (_nib32(blk + 2, k & 31, mask) - 8).to(tl.float32) * _f16(blk, mask)
    elif TYPE == Q4_1:  # d:f16 | m:f16 | qs[16]; q * d + m
        blk = row + (k >> 5) * 20
        v = _nib32(blk + 4, k & 31, mask).to(tl.float32) * _f16(blk, mask) + _f16(blk + 2, mask)
    elif TYPE == Q5_0:  # d:f16 | qh:u32 (bit j = bit 4 of element j) | qs[16]; (q - 16) * d
        blk = row + (k >> 5) * 22
        j = k & 31
        q = _nib32(blk + 6, j, mask) | (((_u8(blk + 2 + (j >> 3), mask) >> (j & 7)) & 1) << 4)
        v = (q - 16).to(tl.float32) * _f16(blk, mask)
    elif TYPE == Q5_1:  # d:f16 | m:f16 | qh:u32 | qs[16]; q * d + m
        blk = row + (k >> 5) * 24
        j = k & 31
        q = _nib32(blk + 8, j, mask) | (((_u8(blk + 4 + (j >> 3), mask) >> (j & 7)) & 1) << 4)
        v = q.to(tl.float32) * _f16(blk, mask) + _f16(blk + 2, mask)
    elif TYPE == Q8_0:  # d:f16 | qs:int8[32]; q * d
        blk = row + (k >> 5) * 34
        b = _u8(blk + 2 + (k & 31), mask)
        v = (b - ((b >> 7) << 8)).to(tl.float32) * _f16(blk, mask)
    elif TYPE == MXFP4:  # e:E8M0 | qs[16]; kvalues_mxfp4[q] * 2^(e-128) (ggml_e8m0_to_fp32_half)
        blk = row + (k >> 5) * 17
        e = _u8(blk, mask)
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        v = tl.load(lut + 16 + _nib32(blk + 1, k & 31, mask)) * scale
    elif TYPE == IQ4_NL:  # d:f16 | qs[16] codes into kvalues_iq4nl; d * kvalues[q]
        blk = row + (k >> 5) * 18
        v = _f16(blk, mask) * tl.load(lut + _nib32(blk + 2, k & 31, mask))
    elif TYPE == Q2_K:  # scales[16] (lo: scale, hi: min) | qs[64] | d | dmin; element 128h+32g+l: bits 2g of qs[32h+l]
        blk = row + (k >> 8) * 84
        j = k & 255
        sc = _u8(blk + (j >> 4), mask)
        q = (_u8(blk + 16 + 32 * (j >> 7) + (j & 31), mask) >> (2 * ((j >> 5) & 3))) & 3
        v = (_f16(blk + 80, mask) * (sc & 15).to(tl.float32)) * q.to(tl.float32) \
            - _f16(blk + 82, mask) * (sc >> 4).to(tl.float32)
    elif TYPE == Q3_K:  # hmask[32] | qs[64] | scales[12] | d; (d * (sc - 32)) * (q2 - (hbit ? 0 : 4))
        blk = row + (k >> 8) * 110
        j = k & 255
        h = j >> 7
        g = (j >> 5) & 3
        l = j & 31
        q2 = (_u8(blk + 32 + 32 * h + l, mask) >> (2 * g)) & 3
        hbit = (_u8(blk + l, mask) >> (4 * h + g)) & 1
        i = j >> 4  # scale i: low nibble i%8 of bytes 0-7 (i < 8: low, else high), 2 high bits at bits 2(i/4) of 8+i%4
        lo = (_u8(blk + 96 + (i & 7), mask) >> (4 * (i >> 3))) & 15
        hi = (_u8(blk + 104 + (i & 3), mask) >> (2 * (i >> 2))) & 3
        dl = _f16(blk + 108, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
        v = dl * (q2 - 4 * (1 - hbit)).to(tl.float32)
    elif TYPE == Q4_K:  # d | dmin | scales[12] | qs[128]: 4 runs of 32 bytes, low nibbles then high nibbles
        blk = row + (k >> 8) * 144
        j = k & 255
        sb = j >> 5
        q = (_u8(blk + 16 + 32 * (j >> 6) + (j & 31), mask) >> (4 * (sb & 1))) & 15
        sc, m = _k_scale_min(blk + 4, sb, mask)
        v = (_f16(blk, mask) * sc) * q.to(tl.float32) - _f16(blk + 2, mask) * m
    elif TYPE == Q5_K:  # d | dmin | scales[12] | qh[32] (bit sb of qh[l]: bit 4 of sub-block sb) | qs[128]
        blk = row + (k >> 8) * 176
        j = k & 255
        sb = j >> 5
        q = (_u8(blk + 48 + 32 * (j >> 6) + (j & 31), mask) >> (4 * (sb & 1))) & 15
        q = q | (((_u8(blk + 16 + (j & 31), mask) >> sb) & 1) << 4)
        sc, m = _k_scale_min(blk + 4, sb, mask)
        v = (_f16(blk, mask) * sc) * q.to(tl.float32) - _f16(blk + 2, mask) * m
    elif TYPE == Q6_K:  # ql[128] | qh[64] | scales:int8[16] | d; element 128h+32g+l
        blk = row + (k >> 8) * 210
        j = k & 255
        h = j >> 7
        g = (j >> 5) & 3
        l = j & 31
        ql = (_u8(blk + 64 * h + 32 * (g & 1) + l, mask) >> (4 * (g >> 1))) & 15
        qh = (_u8(blk + 128 + 32 * h + l, mask) >> (2 * g)) & 3
        s = _u8(blk + 192 + (j >> 4), mask)
        d = _f16(blk + 208, mask) * (s - ((s >> 7) << 8)).to(tl.float32)
        v = d * ((ql | (qh << 4)) - 32).to(tl.float32)
    elif TYPE == IQ4_XS:  # d | scales_h:u16 | scales_l[4] | qs[128]: 8 sub-blocks of 32 as IQ4_NL, 6-bit scales
        blk = row + (k >> 8) * 136
        j = k & 255
        ib = j >> 5
        jj = j & 31
        q = (_u8(blk + 8 + 16 * ib + (jj & 15), mask) >> (4 * (jj >> 4))) & 15
        ls = ((_u8(blk + 4 + (ib >> 1), mask) >> (4 * (ib & 1))) & 15) \
            | (((_u8(blk + 2 + (ib >> 2), mask) >> (2 * (ib & 3))) & 3) << 4)
        v = (_f16(blk, mask) * (ls - 32).to(tl.float32)) * tl.load(lut + q)
    else:
        tl.static_assert(False, "no Triton dequantization for this ggml type")
    return v


@triton.jit
def _mac(acc, x, w, DOT: tl.constexpr):
    """acc[BM, BN] += x[BM, BK] @ w[BN, BK]^T."""
    if DOT:
        acc += tl.dot(x, tl.trans(w))
    else:
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    return acc


@triton.jit
def linear_kernel(x, w, lut, bias, y, M, N, K, row_bytes, sxm, sym,
                  TYPE: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, DOT: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    row = w + rn[:, None].to(tl.int64) * row_bytes
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kin = rk[None, :] < K
        xt = tl.load(x + rm[:, None] * sxm + rk[None, :], mask=(rm[:, None] < M) & kin, other=0.0).to(tl.float32)
        wt = dequant(row, rk[None, :], (rn[:, None] < N) & kin, lut, TYPE)
        acc = _mac(acc, xt, wt, DOT)
    if HAS_BIAS:
        acc += tl.load(bias + rn, mask=rn < N, other=0.0)[None, :]
    tl.store(y + rm[:, None] * sym + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _block(blk_expert, blk_pairs, slot_table, E, BM: tl.constexpr):
    """This program's expert, its slot and its BM pair indices (-1 = padding); slot -1: nothing to do."""
    b = tl.program_id(1)
    e = tl.load(blk_expert + b)
    slot = tl.load(slot_table + tl.minimum(e, E - 1))
    slot = tl.where(e < E, slot, -1)
    pairs = tl.load(blk_pairs + b * BM + tl.arange(0, BM))
    return e, slot, pairs


@triton.jit
def gate_up_kernel(x, sxm, pair_tok, blk_expert, blk_pairs, slot_table, E, storage, slot_bytes, gate_off, up_off,
                   lut, bias_g, bias_u, h, N, K, row_bytes_g, row_bytes_u,
                   TYPE_G: tl.constexpr, TYPE_U: tl.constexpr, HAS_BIAS: tl.constexpr, OAI: tl.constexpr,
                   RELU: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """h[pair, :N] = glu(x[tok] Wg^T + bg, x[tok] Wu^T + bu) for the BM pairs of one block (one expert)."""
    e, slot, pairs = _block(blk_expert, blk_pairs, slot_table, E, BM)
    if slot < 0:
        return
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    valid = pairs >= 0
    tok = tl.load(pair_tok + pairs, mask=valid, other=0)
    base = storage + slot.to(tl.int64) * slot_bytes
    rows_g = base + gate_off + rn[:, None].to(tl.int64) * row_bytes_g
    rows_u = base + up_off + rn[:, None].to(tl.int64) * row_bytes_u
    acc_g = tl.zeros((BM, BN), dtype=tl.float32)
    acc_u = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kin = rk[None, :] < K
        xt = tl.load(x + tok[:, None].to(tl.int64) * sxm + rk[None, :], mask=valid[:, None] & kin,
                     other=0.0).to(tl.float32)
        wmask = (rn[:, None] < N) & kin
        acc_g = _mac(acc_g, xt, dequant(rows_g, rk[None, :], wmask, lut, TYPE_G), DOT)
        acc_u = _mac(acc_u, xt, dequant(rows_u, rk[None, :], wmask, lut, TYPE_U), DOT)
    nin = rn < N
    if HAS_BIAS:
        acc_g += tl.load(bias_g + e * N + rn, mask=nin, other=0.0)[None, :]
        acc_u += tl.load(bias_u + e * N + rn, mask=nin, other=0.0)[None, :]
    if OAI:  # ggml swiglu_oai: x = min(g, limit), y = clamp(u, -limit, limit); x / (1 + exp(-alpha x)) * (y + 1)
        g = tl.minimum(acc_g, OAI_LIMIT)
        u = tl.minimum(tl.maximum(acc_u, -OAI_LIMIT), OAI_LIMIT)
        out = g / (1.0 + tl.exp(g * -OAI_ALPHA)) * (u + 1.0)
    elif RELU:  # ggml reglu: relu(g) * u (SmallThinker)
        out = tl.maximum(acc_g, 0.0) * acc_u
    else:  # silu(g) * u
        out = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h + pairs[:, None].to(tl.int64) * N + rn[None, :], out, mask=valid[:, None] & nin[None, :])


@triton.jit
def down_kernel(h, pair_w, blk_expert, blk_pairs, slot_table, E, storage, slot_bytes, down_off, lut, bias_d, y,
                N, K, row_bytes,
                TYPE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr):
    """y[pair, :N] = (h[pair] Wd^T + bd) * routing weight[pair] for the BM pairs of one block (one expert); zeros
    for an expert not on the device (a reused decode buffer needs no clearing)."""
    e, slot, pairs = _block(blk_expert, blk_pairs, slot_table, E, BM)
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    valid = pairs >= 0
    if slot < 0:
        tl.store(y + pairs[:, None].to(tl.int64) * N + rn[None, :], tl.zeros((BM, BN), tl.float32),
                 mask=valid[:, None] & (rn[None, :] < N))
        return
    rows = storage + slot.to(tl.int64) * slot_bytes + down_off + rn[:, None].to(tl.int64) * row_bytes
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        kin = rk[None, :] < K
        ht = tl.load(h + pairs[:, None].to(tl.int64) * K + rk[None, :], mask=valid[:, None] & kin, other=0.0)
        acc = _mac(acc, ht, dequant(rows, rk[None, :], (rn[:, None] < N) & kin, lut, TYPE), DOT)
    nin = rn < N
    if HAS_BIAS:
        acc += tl.load(bias_d + e * N + rn, mask=nin, other=0.0)[None, :]
    acc = acc * tl.load(pair_w + pairs, mask=valid, other=0.0)[:, None]
    tl.store(y + pairs[:, None].to(tl.int64) * N + rn[None, :], acc, mask=valid[:, None] & nin[None, :])
