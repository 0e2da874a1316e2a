"""Dequantize GGUF tensors with torch on any device, bit-identical (in float32) to ggml's own `to_float`.

The device expert cache keeps experts in the quantized form they were copied in (3-4x less PCIe traffic than bf16)
and expands one expert matrix right before computing with it. Everything here is vectorised torch on uint8 views:
no Python loop over blocks, no host sync, no host->device copy per call (the few small constant tables are cached
per device), so the same code is correct on the CPU (where the tests run it) and fast on CUDA.

How exactness is kept (`dequantize_row_*` in ggml-quants.c is the reference; gguf.quants does the same arithmetic):
- integer parts (nibbles, high bits, 6-bit scales, sign offsets) are assembled exactly in uint8/int8, then each
  float operation ggml does is done once, in float32, in ggml's order: e.g. Q4_K is `(d*sc) * q - (dmin*m)` with the
  two products rounded to float32 first, Q6_K is `(d*sc) * q`. Integer -> float32 conversions are exact, and
  float32 multiplication is commutative, so only the grouping (which product is rounded first) matters, and it is
  the same as ggml's. Eager torch runs every op as its own kernel, so no op is fused into an FMA (which would round
  once instead of twice); do not torch.compile this module without checking exactness again.
- fp16 scales are converted fp16 -> fp32 (exact); MXFP4's E8M0 scale is built from its bit pattern like ggml's
  `ggml_e8m0_to_fp32_half` (which yields fp32 subnormals for e < 2: torch keeps them, it does not flush denormals
  unless told to with torch.set_flush_denormal).
- NaN/Inf scales give NaN/Inf in the same positions as ggml (IEEE arithmetic); only NaN payload bits may differ.

Output dtype: always computed in float32, then cast when `dtype` is bf16/fp16 (one rounding, round-to-nearest-even,
of the exact float32 value). F16 -> float16 and BF16 -> bfloat16 are returned as exact copies without a round trip.
The result is always a new tensor (never a view of `raw`, which may be a cache slot that is about to be reused).

Memory per call: the output, plus transient uint8/int8 tensors of about one byte per element (the unpacked integer
values) and a few per-block scale tensors; bf16/fp16 outputs also hold the float32 result until the cast.
Kernel launches per call: 5-20 (Q8_0 fewest, the K-quants most); on a GPU a 768x2048 matrix is launch-bound, not
bandwidth-bound, so CUDA graphs or one fused kernel are the next step if this shows in profiles.
"""
from __future__ import annotations

import functools
import math
import time

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType
QK_K = 256

# ggml's non-linear 4-bit codebooks (int8): kvalues_iq4nl, and kvalues_mxfp4 (E2M1 values doubled: the scale is
# E8M0 halved to compensate).
_KV_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_KV_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


# CPU torch does not vectorise uint8 ops broadcast against a tensor (3-6x slower): there `_fields` does one scalar
# shift per field (count <= 8) and one copy; on CUDA one broadcast kernel is cheaper than 2*count+1 small launches.
_FIELD_BY_FIELD = frozenset({"cpu"})


@functools.lru_cache(maxsize=None)
def _const(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant table, built once per device (no host->device copy on the hot path)."""
    return torch.tensor(values, dtype=dtype, device=device)


def _shifts(width: int, count: int, device) -> torch.Tensor:
    return _const(tuple(range(0, width * count, width)), device, torch.uint8)


def _fields(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """(..., n) uint8 -> (..., count, n) uint8: [k, i] = bit field k (`width` bits, from the LSB) of byte i.

    This is the layout every ggml type packs low-bit values in: element group k of a run of n bytes lives in bits
    [k*width, (k+1)*width) of those same n bytes (e.g. Q4: low nibbles are the first half of the block)."""
    mask = (1 << width) - 1
    if b.device.type in _FIELD_BY_FIELD:
        return torch.stack([(b >> (width * k)) & mask for k in range(count)], dim=-2)
    out = b.unsqueeze(-2) >> _shifts(width, count, b.device).view(count, 1)
    return out.bitwise_and_(mask)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(nb, 2k) uint8: k adjacent little-endian fp16 fields -> (nb, k) float32. The copy to a contiguous tensor makes
    the 2-byte view legal whatever the offset of the field (blocks are 17, 18, 22... bytes: often unaligned)."""
    return b.contiguous().view(torch.float16).float()


def _empty(b: torch.Tensor, *shape) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=b.device)


