"""The device's matmuls on GGUF weights: launchers for the Triton kernels (moecli.kernels.gguf_triton), and the torch
dequantization fallback when Triton cannot run.

Triton runs on CUDA devices, and on the CPU device when TRITON_INTERPRET=1 (its interpreter: how the tests run the
kernels here). Anywhere else the callers fall back to moecli.kernels.torch_dequant, and this module says so once.
"""
from __future__ import annotations

import functools
import logging
import os

import torch
from gguf import GGMLQuantizationType

from moecli.kernels.torch_dequant import _KV_IQ4NL, _KV_MXFP4  # ggml's 4-bit codebooks
from moecli.kernels.torch_dequant import bytes_per_row as row_bytes

log = logging.getLogger("moecli")
T = GGMLQuantizationType

# The types the kernels read in place; any other weight is dequantized once to bf16 (`warn_fallback_type`).
TRITON_TYPES = frozenset({T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.MXFP4, T.IQ4_NL,
                          T.IQ4_XS, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})
DECODE_ROWS = 4  # up to this many rows per weight (or per expert): the decode form; more: tl.dot tiles


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The kernel module, or None when Triton is not installed."""
    try:
        from moecli.kernels import gguf_triton
    except ImportError:
        return None
    return gguf_triton


@functools.lru_cache(maxsize=None)
def use_triton(device_type: str) -> bool:
    """Whether the kernels run on devices of this type (`torch.device.type`); the first 'no' is logged."""
    ok = _kernels() is not None and (device_type == "cuda" or (device_type == "cpu" and _interpreting()))
    if not ok:
        why = "Triton is not installed" if _kernels() is None else "Triton runs on CUDA (or under TRITON_INTERPRET=1)"
        level = logging.WARNING if device_type == "cuda" else logging.INFO
        log.log(level, "%s: device weights on %s are dequantized by torch (moecli.kernels.torch_dequant)", why,
                device_type)
    return ok


def dense_kernels(device_type: str) -> bool:
    """Whether dense weights (TorchLinear) go through the kernels: on CUDA, and on the CPU device (the interpreter,
    slow per launch: a dozen launches per layer) only when MOECLI_CPU_DENSE_KERNELS=1; the device experts always
    take the kernels where `use_triton`."""
    if device_type == "cpu" and os.environ.get("MOECLI_CPU_DENSE_KERNELS", "") in ("", "0"):
        return False
    return use_triton(device_type)


@functools.lru_cache(maxsize=None)
def warn_fallback_type(ggml_type: GGMLQuantizationType) -> None:
    log.warning("no device kernel reads %s weights: they are dequantized once to bf16 on the device", T(ggml_type).name)


@functools.lru_cache(maxsize=None)
def _lut(device: torch.device) -> torch.Tensor:
    return torch.tensor(_KV_IQ4NL + _KV_MXFP4, dtype=torch.float32, device=device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _np2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


# Under the interpreter tl.dot is one numpy matmul (exact in float32) while the decode form's broadcast product is a
# large temporary array: the interpreter takes the dot form for every row count, unless this is set (the kernel
# tests set it to choose the forms as on a GPU, so that both are tested).
FORMS_AS_ON_GPU = False


def _tiles(rows: int, n: int, k: int) -> tuple[int, int, int, bool]:
    """(BM, BN, BK, DOT) for `rows` activation rows against an n x k weight. On a GPU the decode form's broadcast
    product must stay small in registers (BM <= 4); from 5 rows on, tl.dot on 16+-row tiles (tensor cores; padded
    rows are masked). The interpreter costs per program and per op, not per element: there the tiles are as large
    as the shape allows."""
    dot = rows > DECODE_ROWS
    if _interpreting():
        dot = dot or not FORMS_AS_ON_GPU
        bm = max(min(_np2(rows), 64), 16) if dot else _np2(rows)
        return bm, max(min(_np2(n), 256), 16), max(min(_np2(k), 256), 16), dot
    if not dot:
        return _np2(rows), 32, 64, False
    return (16 if rows <= 16 else 64), 64, 32, True  # BK 32: no register spills (ptxas, sm_90, 4 warps)


class QuantWeight:
    """A 2-D GGUF weight as its file bytes on the device (uint8), [n, k] in numpy order."""

    def __init__(self, raw: torch.Tensor, ggml_type, shape: tuple[int, int]):
        self.raw, self.type, self.shape = raw, T(ggml_type), (int(shape[0]), int(shape[1]))
        self.row_bytes = row_bytes(self.type, self.shape[1])
        if raw.dtype != torch.uint8 or raw.numel() != self.shape[0] * self.row_bytes:
            raise ValueError(f"{self.type.name} {self.shape}: expected {self.shape[0] * self.row_bytes} uint8 bytes")

    @property
    def nbytes(self) -> int:
        return self.raw.numel()


# Each Triton launch is one torch.library custom op: the dispatcher sees one op per kernel (as a profiler sees one
# launch), the interpreter's own tensor traffic stays below it, and CUDA graph capture records it like any op.
@torch.library.custom_op("moecli::linear_q", mutates_args=("y",))
def _linear_op(x: torch.Tensor, w: torch.Tensor, lut: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, m: int,
               n: int, k: int, row_bytes: int, sxm: int, sym: int, ttype: int, has_bias: bool, bm: int, bn: int,
               bk: int, dot: bool) -> None:
    _kernels().linear_kernel[(_cdiv(n, bn), _cdiv(m, bm))](x, w, lut, bias, y, m, n, k, row_bytes, sxm, sym,
                                                          TYPE=ttype, HAS_BIAS=has_bias, BM=bm, BN=bn, BK=bk, DOT=dot)


@torch.library.custom_op("moecli::gate_up", mutates_args=("h",))
def _gate_up_op(x: torch.Tensor, sxm: int, pair_tok: torch.Tensor, blk_expert: torch.Tensor, blk_pairs: torch.Tensor,
                slot_table: torch.Tensor, n_expert: int, storage: torch.Tensor, slot_bytes: int, og: int, ou: int,
                lut: torch.Tensor, bg: torch.Tensor, bu: torch.Tensor, h: torch.Tensor, ff: int, d: int, rbg: int,
                rbu: int, tg: int, tu: int, has_bias: bool, oai: bool, relu: bool, bm: int, bn: int, bk: int,
                dot: bool) -> None:
    _kernels().gate_up_kernel[(_cdiv(ff, bn), blk_expert.numel())](
        x, sxm, pair_tok, blk_expert, blk_pairs, slot_table, n_expert, storage, slot_bytes, og, ou, lut, bg, bu, h,
        ff, d, rbg, rbu, TYPE_G=tg, TYPE_U=tu, HAS_BIAS=has_bias, OAI=oai, RELU=relu, BM=bm, BN=bn, BK=bk, DOT=dot)


@torch.library.custom_op("moecli::down", mutates_args=("y",))
def _down_op(h: torch.Tensor, pair_w: torch.Tensor, blk_expert: torch.Tensor, blk_pairs: torch.Tensor,
             slot_table: torch.Tensor, n_expert: int, storage: torch.Tensor, slot_bytes: int, od: int,
             lut: torch.Tensor, bd: torch.Tensor, y: torch.Tensor, d: int, ff: int, rbd: int, td: int, has_bias: bool,
             bm: int, bn: int, bk: int, dot: bool) -> None:
    _kernels().down_kernel[(_cdiv(d, bn), blk_expert.numel())](
        h, pair_w, blk_expert, blk_pairs, slot_table, n_expert, storage, slot_bytes, od, lut, bd, y, d, ff, rbd,
        TYPE=td, HAS_BIAS=has_bias, BM=bm, BN=bn, BK=bk, DOT=dot)


def linear(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None, out: torch.Tensor | None = None):
    """x[m, k] (any float dtype, rows contiguous) @ W^T (+ bias) -> float32 [m, n], W read in its quantized form."""
    K = w.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    n = w.shape[0]
    y = out if out is not None else torch.empty((m, n), dtype=torch.float32, device=x.device)
    bm, bn, bk, dot = _tiles(m, n, K)
    _linear_op(x, w.raw, _lut(x.device), bias if bias is not None else y, y, m, n, K, w.row_bytes, x.stride(0),
               y.stride(0), int(w.type), bias is not None, bm, bn, bk, dot)
    return y


def pair_blocks(pair_exp: torch.Tensor, n_expert: int, bm: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the pairs by expert into blocks of `bm` (llama.cpp's mul_mat_id / vLLM's moe_align_block_size), with
    device ops only (no host sync): the grid is the static bound cdiv(P, bm) + min(E, P) blocks, and the unused ones
    carry expert id E (they exit at once). Returns blk_expert [NB] int32 and blk_pairs [NB, bm] int32 (pair
    indices, -1 = padding)."""
    P = pair_exp.numel()
    dev = pair_exp.device
    e = pair_exp.reshape(-1).long()
    order = torch.argsort(e, stable=True)
    counts = torch.bincount(e, minlength=n_expert)
    nblk = (counts + bm - 1) // bm
    blk_end = torch.cumsum(nblk, 0)
    first = torch.cumsum(counts, 0) - counts  # expert's first position in `order`
    NB = _cdiv(P, bm) + min(n_expert, P)
    b = torch.arange(NB, device=dev)
    be = torch.searchsorted(blk_end, b, right=True)
    ec = be.clamp(max=n_expert - 1)
    r = (b - (blk_end[ec] - nblk[ec]))[:, None] * bm + torch.arange(bm, device=dev)
    ok = (be < n_expert)[:, None] & (r < counts[ec][:, None])
    pairs = torch.where(ok, order[(first[ec][:, None] + r).clamp(max=max(P - 1, 0))], -1)
    return be.to(torch.int32), pairs.to(torch.int32)


