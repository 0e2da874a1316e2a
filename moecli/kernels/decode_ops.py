"""Launchers of the dense decode kernels (moecli.kernels.decode_triton), each a torch.library custom op (one op per
launch, as a profiler or a CUDA graph sees it), and beside each its torch reference (what the tests compare with).

Every launcher writes into buffers the caller owns (static across steps: what a CUDA graph replays over) and reads
the position from a device tensor, never from the host.
"""
from __future__ import annotations

import functools

import torch

from moecli.kernels.device_ops import _np2
from moecli.models.layers import attend, rms_norm

GATING = {"softmax": 0, "sigmoid": 1, "softmax_weight": 2}  # route_kernel's MODE


@functools.lru_cache(maxsize=None)
def _k():
    from moecli.kernels import decode_triton

    return decode_triton


# --------------------------------------------------------------------------------------------- RMSNorm (+ residual)

@torch.library.custom_op("moecli::rms_norm", mutates_args=("out_x", "out_h"))
def _rms_norm_op(x: torch.Tensor, res: torch.Tensor, w: torch.Tensor, out_x: torch.Tensor, out_h: torch.Tensor,
                 eps: float, has_res: bool) -> None:
    n = x.shape[-1]
    _k().rms_norm_kernel[(x.numel() // n,)](x, res, w, out_x, out_h, n, eps, HAS_RES=has_res, BN=_np2(n))


def add_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_h: torch.Tensor, res: torch.Tensor | None = None,
                 out_x: torch.Tensor | None = None) -> None:
    """out_h = rms_norm(x (+ res), w); with `res`, out_x = x + res too. Rows contiguous, float32."""
    _rms_norm_op(x, res if res is not None else x, w, out_x if out_x is not None else out_h, out_h, eps,
                 res is not None)


def add_rms_norm_ref(x, w, eps, res=None):
    """(x + res, rms_norm(x + res, w)) in torch."""
    if res is not None:
        x = x + res
    return x, rms_norm(x, w, eps)


# ------------------------------------------------------------------------------- q/k norm + RoPE + KV cache store

@torch.library.custom_op("moecli::qk_rope_store", mutates_args=("q_out", "kc", "vc"))
def _qk_rope_store_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, q_out: torch.Tensor, kc: torch.Tensor,
                      vc: torch.Tensor, cache_off: int, n_head: int, n_head_kv: int, eps: float, head_dim: int,
                      rot: int, neox: bool, norm: bool, rope: bool) -> None:
    _k().qk_rope_store_kernel[(n_head + n_head_kv,)](
        q, k, v, qn, kn, cos, sin, pos, q_out, kc, vc, cache_off, n_head, n_head_kv, eps, D=head_dim, R=rot,
        NEOX=neox, NORM=norm, ROPE=rope, BD=_np2(head_dim))


def qk_rope_store(q, k, v, pos, rope, cache, l: int, q_out, qn=None, kn=None, eps: float = 0.0,
                  apply_rope: bool = True) -> None:
    """One token: q [H*D], k, v [Hkv*D] -> q_out (head-normed with `qn`, roped) and the cache's layer `l` at the
    position in device tensor `pos` (k head-normed with `kn`, roped; v as is), in the cache's dtype."""
    H, Hkv, D = q.numel() // cache.k.shape[-1], cache.k.shape[2], cache.k.shape[-1]
    _qk_rope_store_op(q, k, v, qn if qn is not None else q, kn if kn is not None else k, rope.cos, rope.sin, pos,
                      q_out, cache.k, cache.v, l * cache.k.stride(0), H, Hkv, eps, D, rope.dim, rope.neox,
                      qn is not None, apply_rope)


def qk_rope_store_ref(q, k, v, pos, rope, cache, l: int, qn=None, kn=None, eps: float = 0.0, apply_rope=True):
    """The torch engine's steps (transformer.Transformer.attention): returns q [1, H, D]; k, v into the cache."""
    Hkv, D = cache.k.shape[2], cache.k.shape[-1]
    q, k = q.view(1, -1, D), k.view(1, Hkv, D)
    if qn is not None:
        q, k = rms_norm(q, qn, eps), rms_norm(k, kn, eps)
    if apply_rope:
        q, k = rope(q, pos), rope(k, pos)
    p = int(pos[0])
    cache.k[l, p] = k[0]
    cache.v[l, p] = v.view(Hkv, D)
    return q


# ------------------------------------------------------------------------------------------- decode attention

@torch.library.custom_op("moecli::decode_attn", mutates_args=("out",))
def _decode_attn_op(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, cache_off: int, pos: torch.Tensor,
                    out: torch.Tensor, scale: float, n_head: int, n_head_kv: int, head_dim: int, sinks: torch.Tensor,
                    window: int, has_sinks: bool) -> None:
    _k().decode_attn_kernel[(n_head,)](q, kc, vc, cache_off, pos, out, scale, n_head_kv, n_head // n_head_kv, sinks,
                                       window, HAS_SINKS=has_sinks, D=head_dim, BD=_np2(head_dim), BN=32)