def _lut_bytes(qs: torch.Tensor, kvalues: tuple) -> torch.Tensor:
    """(..., n) uint8 codes -> (..., 2, n) int8 codebook values (low nibbles then high nibbles), via a 256-entry
    table indexed by whole bytes (one gather per byte instead of per nibble). The result is a transposed view:
    multiply it into an `_empty` output (elementwise ops lay their output out like their inputs)."""
    table = _const(tuple((kvalues[b & 15], kvalues[b >> 4]) for b in range(256)), qs.device, torch.int8)
    v = table.index_select(0, qs.int().reshape(-1)).view(*qs.shape, 2)
    return v.transpose(-1, -2)


# --------------------------------------------------------------------------------------------------------------
# One function per type: blocks (nb, type_size) uint8 -> (nb, block_size) float32. The comments give the layout of
# a block in bytes (ggml's `block_*` structs in ggml-common.h).


def _q4_0(b):  # d:f16 | qs[16]: element j = low nibble of qs[j], element 16+j = high nibble; value = (q - 8) * d
    nb = b.shape[0]
    q = _fields(b[:, 2:], 4, 2).sub_(8).view(torch.int8)  # uint8 wrap-around == the int8 value q - 8
    return torch.mul(q, _f16(b[:, :2]).view(nb, 1, 1)).view(nb, 32)


def _q4_1(b):  # d:f16 | m:f16 | qs[16]; value = q * d + m
    nb = b.shape[0]
    dm = _f16(b[:, :4]).view(nb, 2, 1, 1)
    return torch.mul(_fields(b[:, 4:], 4, 2), dm[:, 0]).add_(dm[:, 1]).view(nb, 32)


def _q5(b, qs_at):
    """The 5-bit values of Q5_0/Q5_1: a nibble from qs plus bit e of the little-endian uint32 qh as bit 4."""
    nb = b.shape[0]
    qh = b[:, qs_at - 4:qs_at].unsqueeze(-1) >> _shifts(1, 8, b.device)  # (nb, 4 bytes, 8 bits) = bit 8*byte+k
    q = _fields(b[:, qs_at:], 4, 2).view(nb, 32)
    return q.bitwise_or_(qh.bitwise_and_(1).view(nb, 32) << 4)


def _q5_0(b):  # d:f16 | qh:u32 | qs[16]; value = (q - 16) * d
    q = _q5(b, 6).sub_(16).view(torch.int8)
    return torch.mul(q, _f16(b[:, :2]))


def _q5_1(b):  # d:f16 | m:f16 | qh:u32 | qs[16]; value = q * d + m
    dm = _f16(b[:, :4])
    return torch.mul(_q5(b, 8), dm[:, :1]).add_(dm[:, 1:])


def _q8_0(b):  # d:f16 | qs: int8[32]; value = q * d
    return torch.mul(b[:, 2:].view(torch.int8), _f16(b[:, :2]))


def _mxfp4(b):  # e:E8M0 | qs[16]; value = kvalues_mxfp4[q] * (2^(e-127) / 2)
    nb = b.shape[0]
    e = b[:, :1].int()
    # ggml_e8m0_to_fp32_half: bit pattern of 2^(e-128); for e < 2 that is an fp32 subnormal (0x00200000 << e).
    bits = torch.where(e < 2, torch.bitwise_left_shift(0x00200000, e.clamp(max=1)), (e.clamp(min=1) - 1) << 23)
    return torch.mul(_lut_bytes(b[:, 1:], _KV_MXFP4), bits.view(torch.float32).view(nb, 1, 1),
                     out=_empty(b, nb, 2, 16)).view(nb, 32)


def _iq4_nl(b):  # d:f16 | qs[16] codes into kvalues_iq4nl; value = d * kvalues[q]
    nb = b.shape[0]
    return torch.mul(_lut_bytes(b[:, 2:], _KV_IQ4NL), _f16(b[:, :2]).view(nb, 1, 1),
                     out=_empty(b, nb, 2, 16)).view(nb, 32)


def _k_scales(b):
    """Q4_K/Q5_K: d, dmin (bytes 0-3) and the 12 scale bytes (4-15) -> (nb, 2, 8, 1) float32: [0] = d * sc[j],
    [1] = dmin * m[j], each product rounded to float32 like ggml's `d1 = d * sc; m1 = min * m`.
    The 6-bit sc/m (ggml's get_scale_min_k4): bytes 4-7 hold sc[0..3] in bits 0-5 and bits 4-5 of sc[4..7] in bits
    6-7; bytes 8-11 the same for m; bytes 12-15 bits 0-3 of sc[4..7] (low nibble) and of m[4..7] (high nibble)."""
    nb = b.shape[0]
    s = b[:, 4:12]
    low = (s & 63).view(nb, 2, 4)  # sc[0..3], m[0..3]
    high = _fields(b[:, 12:16], 4, 2).bitwise_or_(((s >> 6) << 4).view(nb, 2, 4))  # sc[4..7], m[4..7]
    return torch.mul(_f16(b[:, 0:4]).view(nb, 2, 1), torch.cat((low, high), dim=2)).view(nb, 2, 8, 1)


