"""olmoe: OLMoE (q/k RMSNorm over the whole projection, no top-k renormalisation)."""
from moecli.models.common import ATTN_NAMES, EXPERT_NAMES, gguf_common, hf_common
from moecli.models.transformer import SPEC, build_layer, kv_shape  # noqa: F401  the shared decoder
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401

HF_NAMES = ATTN_NAMES + EXPERT_NAMES


def from_gguf(g):
    return gguf_common(g, n_ff_exp=int(g.require("feed_forward_length")), qk_norm="full", norm_topk=False)


def from_hf(cfg):
    return hf_common(cfg, "olmoe", n_expert=int(cfg["num_experts"]), n_expert_used=int(cfg["num_experts_per_tok"]),
                     n_ff_exp=int(cfg["intermediate_size"]), qk_norm="full",
                     norm_topk=bool(cfg.get("norm_topk_prob", False)))