def decode_attn(q, cache, l: int, pos, out, scale: float | None = None, window: int = 0, sinks=None) -> None:
    """out [H*D] = causal GQA attention of one query q [H*D] at device position `pos` over layer l's cache (its
    last `window` positions if > 0; a sink logit per head if `sinks`); scale 1/sqrt(D) unless given."""
    Hkv, D = cache.k.shape[2], cache.k.shape[-1]
    _decode_attn_op(q, cache.k, cache.v, l * cache.k.stride(0), pos, out, D ** -0.5 if scale is None else scale,
                    q.numel() // D, Hkv, D, sinks if sinks is not None else q, window, sinks is not None)


def decode_attn_ref(q, cache, l: int, pos, scale=None, window: int = 0, sinks=None):
    """The torch engine's attention for one query: models.layers.attend, or gpt-oss's attend_sinks."""
    D = cache.k.shape[-1]
    p = int(pos[0])
    if sinks is None and not window:
        return attend(q.view(1, -1, D), cache.k[l, :p + 1], cache.v[l, :p + 1], p)
    from moecli.models.gpt_oss import attend_sinks

    k0 = max(0, p - window + 1) if window else 0
    if sinks is None:
        sinks = torch.full((q.numel() // D,), float("-inf"))
    return attend_sinks(q.view(1, -1, D), cache.k[l, k0:p + 1], cache.v[l, k0:p + 1], p, k0, sinks,
                        D ** -0.5 if scale is None else scale, window)


# -------------------------------------------------------------------------------------------------- routing

@torch.library.custom_op("moecli::route", mutates_args=("ids", "ids_f", "weights", "probs"))
def _route_op(logits: torch.Tensor, bias: torch.Tensor, ids: torch.Tensor, ids_f: torch.Tensor,
              weights: torch.Tensor, probs: torch.Tensor, k: int, mode: int, has_bias: bool, has_ids_f: bool,
              norm_topk: bool, scale: float) -> None:
    E = logits.shape[-1]
    _k().route_kernel[(logits.numel() // E,)](
        logits, bias, ids, ids_f, weights, probs, E, scale, MODE=mode, HAS_BIAS=has_bias, HAS_IDS_F=has_ids_f,
        NORM_TOPK=norm_topk, SCALE=scale not in (0.0, 1.0), K=k, BK=_np2(k), BE=_np2(E))


def routable(c) -> bool:
    """Whether route_kernel implements `c`'s routing (grouped selection, DeepSeek's n_group, and llama4's pick by
    the logits do not)."""
    return c.gating in GATING and c.n_group <= 1 and not c.select_logits


def route(c, logits, bias, ids, weights, probs, ids_f=None) -> None:
    """models.layers.route for config `c` into ids [n, k] (int32), weights [n, k], probs [n, E] (and the ids as
    float32 into `ids_f`: the packed buffer the host reads)."""
    _route_op(logits, bias if bias is not None else logits, ids, ids_f if ids_f is not None else weights, weights,
              probs, c.n_expert_used, GATING[c.gating], bias is not None, ids_f is not None, c.norm_topk,
              float(c.routed_scale))


# ------------------------------------------------------------------------------------------------------- FFNs

@torch.library.custom_op("moecli::glu", mutates_args=("out",))
def _glu_op(g: torch.Tensor, u: torch.Tensor, out: torch.Tensor) -> None:
    n = g.numel()
    _k().glu_kernel[(-(-n // 1024),)](g, u, out, n, BN=1024)


def glu(g, u, out) -> None:
    """out = silu(g) * u (out may be g)."""
    _glu_op(g, u, out)


def glu_ref(g, u):
    return torch.nn.functional.silu(g) * u


@torch.library.custom_op("moecli::shared_add", mutates_args=("out",))
def _shared_add_op(routed: torch.Tensor, s: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, out: torch.Tensor,
                   has_gate: bool) -> None:
    n = s.numel()
    _k().shared_add_kernel[(1,)](routed, s, h, gate, out, n, HAS_GATE=has_gate, BN=_np2(n))


def shared_add(routed, s, h, gate, out) -> None:
    """One token: out = routed + s, the shared expert's s gated by sigmoid(h . gate) when `gate` is given."""
    _shared_add_op(routed, s, h, gate if gate is not None else s, out, gate is not None)


def shared_add_ref(routed, s, h, gate):
    """transformer.Transformer.moe's combination."""
    if gate is not None:
        s = s * torch.sigmoid(h @ gate)[:, None]
    return routed + s