def _q4_k(b):  # d:f16 | dmin:f16 | scales[12] | qs[128]: 4 runs of 32 bytes, each gives 2 sub-blocks of 32 (lo, hi)
    nb = b.shape[0]
    dm = _k_scales(b)
    q = _fields(b[:, 16:].view(nb, 4, 32), 4, 2).view(nb, 8, 32)
    return torch.mul(q, dm[:, 0]).sub_(dm[:, 1]).view(nb, QK_K)  # (d * sc) * q - (dmin * m)


def _q5_k(b):  # d | dmin | scales[12] | qh[32] | qs[128]: as Q4_K, plus bit k of qh[l] as bit 4 of sub-block k
    nb = b.shape[0]
    dm = _k_scales(b)
    q = _fields(b[:, 48:].view(nb, 4, 32), 4, 2).view(nb, 8, 32)
    q.bitwise_or_(_fields(b[:, 16:48], 1, 8) << 4)
    return torch.mul(q, dm[:, 0]).sub_(dm[:, 1]).view(nb, QK_K)


def _q6_k(b):  # ql[128] | qh[64] | scales: int8[16] | d:f16; value = (d * sc[p // 16]) * (q - 32)
    # Per half of 128 elements: ql[64] gives lo nibbles (elements 0-63) then hi nibbles (64-127), qh[32] gives the
    # 2 high bits of element 32k+l in bits 2k..2k+1 of qh[l].
    nb = b.shape[0]
    q = _fields(b[:, :128].view(nb, 2, 64), 4, 2).view(nb, 2, 4, 32)
    q.bitwise_or_(_fields(b[:, 128:192].view(nb, 2, 32), 2, 4) << 4)
    q = q.view(nb, 16, 16).sub_(32).view(torch.int8)
    ds = torch.mul(_f16(b[:, 208:210]), b[:, 192:208].view(torch.int8)).view(nb, 16, 1)
    return torch.mul(q, ds).view(nb, QK_K)


def _q2_k(b):  # scales[16] (lo nibble: scale, hi: min) | qs[64] | d:f16 | dmin:f16; value = (d*sc) * q - (dmin*m)
    # Per half of 128 elements: 32 bytes of qs, element 32j+l is bits 2j..2j+1 of qs[l]; 16 elements per scale.
    nb = b.shape[0]
    dm = torch.mul(_f16(b[:, 80:84]).view(nb, 2, 1), _fields(b[:, :16], 4, 2)).view(nb, 2, 16, 1)
    q = _fields(b[:, 16:80].view(nb, 2, 32), 2, 4).view(nb, 16, 16)
    return torch.mul(q, dm[:, 0]).sub_(dm[:, 1]).view(nb, QK_K)


def _q3_k(b):  # hmask[32] | qs[64] | scales[12] | d:f16; value = (d * (sc - 32)) * (q2 - (hbit ? 0 : 4))
    # qs as Q2_K; hmask bit k of byte l is the high bit of element 32k + l; 16 six-bit scales: low nibbles in
    # bytes 0-7 (lo nibbles give scales 0-7, hi nibbles 8-15), 2 high bits of scale 4j+i in bits 2j of byte 8+i.
    nb = b.shape[0]
    s = b[:, 96:108]
    lo = _fields(s[:, :8], 4, 2).view(nb, 16)
    hi = _fields(s[:, 8:], 2, 4).view(nb, 16)
    sc = lo.bitwise_or_(hi << 4).sub_(32).view(torch.int8)
    dl = torch.mul(_f16(b[:, 108:110]), sc).view(nb, 16, 1)
    q = _fields(b[:, 32:96].view(nb, 2, 32), 2, 4).view(nb, 256)
    q.sub_((_fields(b[:, :32], 1, 8).view(nb, 256) ^ 1) << 2)  # uint8 wrap-around == int8 q - 4
    return torch.mul(q.view(torch.int8).view(nb, 16, 16), dl).view(nb, QK_K)


