"""llama: dense Llama/SmolLM/Mistral and Mixtral-style MoE (softmax -> top-k -> renormalise)."""
from moecli.models.common import ATTN_NAMES, DENSE_NAMES, EXPERT_NAMES, gguf_common, gguf_metadata, hf_common, \
    synth_common
from moecli.models.transformer import SPEC, build_layer, kv_shape  # noqa: F401  the shared decoder
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401

HF_NAMES = ATTN_NAMES + DENSE_NAMES + EXPERT_NAMES + [
    # Mixtral's own names for its router and experts
    (r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"blk.\1.ffn_gate_exps.\2"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"blk.\1.ffn_up_exps.\2"),
    (r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"blk.\1.ffn_down_exps.\2"),
]


def from_gguf(g):
    ff = int(g.require("feed_forward_length"))
    moe = int(g.arch_get("expert_count", 0) or 0) > 0
    # The GGUF converter permutes Q/K for llama, so RoPE rotates adjacent pairs (NORM layout).
    return gguf_common(g, rope_neox=False, n_ff=0 if moe else ff, n_ff_exp=ff if moe else 0, norm_topk=True)


def from_hf(cfg):
    n_expert = int(cfg.get("num_local_experts", 0) or 0)
    ff = int(cfg["intermediate_size"])
    return hf_common(cfg, "llama", n_ff=0 if n_expert else ff, n_expert=n_expert,
                     n_expert_used=int(cfg.get("num_experts_per_tok", 0) or 0),
                     n_ff_exp=ff if n_expert else 0, norm_topk=True)


def synth_config(d):
    return synth_common(d, "llama", rope_neox=False, norm_topk=True, tie_embeddings=d.tie_embeddings)


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff or c.n_ff_exp)
