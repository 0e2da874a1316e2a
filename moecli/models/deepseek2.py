"""deepseek2: DeepSeek-V2 / V2-Lite / V3 / R1 (GGUF), as llama.cpp computes them.

Multi-head latent attention (MLA): q (optionally through a LoRA pair q_a -> norm -> q_b), a shared compressed kv
(`attn_kv_a_mqa` -> [kv_lora_rank | k_pe]) whose rope part k_pe is one head shared by all query heads.
  * legacy GGUFs (`attn_kv_b`): k_nope and v are decompressed per head and the cache holds them (MHA), as llama.cpp;
  * newer GGUFs (`attn_k_b` / `attn_v_b`, `attention.key_length_mla`): the absorbed form, as llama.cpp: q_nope is
    projected into the latent space, attention runs over the cached [latent | k_pe] rows (one KV head), and the
    per-head v_b maps the result back. The cache then holds kv_lora_rank + qk_rope floats per token and layer.
Leading dense layers, shared experts beside the routed ones (through the one experts seam), routing by softmax (V2)
or sigmoid + selection-only bias with grouped top-k (V3), weights optionally normalised, then times
`expert_weights_scale`; YaRN RoPE (NORM layout) with DeepSeek's mscale folded into the softmax scale.
Hugging Face safetensors (`deepseek_v2` / `deepseek_v3`, as transformers computes them) load into the legacy form
(their kv_b_proj is attn_kv_b): see `from_hf`.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from moecli.errors import MoecliError, UnsupportedError
from moecli.models.common import DENSE_NAMES, EXPERT_NAMES, gguf_metadata
from moecli.models.config import Checkpoint, ModelConfig
from moecli.models.layers import Embedding, TorchLinear, rms_norm, to_torch
from moecli.models.rope import torch_rope
from moecli.kernels import ggml as G
from moecli.models import spec as S
from moecli.models import transformer
from moecli.models.transformer import Transformer

_f = np.float32


# ------------------------------------------------------------------------------------------------------ config

def from_gguf(g) -> ModelConfig:
    t = g.tensors
    embd = t.get("token_embd.weight")
    if embd is None:
        raise MoecliError(f"{g.path.name}: model file lacks tensor token_embd.weight")
    n_embd, n_head, n_layer = int(g.require("embedding_length")), int(g.require("attention.head_count")), \
        int(g.require("block_count"))
    kv_lora = int(g.require("attention.kv_lora_rank"))
    mla_split = g.arch_get("attention.key_length_mla") is not None
    if mla_split:
        qk_head, v_head = int(g.arch_get("attention.key_length_mla")), int(g.require("attention.value_length_mla"))
    else:
        qk_head, v_head = int(g.require("attention.key_length")), int(g.require("attention.value_length"))
    qk_rope = int(g.require("rope.dimension_count"))
    q_lora = int(t["blk.0.attn_q_a.weight"].ne[1]) if "blk.0.attn_q_a.weight" in t else 0
    n_dense = int(g.arch_get("leading_dense_block_count", 0) or 0)
    n_ff_exp = int(g.require("expert_feed_forward_length"))
    n_shared = int(g.arch_get("expert_shared_count", 0) or 0)
    gating = {0: "softmax", 1: "softmax", 2: "sigmoid"}.get(int(g.arch_get("expert_gating_func", 0) or 0))
    if gating is None:
        raise UnsupportedError(f"{g.path.name}: expert_gating_func {g.arch_get('expert_gating_func')} "
                               "is not supported (softmax=1, sigmoid=2)")
    n_ctx_train = int(g.arch_get("context_length", 4096))
    fields = {}
    stype = g.arch_get("rope.scaling.type")
    factor = g.arch_get("rope.scaling.factor")
    if stype == "yarn":
        log_mul = g.arch_get("rope.scaling.yarn_log_multiplier")
        fields = dict(rope_scaling="yarn", rope_factor=float(factor or 1.0),
                      yarn_orig_ctx=int(g.arch_get("rope.scaling.original_context_length", 0) or n_ctx_train),
                      # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]: llama.cpp divides the stored 0.1 * mscale_all_dim by 0.1f
                      yarn_log_mul=float(_f(log_mul) / _f(0.1)) if log_mul is not None else 0.0,
                      yarn_beta_fast=float(g.arch_get("rope.scaling.yarn_beta_fast", 32.0)),
                      yarn_beta_slow=float(g.arch_get("rope.scaling.yarn_beta_slow", 1.0)),
                      yarn_ext_factor=float(g.arch_get("rope.scaling.yarn_ext_factor", -1.0)),
                      yarn_attn_factor=float(g.arch_get("rope.scaling.yarn_attn_factor", 1.0)))
    elif stype not in (None, "none") or factor not in (None, 1.0):
        raise UnsupportedError(f"{g.path.name}: RoPE scaling '{stype}' is not supported (only YaRN)")
    if g.arch_get("rope.scaling.attn_factor") not in (None, 1.0) or g.arch_get("attention.temperature_scale"):
        raise UnsupportedError(f"{g.path.name}: rope attn_factor / attention temperature scaling is not supported")
    return ModelConfig(
        # n_head_kv / head_dim as the GGUF (and llama.cpp's KV cache) has them: n_head x (nope + rope) for legacy
        # files, 1 x (kv_lora_rank + rope) for the absorbed form; memory estimates read them. The forward pass
        # uses the MLA fields below.
        arch=g.arch, n_vocab=int(embd.ne[1]), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=int(g.arch_get("attention.head_count_kv", n_head)),
        head_dim=int(g.arch_get("attention.key_length", qk_head)), n_ctx_train=n_ctx_train,
        rms_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g.arch_get("rope.freq_base", 10000.0)), rope_neox=False, rope_dim=qk_rope,
        n_ff=int(g.arch_get("feed_forward_length", 0) or 0),
        n_expert=int(g.arch_get("expert_count", 0) or 0), n_expert_used=int(g.arch_get("expert_used_count", 0) or 0),
        n_ff_exp=n_ff_exp, n_ff_shexp=n_ff_exp * n_shared,
        norm_topk=bool(g.arch_get("expert_weights_norm", False)),
        tie_embeddings="output.weight" not in t,
        q_lora_rank=q_lora, kv_lora_rank=kv_lora, qk_nope_dim=qk_head - qk_rope, qk_rope_dim=qk_rope,
        v_head_dim=v_head, mla_split=mla_split, n_dense_layers=n_dense, n_shared=n_shared,
        routed_scale=float(g.arch_get("expert_weights_scale", 0.0) or 0.0), gating=gating,
        expert_bias=f"blk.{n_dense}.exp_probs_b.bias" in t,
        n_group=int(g.arch_get("expert_group_count", 0) or 0),
        topk_group=int(g.arch_get("expert_group_used_count", 0) or 0), **fields)


_L = r"model\.layers\.(\d+)\."
HF_NAMES = DENSE_NAMES + EXPERT_NAMES + [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_L + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (_L + r"post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (_L + r"self_attn\.q_proj\.weight", r"blk.\1.attn_q.weight"),
    (_L + r"self_attn\.q_a_proj\.weight", r"blk.\1.attn_q_a.weight"),
    (_L + r"self_attn\.q_a_layernorm\.weight", r"blk.\1.attn_q_a_norm.weight"),
    (_L + r"self_attn\.q_b_proj\.weight", r"blk.\1.attn_q_b.weight"),
    (_L + r"self_attn\.kv_a_proj_with_mqa\.weight", r"blk.\1.attn_kv_a_mqa.weight"),
    (_L + r"self_attn\.kv_a_layernorm\.weight", r"blk.\1.attn_kv_a_norm.weight"),
    (_L + r"self_attn\.kv_b_proj\.weight", r"blk.\1.attn_kv_b.weight"),
    (_L + r"self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (_L + r"mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    (_L + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
]


# transformers' config defaults (DeepseekV2Config / DeepseekV3Config) for the keys that change the computation
_HF_DEFAULTS = {
    "deepseek_v2": dict(q_lora_rank=1536, n_shared_experts=2, first_k_dense_replace=0, routed_scaling_factor=1.0,
                        topk_method="greedy", n_group=None, topk_group=None, max_position_embeddings=2048),
    "deepseek_v3": dict(q_lora_rank=1536, n_shared_experts=1, first_k_dense_replace=3, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, norm_topk_prob=True, rope_interleave=True,
                        max_position_embeddings=4096),
}


def from_hf(cfg: dict) -> ModelConfig:
    """DeepSeek-V2 / V2-Lite (`deepseek_v2`) and V3 / R1 / Moonlight (`deepseek_v3`) config.json, computed as
    transformers computes them (modeling_deepseek_v2 / modeling_deepseek_v3):

    * the checkpoint's kv_b_proj is the legacy GGUF attn_kv_b (decompressed MLA), no tensor is rewritten;
    * RoPE: V2 rotates adjacent pairs (complex view), V3 too with rope_interleave (the default; its even/odd split
      permutes q and k alike, so q.k is ggml's NORM rope) and halves without it (NEOX): no weight permutation;
    * YaRN: the rope frequencies of `factor` / `original_max_position_embeddings` / beta_fast / beta_slow (whole
      correction dims unless truncate is off), and the softmax scale (1 + 0.1 mscale_all_dim ln factor)^2 / sqrt(dk),
      the cos/sin left unscaled when mscale == mscale_all_dim (every DeepSeek release); other mscale pairs refused;
    * routing: V2 softmax, plain top-k (`greedy`) or groups scored by their best expert (`group_limited_greedy`),
      never renormalised (transformers ignores norm_topk_prob there), times routed_scaling_factor; V3 always
      sigmoid + e_score_correction_bias for the choice only, groups scored by their two best, renormalised when
      norm_topk_prob, times routed_scaling_factor (transformers ignores scoring_func / topk_method for V3).
    """
    v3 = cfg.get("model_type") == "deepseek_v3"
    cfg = {**_HF_DEFAULTS["deepseek_v3" if v3 else "deepseek_v2"], **cfg}
    try:
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                        ("moe_layer_freq", 1)):
            if cfg.get(key, ok) != ok:
                raise UnsupportedError(f"DeepSeek {key} {cfg[key]!r} is not supported (only {ok!r})")
        n_head, n_embd = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        if int(cfg.get("num_key_value_heads") or n_head) != n_head:
            raise UnsupportedError("DeepSeek MLA with num_key_value_heads != num_attention_heads is not supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        n_ctx_train = int(cfg["max_position_embeddings"])
        fields = {}
        if kind == "yarn":
            factor = float(rope["factor"])
            mscale, mscale_all = float(rope.get("mscale") or 0), float(rope.get("mscale_all_dim") or 0)
            if factor > 1 and (not mscale_all or mscale != mscale_all or rope.get("attention_factor") is not None):
                # transformers then scales the rope half of q.k by get_mscale(f, mscale) / get_mscale(f, all) (or
                # by get_mscale(f) without both): not DeepSeek's (nor llama.cpp's) form
                raise UnsupportedError(f"DeepSeek YaRN with mscale {mscale} / mscale_all_dim {mscale_all} / "
                                       f"attention_factor {rope.get('attention_factor')} is not supported "
                                       "(only mscale == mscale_all_dim)")
            fields = dict(rope_scaling="yarn", rope_factor=factor,
                          yarn_orig_ctx=int(rope.get("original_max_position_embeddings") or n_ctx_train),
                          yarn_log_mul=mscale_all, yarn_beta_fast=float(rope.get("beta_fast") or 32.0),
                          yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                          yarn_truncate=bool(rope.get("truncate", True)))
        elif kind != "default":
            raise UnsupportedError(f"DeepSeek RoPE scaling '{kind}' is not supported (only YaRN)")
        n_expert, k = int(cfg["n_routed_experts"]), int(cfg["num_experts_per_tok"])
        if v3:
            gating, group_score, norm_topk = "sigmoid", "top2", bool(cfg["norm_topk_prob"])
            n_group = int(cfg["n_group"] or 1)
            if n_group > 1 and n_expert // n_group < 2:
                raise MoecliError(f"bad expert groups: {n_expert} experts in {n_group} groups (V3 scores a group "
                                  "by its two best)")
        else:
            method = cfg["topk_method"]
            if method not in ("greedy", "group_limited_greedy"):
                raise UnsupportedError(f"DeepSeek-V2 topk_method '{method}' is not supported "
                                       "(greedy, group_limited_greedy)")
            n_group = int(cfg["n_group"] or 0) if method == "group_limited_greedy" else 1
            # a group scored by its best expert (only with groups: the one-graph forward has llama.cpp's top2)
            gating, group_score, norm_topk = "softmax", "max" if n_group > 1 else "top2", False
            if method == "group_limited_greedy" and (not n_group or not cfg["topk_group"]):
                raise MoecliError("config.json: topk_method group_limited_greedy needs n_group and topk_group")
        nope, rope_dim = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        n_shared = int(cfg["n_shared_experts"] or 0)
        n_ff_exp = int(cfg["moe_intermediate_size"])
        return ModelConfig(
            arch="deepseek2", n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head, n_head_kv=n_head, head_dim=nope + rope_dim, n_ctx_train=n_ctx_train,
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 10000.0),
            rope_neox=bool(v3 and not cfg["rope_interleave"]), rope_dim=rope_dim,
            n_ff=int(cfg.get("intermediate_size") or 0), n_expert=n_expert, n_expert_used=k,
            n_ff_exp=n_ff_exp, n_ff_shexp=n_ff_exp * n_shared, norm_topk=norm_topk,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            q_lora_rank=int(cfg["q_lora_rank"] or 0), kv_lora_rank=int(cfg["kv_lora_rank"]),
            qk_nope_dim=nope, qk_rope_dim=rope_dim, v_head_dim=int(cfg["v_head_dim"]), mla_split=False,
            n_dense_layers=int(cfg["first_k_dense_replace"] or 0), n_shared=n_shared,
            routed_scale=float(cfg["routed_scaling_factor"]), gating=gating, expert_bias=v3,
            n_group=n_group, topk_group=int(cfg["topk_group"] or 1) if n_group > 1 else 0, group_score=group_score,
            **fields)
    except KeyError as e:
        raise MoecliError(f"config.json lacks {e.args[0]}") from None


def synth_config(d) -> ModelConfig:
    """moecli.synth.DeepSeekDims as the config its file loads into (GGUF's KV head count and key length)."""
    dk = d.qk_nope + d.qk_rope
    yarn = {}
    if d.yarn_factor:
        yarn = dict(rope_scaling="yarn", rope_factor=d.yarn_factor, yarn_orig_ctx=d.yarn_orig_ctx,
                    yarn_log_mul=float(_f(0.1 * d.yarn_mscale_all_dim) / _f(0.1)))
    return ModelConfig(
        arch="deepseek2", n_vocab=d.n_vocab, n_embd=d.n_embd, n_layer=d.n_layer, n_head=d.n_head,
        n_head_kv=1 if d.mla_split else d.n_head, head_dim=d.kv_lora_rank + d.qk_rope if d.mla_split else dk,
        n_ctx_train=d.context_length, rms_eps=d.rms_eps, rope_theta=d.rope_theta, rope_neox=False,
        rope_dim=d.qk_rope, n_ff=d.n_ff_dense, n_expert=d.n_expert, n_expert_used=d.n_expert_used, n_ff_exp=d.n_ff,
        n_ff_shexp=d.n_ff * d.n_shared, norm_topk=d.weights_norm, q_lora_rank=d.q_lora_rank,
        kv_lora_rank=d.kv_lora_rank, qk_nope_dim=d.qk_nope, qk_rope_dim=d.qk_rope, v_head_dim=d.v_head_dim,
        mla_split=d.mla_split, n_dense_layers=d.n_dense, n_shared=d.n_shared, routed_scale=d.weights_scale,
        gating=d.gating, expert_bias=d.expert_bias, n_group=d.n_group, topk_group=d.topk_group, **yarn)


def to_gguf(c: ModelConfig) -> dict:
    """The GGUF keys from_gguf reads back into `c`."""
    m = {"feed_forward_length": c.n_ff, "attention.q_lora_rank": c.q_lora_rank,
         "attention.kv_lora_rank": c.kv_lora_rank}
    if c.mla_split:  # MLA as llama.cpp runs it: one KV head of [latent | k_pe], values = latent
        m.update({"attention.value_length": c.kv_lora_rank,
                  "attention.key_length_mla": c.qk_nope_dim + c.qk_rope_dim,
                  "attention.value_length_mla": c.v_head_dim})
    else:
        m["attention.value_length"] = c.v_head_dim
    if c.rope_scaling == "yarn":  # the converter's 0.1 * mscale_all_dim
        m.update({"rope.scaling.type": "yarn", "rope.scaling.factor": c.rope_factor,
                  "rope.scaling.original_context_length": c.yarn_orig_ctx,
                  "rope.scaling.yarn_log_multiplier": float(_f(c.yarn_log_mul) * _f(0.1))})
    m.update({"leading_dense_block_count": c.n_dense_layers, "expert_feed_forward_length": c.n_ff_exp,
              "expert_shared_count": c.n_shared, "expert_weights_scale": c.routed_scale,
              "expert_weights_norm": c.norm_topk, "expert_gating_func": {"softmax": 1, "sigmoid": 2}[c.gating]})
    if c.n_group:
        m.update({"expert_group_count": c.n_group, "expert_group_used_count": c.topk_group})
    return gguf_metadata(c, **m)


def check_config(c: ModelConfig) -> None:
    if c.qk_nope_dim < 1 or c.qk_rope_dim % 2:
        raise MoecliError(f"bad MLA head sizes: qk_nope {c.qk_nope_dim}, qk_rope {c.qk_rope_dim}")
    if c.n_group > 1 and (c.n_expert % c.n_group or not 0 < c.topk_group <= c.n_group):
        raise MoecliError(f"bad expert groups: {c.n_expert} experts in {c.n_group} groups, {c.topk_group} used")


def _dk(c):
    return c.qk_nope_dim + c.qk_rope_dim


def _on(flag):
    return lambda c, l: bool(getattr(c, flag))


def _off(flag):
    return lambda c, l: not getattr(c, flag)


TS = S.TensorSpec
SPEC = S.Spec(layer=(
    S.norm("attn_norm.weight"),
    TS("attn_q.weight", lambda c: (c.n_embd, c.n_head * _dk(c)), when=_off("q_lora_rank")),
    TS("attn_q_a.weight", lambda c: (c.n_embd, c.q_lora_rank), when=_on("q_lora_rank")),
    S.norm("attn_q_a_norm.weight", _on("q_lora_rank"), lambda c: c.q_lora_rank),
    TS("attn_q_b.weight", lambda c: (c.q_lora_rank, c.n_head * _dk(c)), when=_on("q_lora_rank")),
    TS("attn_kv_a_mqa.weight", lambda c: (c.n_embd, c.kv_lora_rank + c.qk_rope_dim)),
    S.norm("attn_kv_a_norm.weight", width=lambda c: c.kv_lora_rank),
    TS("attn_k_b.weight", lambda c: (c.qk_nope_dim, c.kv_lora_rank, c.n_head), "wk_b", _on("mla_split")),
    TS("attn_v_b.weight", lambda c: (c.kv_lora_rank, c.v_head_dim, c.n_head), when=_on("mla_split")),
    TS("attn_kv_b.weight", lambda c: (c.kv_lora_rank, c.n_head * (c.qk_nope_dim + c.v_head_dim)),
       when=_off("mla_split")),
    TS("attn_output.weight", lambda c: (c.n_head * c.v_head_dim, c.n_embd)),
    S.norm("ffn_norm.weight"),
    *S.ffn(),
    *S.moe()[:1],
    TS("exp_probs_b.bias", lambda c: (c.n_expert,), "exp_bias", lambda c, l: S.moe_layer(c, l) and c.expert_bias),
    *S.moe()[1:],
    *S.shared_expert()[1:],
), globals=S.GLOBALS, check=check_config)


# ------------------------------------------------------------------------------------------------------ model

class MLACache:
    """Per layer: keys [pos, kv_head, dk] and values [pos, kv_head, dv]. With the absorbed (split) form there is
    one KV head holding [latent | k_pe] and the values are its first kv_lora_rank columns (no separate storage)."""

    def __init__(self, n_layer: int, n_ctx: int, n_kv: int, dk: int, dv: int | None, device, dtype=torch.float32):
        self.k = torch.zeros(n_layer, n_ctx, n_kv, dk, device=device, dtype=dtype)
        self.v = torch.zeros(n_layer, n_ctx, n_kv, dv, device=device, dtype=dtype) if dv else None
        self.n_ctx = n_ctx
        self.pos = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


class Layer:
    def __init__(self, ckpt: Checkpoint, l: int, device, linear, ggml: bool):
        c, b, T = ckpt.config, f"blk.{l}.", ckpt.tensor
        self.attn_norm = to_torch(T(b + "attn_norm.weight"), device)
        self.ffn_norm = to_torch(T(b + "ffn_norm.weight"), device)
        if c.q_lora_rank:
            self.q_a, self.q_b = linear(T(b + "attn_q_a.weight")), linear(T(b + "attn_q_b.weight"))
            self.q_a_norm = to_torch(T(b + "attn_q_a_norm.weight"), device)
        else:
            self.q = linear(T(b + "attn_q.weight"))
        self.kv_a = linear(T(b + "attn_kv_a_mqa.weight"))
        self.kv_a_norm = to_torch(T(b + "attn_kv_a_norm.weight"), device)
        if c.mla_split:
            kb, vb = T(b + "attn_k_b.weight"), T(b + "attn_v_b.weight")
            if ggml:  # per-head matmuls by ggml on the (possibly quantized) weights, as llama.cpp
                self.k_b = [linear(kb.expert(h)) for h in range(c.n_head)]
                self.v_b = [linear(vb.expert(h)) for h in range(c.n_head)]
            else:  # [H, r, nope] and [H, dv, r]
                self.k_b, self.v_b = to_torch(kb, device), to_torch(vb, device)
        else:
            self.kv_b = linear(T(b + "attn_kv_b.weight"))
        self.o = linear(T(b + "attn_output.weight"))
        self.ffn = self.shared = self.shared_gate = None  # Transformer.ffn / moe read these
        if l < c.n_dense_layers:
            self.ffn = tuple(linear(T(b + f"ffn_{p}.weight")) for p in ("gate", "up", "down"))
            return
        self.router = linear(T(b + "ffn_gate_inp.weight"))
        bias = ckpt.optional(b + "exp_probs_b.bias")
        self.exp_bias = to_torch(bias, device) if bias is not None else None
        if c.n_shared:
            self.shared = tuple(linear(T(b + f"ffn_{p}_shexp.weight")) for p in ("gate", "up", "down"))


class DeepSeek2Transformer(Transformer):
    """Transformer's forward pass with MLA attention, dense leading layers and DeepSeek routing."""

    GGML_FORWARD = True  # the ggml engine runs it as one graph where supported (moecli.runtime.ggml_forward)

    def __init__(self, ckpt: Checkpoint, device, experts, linear=None, max_ctx: int | None = None):
        c = self.config = ckpt.config
        self.device = torch.device(device)
        ggml = linear is not None
        linear = linear or (lambda w, b=None: TorchLinear(w, self.device, b))
        self.experts = experts  # experts(layer, hidden, ids, weights, scores) -> output: the executor seam
        self.embed = Embedding(ckpt.tensor("token_embd.weight"), self.device)
        self.layers = [Layer(ckpt, l, self.device, linear, ggml) for l in range(c.n_layer)]
        self.norm = to_torch(ckpt.tensor("output_norm.weight"), self.device)
        self.output = linear(ckpt.optional("output.weight") or ckpt.tensor("token_embd.weight"))
        self.max_ctx = max_ctx or c.n_ctx_train
        self.rope, self.kq_scale = torch_rope(c, self.max_ctx, self.device)
        self.on_router = None  # optional hook(layer, probs, ids, weights)

    def new_cache(self, n_ctx: int | None = None) -> MLACache:
        if self.fused_forward is not None:  # the ggml engine's one-graph forward keeps llama.cpp's cache layout
            return self.fused_forward.new_cache(n_ctx)
        c = self.config
        n = min(n_ctx or self.max_ctx, self.max_ctx)
        if c.mla_split:
            return MLACache(c.n_layer, n, 1, c.kv_lora_rank + c.qk_rope_dim, None, self.device)
        return MLACache(c.n_layer, n, c.n_head, c.qk_nope_dim + c.qk_rope_dim, c.v_head_dim, self.device)

    def attention(self, l, layer: Layer, h, pos, cache: MLACache, start: int) -> torch.Tensor:
        c, n = self.config, h.shape[0]
        H, nope, rope, r = c.n_head, c.qk_nope_dim, c.qk_rope_dim, c.kv_lora_rank
        if c.q_lora_rank:
            q = layer.q_b(rms_norm(layer.q_a(h), layer.q_a_norm, c.rms_eps))
        else:
            q = layer.q(h)
        q = q.view(n, H, nope + rope)
        q_nope, q_pe = q[..., :nope], self.rope(q[..., nope:], pos)
        kv = layer.kv_a(h)
        k_pe = self.rope(kv[:, None, r:], pos)  # one rope head shared by all query heads
        latent = rms_norm(kv[:, :r], layer.kv_a_norm, c.rms_eps)
        end = start + n
        if c.mla_split:  # absorbed: attention in the latent space over [latent | k_pe], one KV head
            if isinstance(layer.k_b, list):
                q_abs = torch.stack([layer.k_b[i](q_nope[:, i].contiguous()) for i in range(H)], 1)
            else:
                q_abs = torch.einsum("nhd,hrd->nhr", q_nope, layer.k_b)
            cache.k[l, start:end, 0] = torch.cat([latent, k_pe[:, 0]], -1)
            keys = cache.k[l, :end, 0]
            kqv = _attend_mqa(torch.cat([q_abs, q_pe], -1), keys, keys[:, :r], start, self.kq_scale)  # [n, H, r]
            if isinstance(layer.v_b, list):
                out = torch.stack([layer.v_b[i](kqv[:, i].contiguous()) for i in range(H)], 1)
            else:
                out = torch.einsum("nhr,hvr->nhv", kqv, layer.v_b)
            return layer.o(out.reshape(n, H * c.v_head_dim))
        kvb = layer.kv_b(latent).view(n, H, nope + c.v_head_dim)
        cache.k[l, start:end] = torch.cat([kvb[..., :nope], k_pe.expand(n, H, rope)], -1)
        cache.v[l, start:end] = kvb[..., nope:]
        out = _attend_mha(torch.cat([q_nope, q_pe], -1), cache.k[l, :end], cache.v[l, :end], start, self.kq_scale)
        return layer.o(out)


def _attend_mha(q, k, v, start: int, scale: float) -> torch.Tensor:
    """q [n, H, dk], k [T, H, dk], v [T, H, dv] -> [n, H*dv], causal, softmax(q.k * scale)."""
    n = q.shape[0]
    if n == 1:
        p = torch.softmax(torch.bmm(q.transpose(0, 1), k.permute(1, 2, 0)) * scale, -1)  # [H, 1, T]
        return torch.bmm(p, v.transpose(0, 1)).transpose(0, 1).reshape(1, -1)
    mask = None  # a fresh prompt: plain causal on 4-D inputs puts SDPA on its flash kernel (as layers.attend)
    if start:
        mask = torch.arange(start + n, device=q.device)[None, :] <= torch.arange(start, start + n,
                                                                                 device=q.device)[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[0].transpose(0, 1).reshape(n, -1)


def _attend_mqa(q, k, v, start: int, scale: float) -> torch.Tensor:
    """q [n, H, dk] against one KV head k [T, dk], v [T, dv] -> [n, H, dv], causal."""
    n, h, dk = q.shape
    s = (q.reshape(n * h, dk) @ k.T).view(n, h, -1) * scale
    if n > 1:
        kpos = torch.arange(k.shape[0], device=q.device)
        qpos = torch.arange(start, start + n, device=q.device)
        s = s.masked_fill((kpos[None, :] > qpos[:, None])[:, None, :], float("-inf"))
    return (torch.softmax(s, -1).reshape(n * h, -1) @ v).view(n, h, -1)


TRANSFORMER = DeepSeek2Transformer


# ------------------------------------------------------------------------------------------------------ ggml graph

def ggml_mla(g, L: dict, h):
    """The attention inputs as llama.cpp builds them: q (or q_a -> norm -> q_b) roped on its last qk_rope dims,
    the compressed kv split into the normed latent and one roped k_pe head. Decompressed cache: kv_b's k_nope and v
    per head, K = [k_nope | k_pe repeated over the heads]. Absorbed (split) form: q_nope into the latent space,
    attention over [latent | k_pe] with one KV head, the values the latents (v None: build_attn applies v_b)."""
    p, c, W, n = g.p, g.c, g.W, g.n
    H, nope, rope, r, dv = c.n_head, c.qk_nope_dim, c.qk_rope_dim, c.kv_lora_rank, c.v_head_dim
    dk = nope + rope
    q = g.linear(L["attn_q"], h) if "attn_q" in L else \
        G.ggml_mul_mat(p, W(L["attn_q_b"]), g.build_norm(G.ggml_mul_mat(p, W(L["attn_q_a"]), h), L["attn_q_a_norm"]))
    q = G.ggml_reshape_3d(p, q, dk, H, n)
    kv_pe = G.ggml_mul_mat(p, W(L["attn_kv_a_mqa"]), h)  # [r + rope, n]
    row = (r + rope) * 4
    latent = g.build_norm(G.ggml_view_2d(p, kv_pe, r, n, row, 0), L["attn_kv_a_norm"])
    k_pe = g.rope_heads(G.ggml_view_3d(p, kv_pe, rope, 1, n, row, row, r * 4))
    if c.mla_split:
        q_nope = G.ggml_view_3d(p, q, nope, H, n, dk * 4, dk * H * 4, 0)
        q_pe = g.rope_heads(G.ggml_view_3d(p, q, rope, H, n, dk * 4, dk * H * 4, nope * 4))
        q_abs = G.ggml_mul_mat(p, W(L["attn_k_b"]), G.ggml_permute(p, q_nope, 0, 2, 1, 3))  # [r, n, H]
        q = G.ggml_concat(p, G.ggml_permute(p, q_abs, 0, 2, 1, 3), q_pe, 0)  # [r + rope, H, n]
        k = G.ggml_concat(p, G.ggml_reshape_3d(p, latent, r, 1, n), k_pe, 0)  # [r + rope, 1, n]
        return q, k, None
    kv = G.ggml_mul_mat(p, W(L["attn_kv_b"]), latent)  # [(nope + dv) * H, n]
    k_nope = G.ggml_view_3d(p, kv, nope, H, n, (nope + dv) * 4, (nope + dv) * H * 4, 0)
    v = G.ggml_cont(p, G.ggml_view_3d(p, kv, dv, H, n, (nope + dv) * 4, (nope + dv) * H * 4, nope * 4))
    q = G.ggml_rope_set_offset(g.rope_heads(q), nope)
    k = G.ggml_concat(p, k_nope, G.ggml_repeat_4d(p, k_pe, rope, H, n, 1), 0)
    return q, k, v


def build_layer(g, l: int, L: dict, x):
    return transformer.build_layer(g, l, L, x, qkv=ggml_mla)


def kv_shape(c: ModelConfig) -> tuple[int, int, int]:
    """(KV heads, K dims, V dims) of the ggml cache: every head keeps [k_nope | k_pe] and its own v (decompressed),
    or one latent head of [latent | k_pe] whose values are its first kv_lora_rank dims (absorbed: V dims 0)."""
    if c.mla_split:
        return 1, c.kv_lora_rank + c.qk_rope_dim, 0
    return c.n_head, c.qk_nope_dim + c.qk_rope_dim, c.v_head_dim
