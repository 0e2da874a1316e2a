"""glm4moe: GLM-4.5 / GLM-4.5-Air / GLM-4.6 (GGUF "glm4moe", Hugging Face "glm4_moe"), as llama.cpp computes them.

Leading dense layers, q/k/v biases (+ per-head q/k RMSNorm where the file has them: the 355B variant), NEOX RoPE
on the first rope.dimension_count dims of each head (partial rotary), the FFN norm named post_attention_norm,
sigmoid routing with a selection-only expert bias (exp_probs_b), weights renormalised and scaled, one shared
expert. The trailing NextN (multi-token prediction) layer is in the file and counted by block_count; llama.cpp
loads and skips it, and so does moecli (n_layer excludes it, n_nextn_layers counts it).
"""
from moecli.errors import UnsupportedError
from moecli.models import spec as S
from moecli.models.common import ATTN_NAMES, DENSE_NAMES, EXPERT_NAMES, gguf_common, gguf_metadata, hf_common, \
    synth_common
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401  the shared decoder
from moecli.models.transformer import build_layer, kv_shape  # noqa: F401

_GATING = {1: "softmax", 2: "sigmoid"}  # expert_gating_func (llama.cpp: absent means sigmoid here)


def from_gguf(g):
    n_nextn = int(g.arch_get("nextn_predict_layers", 0) or 0)
    gating = _GATING.get(int(g.arch_get("expert_gating_func", 2) or 2))
    if gating is None:
        raise UnsupportedError(f"{g.path.name}: expert_gating_func {g.arch_get('expert_gating_func')} is not "
                               "supported (softmax=1, sigmoid=2)")
    n_ff_exp, n_shared = int(g.require("expert_feed_forward_length")), int(g.arch_get("expert_shared_count", 0) or 0)
    n_embd, n_head = int(g.require("embedding_length")), int(g.require("attention.head_count"))
    return gguf_common(
        g, n_layer=int(g.require("block_count")) - n_nextn, n_nextn_layers=n_nextn,
        head_dim=int(g.arch_get("attention.key_length") or n_embd // n_head),  # not the (partial) rope dims
        n_ff=int(g.arch_get("feed_forward_length", 0) or 0), n_ff_exp=n_ff_exp, n_shared=n_shared,
        n_ff_shexp=n_ff_exp * n_shared, n_dense_layers=int(g.arch_get("leading_dense_block_count", 0) or 0),
        gating=gating, expert_bias=True, norm_topk=bool(g.arch_get("expert_weights_norm", False)),
        routed_scale=float(g.require("expert_weights_scale")), attn_bias=True,
        qk_norm="head" if "blk.0.attn_q_norm.weight" in g.tensors else None)


def _nextn(c, l) -> bool:
    return l >= c.n_layer


SPEC = S.Spec(layer=S.attention(bias=lambda c, l: c.attn_bias) + (
    S.norm("post_attention_norm.weight"),
    *S.ffn(),
    *S.moe()[:1],
    S.TensorSpec("exp_probs_b.bias", lambda c: (c.n_expert,), "exp_bias", S.moe_layer),
    *S.moe()[1:],
    *S.shared_expert()[1:],
    # the NextN layer's own tensors (beside a full MoE layer's), loaded by llama.cpp and never computed
    S.TensorSpec("nextn.eh_proj.weight", lambda c: (2 * c.n_embd, c.n_embd), when=_nextn),
    S.norm("nextn.enorm.weight", _nextn), S.norm("nextn.hnorm.weight", _nextn),
), globals=S.GLOBALS)

_L = r"model\.layers\.(\d+)\."
HF_NAMES = [(p, "blk.\\1.post_attention_norm.weight" if "post_attention_layernorm" in p else t)
            for p, t in ATTN_NAMES] + DENSE_NAMES + EXPERT_NAMES + [
    (_L + r"mlp\.gate\.e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    (_L + r"mlp\.shared_experts\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
]


def from_hf(cfg: dict):
    """transformers' Glm4MoeConfig (num_hidden_layers excludes the NextN layer the checkpoint also holds)."""
    rope = cfg.get("rope_parameters") or {}
    if int(cfg.get("n_group") or 1) > 1:
        raise UnsupportedError("GLM-4-MoE with expert groups (n_group > 1) is not supported")
    n_ff_exp, n_shared = int(cfg["moe_intermediate_size"]), int(cfg.get("n_shared_experts") or 0)
    c = hf_common(cfg, "glm4moe", n_ff=int(cfg["intermediate_size"]), n_expert=int(cfg["n_routed_experts"]),
                  n_expert_used=int(cfg["num_experts_per_tok"]), n_ff_exp=n_ff_exp, n_shared=n_shared,
                  n_ff_shexp=n_ff_exp * n_shared, n_dense_layers=int(cfg.get("first_k_dense_replace", 1)),
                  gating="sigmoid", expert_bias=True, norm_topk=bool(cfg.get("norm_topk_prob", True)),
                  routed_scale=float(cfg.get("routed_scaling_factor", 1.0)),
                  attn_bias=bool(cfg.get("attention_bias", False)),
                  qk_norm="head" if cfg.get("use_qk_norm") else None)
    c.rope_dim = int(c.head_dim * float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
    return c


def synth_config(d):
    """moecli.synth.SynthDims (n_ff: routed expert FFN, n_ff_shexp a multiple of it, n_dense/n_ff_dense) as the
    config its file loads into; one NextN layer, as GLM-4.5 ships; `extra` e.g. (("rope_dim", 32),)."""
    n_shared = d.n_ff_shexp // d.n_ff if d.n_ff_shexp else 0
    return synth_common(d, "glm4moe", n_ff=d.n_ff_dense, n_dense_layers=d.n_dense, n_shared=n_shared,
                        n_ff_shexp=n_shared * d.n_ff, gating="sigmoid", expert_bias=True, norm_topk=True,
                        routed_scale=1.0, attn_bias=True, n_nextn_layers=1, **dict(d.extra))


def to_gguf(c) -> dict:
    return gguf_metadata(c, block_count=c.n_layer + c.n_nextn_layers, feed_forward_length=c.n_ff,
                         expert_feed_forward_length=c.n_ff_exp, expert_shared_count=c.n_shared,
                         leading_dense_block_count=c.n_dense_layers, expert_weights_scale=c.routed_scale,
                         expert_weights_norm=c.norm_topk,
                         expert_gating_func={v: k for k, v in _GATING.items()}[c.gating],
                         nextn_predict_layers=c.n_nextn_layers)
