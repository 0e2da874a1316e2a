"""RoPE in every variant the architectures use, for both engines: NEOX (rotate halves) or NORM (adjacent pairs)
layout, partial rotary (the first `dim` of each head's dims), YaRN context extension (angles, magnitude scale and
the softmax scale exactly as llama.cpp derives them), and ggml_rope_ext's arguments for the ggml graph.

The torch tables reproduce ggml's float32 angle recurrence (theta_scale = base^(-2/dim), each pair's angle the
previous one times theta_scale): the exact angles differ by up to ~1e-4 rad at long positions, enough to flip Q8
activation roundings downstream and move logits visibly against llama.cpp.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from moecli.kernels import ggml as G
from moecli.models.config import ModelConfig

_f = np.float32


def yarn_params(c: ModelConfig) -> dict:
    """freq_scale, ext_factor, rope attn_factor, corr_dims and the softmax scale exactly as llama.cpp derives them
    (llama_context's YaRN setup, then deepseek2's graph pre-scaling kq_scale), in float32."""
    dk = c.qk_nope_dim + c.qk_rope_dim
    if c.rope_scaling != "yarn":
        return dict(freq_scale=_f(1), ext_factor=_f(0), attn_factor=_f(1), corr=(0.0, 0.0),
                    kq_scale=float(_f(1) / np.sqrt(_f(dk))))
    fs = _f(1) / _f(c.rope_factor)
    ext = _f(1) if c.yarn_ext_factor < 0 else _f(c.yarn_ext_factor)
    attn = _f(c.yarn_attn_factor)
    if ext != 0:
        factor = _f(1) / fs

        def get_mscale(scale, m):
            return _f(1) if scale <= 1 else _f(_f(_f(0.1) * _f(m)) * np.log(_f(scale))) + _f(1)
        if c.yarn_log_mul != 0:
            m_all = _f(c.yarn_log_mul)
            m = m_all if m_all != 1 else _f(1)  # llama.cpp special-cases deepseek2: mscale = mscale_all_dim
            attn = _f(get_mscale(factor, m) / get_mscale(factor, m_all))
        else:
            attn = get_mscale(factor, 1.0)
        attn = _f(attn * _f(_f(1) / _f(_f(1) + _f(_f(0.1) * np.log(factor)))))
    # deepseek2 graph: cancel the adjustment, then mscale^2 / sqrt(dk)
    lg = np.log(_f(_f(1) / fs))
    org = _f(attn * _f(_f(1) + _f(_f(0.1) * lg)))
    mscale = _f(org * _f(_f(1) + _f(_f(_f(0.1) * _f(c.yarn_log_mul)) * lg)))
    kq_scale = _f(_f(mscale * mscale) / np.sqrt(_f(dk)))
    # ggml_rope_yarn_corr_dims
    n_dims, base = c.qk_rope_dim, _f(c.rope_theta)

    def corr_dim(n_rot):
        return _f(_f(n_dims) * np.log(_f(_f(c.yarn_orig_ctx) / _f(_f(n_rot) * _f(2) * _f(np.pi))))) / \
            _f(_f(2) * np.log(base))
    if c.yarn_truncate:
        lo = max(0.0, float(np.floor(corr_dim(c.yarn_beta_fast))))
        hi = min(float(n_dims - 1), float(np.ceil(corr_dim(c.yarn_beta_slow))))
    else:  # transformers' truncate=False (HF checkpoints only): the unrounded range, in double as transformers
        def corr_dim64(n_rot):
            return n_dims * math.log(c.yarn_orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(c.rope_theta))
        lo, hi = max(0.0, corr_dim64(c.yarn_beta_fast)), min(float(n_dims - 1), corr_dim64(c.yarn_beta_slow))
    return dict(freq_scale=fs, ext_factor=ext, attn_factor=attn, corr=(lo, hi), kq_scale=float(kq_scale))


class Rope:
    """ggml_rope_ext's angles (cache init + rope_yarn) in float32 over the first `dim` dims of each head (the rest
    pass through: partial rotary); NORM (adjacent pairs) or NEOX layout; YaRN with its yarn_params."""

    def __init__(self, dim: int, theta: float, neox: bool, max_pos: int, device, freq_scale=1.0, ext_factor=0.0,
                 attn_factor=1.0, corr=(0.0, 0.0), factors=()):
        scale = _f(_f(theta) ** _f(-2.0 / dim))
        ext = np.empty((max_pos, dim // 2), dtype=np.float32)  # theta_extrap: p * theta_scale^i, multiplied up
        ext[:, 0] = np.arange(max_pos, dtype=np.float32)
        for i in range(1, dim // 2):
            ext[:, i] = ext[:, i - 1] * scale
        if len(factors):  # rope_freqs.weight (Llama 3/4's long-context factors): ggml's theta / freq_factor
            ext = (ext / np.asarray(factors, dtype=np.float32)).astype(np.float32)
        ang = (_f(freq_scale) * ext).astype(np.float32)  # theta_interp
        mscale = _f(attn_factor)
        if ext_factor != 0:
            lo, hi = corr
            i = np.arange(dim // 2, dtype=np.float32)
            y = (i - _f(lo)) / _f(max(0.001, hi - lo))
            ramp_mix = ((_f(1) - np.minimum(_f(1), np.maximum(_f(0), y))) * _f(ext_factor)).astype(np.float32)
            ang = (ang * (_f(1) - ramp_mix) + ext * ramp_mix).astype(np.float32)
            mscale = _f(mscale * _f(_f(1) + _f(_f(0.1) * np.log(_f(_f(1) / _f(freq_scale))))))
        self.cos = torch.from_numpy(np.cos(ang.astype(np.float64)).astype(np.float32) * mscale).to(device)
        self.sin = torch.from_numpy(np.sin(ang.astype(np.float64)).astype(np.float32) * mscale).to(device)
        self.dim, self.neox = dim, neox

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x: [n, heads, dim]; pos: [n]."""
        cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        out = torch.empty_like(x)
        if self.neox:
            h = self.dim // 2
            a, b = x[..., :h], x[..., h:self.dim]
            out[..., :h], out[..., h:self.dim] = a * cos - b * sin, a * sin + b * cos
        else:
            a, b = x[..., 0:self.dim:2], x[..., 1:self.dim:2]
            out[..., 0:self.dim:2], out[..., 1:self.dim:2] = a * cos - b * sin, a * sin + b * cos
        if self.dim < x.shape[-1]:
            out[..., self.dim:] = x[..., self.dim:]
        return out