class ExpertLayout:
    """Where gate, up and down sit in a slot of the byte storage: (ggml type, [rows, cols], byte offset) each."""

    def __init__(self, parts: list[tuple], slot_bytes: int):
        (self.gate, self.up, self.down), self.slot_bytes = parts, slot_bytes
        self.ff, self.d = self.gate[1]


class GroupedWorkspace:
    """grouped_experts' buffers for calls of up to `max_rows` tokens (decode), allocated once: the pair -> token
    map, the one-pair blocks, the gate/up activations, the per-pair outputs and the result. A CUDA graph captures
    the call over these addresses; a larger call (a prompt) allocates its own."""

    def __init__(self, device, k: int, ff: int, d: int, max_rows: int = 1):
        self.device, self.k, self.max_rows = torch.device(device), k, max_rows
        P = max_rows * k
        self.h = torch.empty((P, ff), dtype=torch.float32, device=self.device)
        self.y = torch.zeros((P, d), dtype=torch.float32, device=self.device)
        self.zero = torch.zeros((max_rows, d), dtype=torch.float32, device=self.device)  # never written
        self.out = torch.zeros((max_rows, d), dtype=torch.float32, device=self.device)
        self._views: dict[tuple[int, int], tuple] = {}

    def views(self, n: int, bm: int) -> tuple:
        """(pair_tok, blk_pairs, h, y, zero, out) for n rows, blocks of bm: slices made once per shape."""
        v = self._views.get((n, bm))
        if v is None:
            P = n * self.k
            pair_tok = torch.arange(n, dtype=torch.int32).repeat_interleave(self.k).to(self.device)
            blk = torch.full((P, bm), -1, dtype=torch.int32)
            blk[:, 0] = torch.arange(P, dtype=torch.int32)  # block p: pair p alone
            v = self._views[(n, bm)] = (pair_tok, blk.to(self.device), self.h[:P], self.y[:P], self.zero[:n],
                                        self.out[:n])
        return v


