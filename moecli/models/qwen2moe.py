"""qwen2moe: Qwen1.5/Qwen2-MoE (q/k/v biases, a shared expert behind a sigmoid gate, no top-k renormalisation)."""
from moecli.errors import UnsupportedError
from moecli.models.common import ATTN_NAMES, EXPERT_NAMES, gguf_common, gguf_metadata, hf_common, moe_only, \
    synth_common
from moecli.models.transformer import SPEC, build_layer, kv_shape  # noqa: F401  the shared decoder
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401

_L = r"model\.layers\.(\d+)\."
HF_NAMES = ATTN_NAMES + EXPERT_NAMES + [
    (_L + r"mlp\.shared_expert\.gate_proj\.weight", r"blk.\1.ffn_gate_shexp.weight"),
    (_L + r"mlp\.shared_expert\.up_proj\.weight", r"blk.\1.ffn_up_shexp.weight"),
    (_L + r"mlp\.shared_expert\.down_proj\.weight", r"blk.\1.ffn_down_shexp.weight"),
    (_L + r"mlp\.shared_expert_gate\.weight", r"blk.\1.ffn_gate_inp_shexp.weight"),
]


def from_gguf(g):
    return gguf_common(g, n_ff_exp=int(g.require("expert_feed_forward_length")),
                       n_ff_shexp=int(g.arch_get("expert_shared_feed_forward_length", 0) or 0),
                       shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in g.tensors,
                       attn_bias="blk.0.attn_q.bias" in g.tensors, norm_topk=False)


def from_hf(cfg):
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
        raise UnsupportedError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step) is not supported")
    return hf_common(cfg, "qwen2moe", n_expert=int(cfg["num_experts"]), n_expert_used=int(cfg["num_experts_per_tok"]),
                     n_ff_exp=int(cfg["moe_intermediate_size"]),
                     n_ff_shexp=int(cfg.get("shared_expert_intermediate_size", 0) or 0), shared_expert_gate=True,
                     attn_bias=bool(cfg.get("qkv_bias", True)), norm_topk=bool(cfg.get("norm_topk_prob", False)))


def synth_config(d):
    moe_only(d, "qwen2moe")
    return synth_common(d, "qwen2moe", n_ff_shexp=d.n_ff_shexp, shared_expert_gate=d.n_ff_shexp > 0,
                        attn_bias=d.attn_bias)


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff_exp, expert_feed_forward_length=c.n_ff_exp,
                         expert_shared_feed_forward_length=c.n_ff_shexp)