def rope_config(c: ModelConfig) -> ModelConfig:
    """`c` as yarn_params reads it: deepseek2's rotary part is qk_rope_dim of its nope + rope heads; every other
    family rotates rope_dim of head_dim (its softmax scale stays 1/sqrt(head_dim))."""
    return c if c.arch == "deepseek2" else dataclasses.replace(c, qk_nope_dim=0, qk_rope_dim=c.rope_dim)


def torch_rope(c: ModelConfig, max_pos: int, device):
    """The torch engine's rotary embedding for `c`: (rope, softmax scale)."""
    y = yarn_params(rope_config(c))
    kq = y.pop("kq_scale")
    if c.arch != "deepseek2":  # DeepSeek folds YaRN's mscale into its softmax scale; the others keep 1/sqrt(d)
        kq = float(_f(1.0) / np.sqrt(_f(c.head_dim)))
    return Rope(c.rope_dim, c.rope_theta, c.rope_neox, max_pos, device, factors=c.rope_factors, **y), kq


@dataclasses.dataclass(frozen=True)
class GgmlRope:
    """ggml_rope_ext's mode, rotated dims and (n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor,
    beta_fast, beta_slow), with the softmax scale that goes with them."""
    mode: int
    n_dims: int
    args: tuple
    kq_scale: float
    sections: tuple = ()  # IMRoPE (qwen35moe): ggml_rope_multi over 4 positions per token (GraphBuilder.pos4)

    def __call__(self, p, x, pos_t, n_dims: int | None = None, factors=None):
        if self.sections:
            return G.ggml_rope_multi(p, x, pos_t, factors, n_dims or self.n_dims, (G.C.c_int * 4)(*self.sections),
                                     self.mode, *self.args)
        return G.ggml_rope_ext(p, x, pos_t, factors, n_dims or self.n_dims, self.mode, *self.args)


def ggml_rope(c: ModelConfig) -> GgmlRope:
    mode = G.GGML_ROPE_TYPE_NEOX if c.rope_neox else G.GGML_ROPE_TYPE_NORMAL
    kq = float(_f(1.0) / np.sqrt(_f(c.head_dim)))
    args = (c.n_ctx_train, c.rope_theta, 1.0, 0.0, 1.0, 32.0, 1.0)
    if c.rope_scaling == "yarn" or c.arch == "deepseek2":
        y = yarn_params(rope_config(c))
        if c.arch == "deepseek2":  # its own kq scale (mscale^2 / sqrt(dk)); gpt-oss keeps 1/sqrt(d)
            kq = float(y["kq_scale"])
        args = (c.yarn_orig_ctx or c.n_ctx_train, c.rope_theta, float(y["freq_scale"]), float(y["ext_factor"]),
                float(y["attn_factor"]), c.yarn_beta_fast, c.yarn_beta_slow)
    if c.rope_sections:
        return GgmlRope(G.GGML_ROPE_TYPE_IMROPE, c.rope_dim, args, kq, tuple(c.rope_sections))
    return GgmlRope(mode, c.rope_dim, args, kq)


def llama3_factors(rope: dict, head_dim: int, theta: float) -> tuple:
    """Hugging Face's "llama3" rope_type as per-pair divisors of the angle (what GGUF carries as rope_freqs.weight):
    1 for wavelengths under original_max_position_embeddings / high_freq_factor, `factor` above
    original / low_freq_factor, a smooth blend between (transformers' _compute_llama3_parameters)."""
    factor, low, high = (float(rope.get(k, d)) for k, d in (("factor", 8.0), ("low_freq_factor", 1.0),
                                                             ("high_freq_factor", 4.0)))
    old = float(rope.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low or high <= low:  # high == low (Llama 4 Scout): no blended band
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return tuple(float(_f(x)) for x in out)


def attn_temperature(c: ModelConfig, pos) -> np.ndarray:
    """llama4's temperature tuning of its NoPE layers' queries, per position, as llama.cpp's
    llm_graph_input_attn_temp computes it (float position and offset, double log, float result)."""
    p = np.asarray(pos, dtype=np.float32)
    q = np.floor((p + _f(1.0)) / _f(c.attn_temp_floor)).astype(np.float64)
    return (np.log(q + 1.0) * float(_f(c.attn_temp_scale)) + 1.0).astype(np.float32)