def grouped_experts(x: torch.Tensor, pair_tok: torch.Tensor, pair_exp: torch.Tensor, pair_w: torch.Tensor,
                    slot_table: torch.Tensor, storage: torch.Tensor, layout: ExpertLayout, biases=None,
                    act: str = "swiglu", ws: GroupedWorkspace | None = None) -> torch.Tensor:
    """sum over pairs p of pair_w[p] * expert_{pair_exp[p]}(x[pair_tok[p]]) -> float32 [len(x), d], for the experts
    whose slot_table entry is >= 0 (their weights are storage[slot], laid out as `layout`); other pairs add
    nothing (the down kernel writes their rows as zeros). Two launches (gate+up+GLU, down+weights) and one index_add; `biases` = ([E, ff], [E, ff], [E, d]).

    With `ws` and one token (decode), every pair is its own block (a token's experts are distinct, so grouping
    would share no weight reads): no sorting, and every buffer, `pair_tok` included, is the workspace's; the
    result is then ws's output buffer, valid until the next call."""
    n_expert = slot_table.numel()
    P = pair_exp.numel()
    dev = x.device
    if x.stride(-1) != 1:
        x = x.contiguous()
    ff, d = layout.ff, layout.d
    n = x.shape[0]
    bm, bn, bk, dot = _tiles(min(n, P), ff, d)
    if ws is not None and n == 1 and P == ws.k:
        pair_tok, blk_pairs, h, y, zero, out = ws.views(1, bm)
        blk_expert = pair_exp if pair_exp.is_contiguous() else pair_exp.reshape(-1)  # the kernels index it flat
    else:
        out = torch.zeros((n, d), dtype=torch.float32, device=dev)
        if P == 0:
            return out
        blk_expert, blk_pairs = pair_blocks(pair_exp, n_expert, bm)
        pair_tok = pair_tok.reshape(-1).to(torch.int32)
        h = torch.empty((P, ff), dtype=torch.float32, device=dev)
        y = torch.zeros((P, d), dtype=torch.float32, device=dev)
        zero = None
    lut = _lut(dev)
    (tg, _, og), (tu, _, ou), (td, _, od) = layout.gate, layout.up, layout.down
    bg, bu, bd = biases if biases is not None else (y, y, y)
    _gate_up_op(x, x.stride(0), pair_tok, blk_expert, blk_pairs, slot_table, n_expert, storage, layout.slot_bytes,
                og, ou, lut, bg, bu, h, ff, d, row_bytes(tg, d), row_bytes(tu, d), int(tg), int(tu),
                biases is not None, act == "swiglu_oai", act == "reglu", bm, bn, bk, dot)
    _, bn2, bk2, _ = _tiles(min(n, P), d, ff)
    if pair_w.dtype != torch.float32 or not pair_w.is_contiguous():
        pair_w = pair_w.reshape(-1).float()
    _down_op(h, pair_w, blk_expert, blk_pairs, slot_table, n_expert, storage, layout.slot_bytes, od, lut, bd, y, d,
             ff, row_bytes(td, ff), int(td), biases is not None, bm, bn2, bk2, dot)
    if zero is not None:
        return torch.index_add(zero, 0, pair_tok, y, out=out)
    return out.index_add_(0, pair_tok.long(), y)
