"""qwen3moe: Qwen3-MoE (per-head q/k RMSNorm, no shared expert)."""
from moecli.errors import UnsupportedError
from moecli.models.common import ATTN_NAMES, EXPERT_NAMES, gguf_common, gguf_metadata, hf_common, moe_only, \
    synth_common
from moecli.models.transformer import SPEC, build_layer, kv_shape  # noqa: F401  the shared decoder
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401

HF_NAMES = ATTN_NAMES + EXPERT_NAMES


def from_gguf(g):
    # llama.cpp renormalises the top-k weights for qwen3moe whatever the HF config said (FACTS §2).
    return gguf_common(g, n_ff_exp=int(g.require("expert_feed_forward_length")), qk_norm="head", norm_topk=True)


def from_hf(cfg):
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
    return hf_common(cfg, "qwen3moe", n_expert=int(cfg.get("num_experts") or cfg.get("num_local_experts")),
                     n_expert_used=int(cfg["num_experts_per_tok"]), n_ff_exp=int(cfg["moe_intermediate_size"]),
                     qk_norm="head", norm_topk=bool(cfg.get("norm_topk_prob", False)))


def synth_config(d):
    moe_only(d, "qwen3moe")
    return synth_common(d, "qwen3moe", qk_norm="head", norm_topk=True, tie_embeddings=d.tie_embeddings)


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff_exp, expert_feed_forward_length=c.n_ff_exp)