def _iq4_xs(b):  # d:f16 | scales_h:u16 | scales_l[4] | qs[128]: 8 sub-blocks of 32 as IQ4_NL with 6-bit scales
    nb = b.shape[0]
    lo = _fields(b[:, 4:8], 4, 2).transpose(1, 2).reshape(nb, 8)  # sub-block i: nibble i%2 of byte i//2
    hi = _fields(b[:, 2:4], 2, 4).transpose(1, 2).reshape(nb, 8)  # sub-block i: bits 2i of the uint16
    ls = lo.bitwise_or_(hi << 4).sub_(32).view(torch.int8)
    dl = torch.mul(_f16(b[:, 0:2]), ls).view(nb, 8, 1, 1)  # ggml: dl = d * (ls - 32)
    y = torch.mul(_lut_bytes(b[:, 8:].view(nb, 8, 16), _KV_IQ4NL), dl, out=_empty(b, nb, 8, 2, 16))
    return y.view(nb, QK_K)


_BLOCK_FNS = {
    T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1, T.Q8_0: _q8_0, T.MXFP4: _mxfp4,
    T.Q2_K: _q2_k, T.Q3_K: _q3_k, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k,
    T.IQ4_NL: _iq4_nl, T.IQ4_XS: _iq4_xs,
}
_PLAIN = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}

SUPPORTED: frozenset = frozenset(_BLOCK_FNS) | frozenset(_PLAIN)


def bytes_per_row(ggml_type: GGMLQuantizationType, cols: int) -> int:
    """Bytes of one row of `cols` elements of `ggml_type` (rows are whole blocks)."""
    block, size = GGML_QUANT_SIZES[T(ggml_type)]
    if cols % block:
        raise ValueError(f"{T(ggml_type).name}: row of {cols} elements is not a whole number of {block}-blocks")
    return cols // block * size


def _plain_view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if raw.is_contiguous() and raw.storage_offset() % dtype.itemsize == 0:
        return raw.view(dtype)
    return raw.clone().view(dtype)  # unaligned slice (raw is 1-D contiguous here): views need offset % itemsize == 0


def dequantize(raw: torch.Tensor, ggml_type: GGMLQuantizationType, shape: tuple, dtype=torch.float32) -> torch.Tensor:
    """The exact GGUF bytes `raw` of a tensor of `ggml_type` and numpy-order `shape` (last axis = a row) -> a new
    tensor of `shape` and `dtype` on raw's device (see the module docstring). `raw` is uint8, normally 1-D; any
    offset is fine, and a non-contiguous `raw` (e.g. one expert of an interleaved 3-D buffer) is copied first."""
    ggml_type = T(ggml_type)
    shape = tuple(int(s) for s in shape)
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw must be uint8, got {raw.dtype}")
    if ggml_type not in SUPPORTED:
        raise ValueError(f"no torch dequantization for {ggml_type.name}")
    n_rows = math.prod(shape[:-1])
    expected = n_rows * bytes_per_row(ggml_type, shape[-1])
    if raw.numel() != expected:
        raise ValueError(f"{ggml_type.name} {shape}: expected {expected} bytes, got {raw.numel()}")
    if ggml_type in _PLAIN:
        x = _plain_view(raw.reshape(-1), _PLAIN[ggml_type])
        return x.to(dtype, copy=True).view(shape)  # F16/BF16 -> float32: exact widening
    block, size = GGML_QUANT_SIZES[ggml_type]
    y = _BLOCK_FNS[ggml_type](raw.reshape(-1, size))
    if dtype != torch.float32:
        y = y.to(dtype)  # computed in float32 (bit-identical to ggml), then one rounding to bf16/fp16
    return y.view(shape)


def bench(types=None, rows: int = 768, cols: int = 2048, iters: int = 10, repeats: int = 5, device=None) -> dict:
    """Print and return µs per dequantization of one rows x cols expert matrix (float32 out) per type on `device`
    (default: CUDA when available): the best of `repeats` means over `iters` calls, so that a shared, busy host
    does not inflate it. Bytes are random (valid blocks for every type; the timing does not depend on values)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for ty in types or sorted(SUPPORTED, key=lambda t: t.value):
        ty = T(ty)
        n = rows * bytes_per_row(ty, cols)
        raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).to(device)
        dequantize(raw, ty, (rows, cols))
        best = math.inf
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            for _ in range(iters):
                dequantize(raw, ty, (rows, cols))
            sync()
            best = min(best, (time.perf_counter() - t0) / iters)
        results[ty.name] = us = best * 1e6
        print(f"{ty.name:8s} {rows}x{cols} on {device}: {us:9.1f} µs  ({n / us / 1e3:6.2f} GB/s in, "
              f"{rows * cols * 4 / us / 1e3:6.2f} GB/s out)")
    return results
