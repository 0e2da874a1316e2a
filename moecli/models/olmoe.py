"""olmoe: OLMoE (q/k RMSNorm over the whole projection, no top-k renormalisation)."""
from moecli.models.common import ATTN_NAMES, EXPERT_NAMES, gguf_common, gguf_metadata, hf_common, moe_only, \
    synth_common
from moecli.models.transformer import SPEC, build_layer, kv_shape  # noqa: F401  the shared decoder
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401

HF_NAMES = ATTN_NAMES + EXPERT_NAMES


def from_gguf(g):
    return gguf_common(g, n_ff_exp=int(g.require("feed_forward_length")), qk_norm="full", norm_topk=False)


def from_hf(cfg):
    return hf_common(cfg, "olmoe", n_expert=int(cfg["num_experts"]), n_expert_used=int(cfg["num_experts_per_tok"]),
                     n_ff_exp=int(cfg["intermediate_size"]), qk_norm="full",
                     norm_topk=bool(cfg.get("norm_topk_prob", False)))


def synth_config(d):
    moe_only(d, "olmoe")
    if d.n_head_kv != d.n_head:
        raise ValueError("olmoe: llama.cpp supports only MHA (its q/k norms span the full width)")
    return synth_common(d, "olmoe", qk_norm="full")


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff_exp)
