"""minimax-m2: MiniMax-M2 (230B-A10B) (GGUF "minimax-m2"), as llama.cpp computes it.

Every layer MoE, no shared expert, no biases; q/k RMSNorm over the whole projection (n_head * head_dim, and
n_head_kv * head_dim: not per head), NEOX RoPE on the first rope.dimension_count dims of each head (partial
rotary: 64 of 128 in the real model); sigmoid routing (expert_gating_func, which llama.cpp needs in the file) with a
selection-only expert bias (exp_probs_b), the top-k weights renormalised and never scaled; output.weight required
(no tied embeddings). llama.cpp sizes the experts by feed_forward_length, so it must equal the expert FFN width.
"""
from moecli.errors import UnsupportedError
from moecli.models import spec as S
from moecli.models.common import ATTN_NAMES, gguf_common, gguf_metadata, hf_common, synth_common
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401  the shared decoder
from moecli.models.transformer import build_layer, kv_shape  # noqa: F401

_GATING = {1: "softmax", 2: "sigmoid"}  # expert_gating_func


def _fixed(**fields) -> dict:
    return dict(expert_bias=True, norm_topk=True, routed_scale=0.0, qk_norm="full", **fields)


def from_gguf(g):
    name = g.path.name
    gating = _GATING.get(int(g.require("expert_gating_func")))
    if gating is None:
        raise UnsupportedError(f"{name}: expert_gating_func {g.arch_get('expert_gating_func')} is not supported "
                               "(softmax=1, sigmoid=2)")
    n_ff_exp = int(g.require("expert_feed_forward_length"))
    if int(g.arch_get("feed_forward_length", 0) or 0) != n_ff_exp:
        raise UnsupportedError(f"{name}: feed_forward_length {g.arch_get('feed_forward_length')} != "
                               f"expert_feed_forward_length {n_ff_exp} (llama.cpp sizes minimax-m2's experts by "
                               "the first)")
    return gguf_common(g, n_ff_exp=n_ff_exp, gating=gating, **_fixed())


SPEC = S.Spec(layer=S.attention() + (
    S.norm("ffn_norm.weight"),
    *S.moe()[:1],
    S.TensorSpec("exp_probs_b.bias", lambda c: (c.n_expert,), "exp_bias", S.moe_layer),
    *S.moe()[1:],
), globals=S.GLOBALS[:2] + (S.TensorSpec("output.weight", lambda c: (c.n_embd, c.n_vocab), "out"),))


_L = r"model\.layers\.(\d+)\.block_sparse_moe\."
HF_NAMES = ATTN_NAMES + [  # Mixtral's names for the router and experts, plus the selection bias
    (_L + r"gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (_L + r"e_score_correction_bias", r"blk.\1.exp_probs_b.bias"),
    (_L + r"experts\.(\d+)\.w1\.weight", r"blk.\1.ffn_gate_exps.\2"),
    (_L + r"experts\.(\d+)\.w3\.weight", r"blk.\1.ffn_up_exps.\2"),
    (_L + r"experts\.(\d+)\.w2\.weight", r"blk.\1.ffn_down_exps.\2"),
]
_SCORING = {"sigmoid": "sigmoid", "softmax": "softmax"}


def from_hf(cfg: dict):
    """transformers' MiniMaxM2Config, or the released config.json (rotary_dim, scoring_func)."""
    gating = _SCORING.get(cfg.get("scoring_func", "sigmoid"))
    if gating is None:
        raise UnsupportedError(f"MiniMax-M2 scoring_func {cfg.get('scoring_func')!r} is not supported")
    c = hf_common(cfg, "minimax-m2", n_expert=int(cfg["num_local_experts"]),
                  n_expert_used=int(cfg["num_experts_per_tok"]), n_ff_exp=int(cfg["intermediate_size"]),
                  gating=gating, **_fixed())
    rope = cfg.get("rope_parameters") or {}
    c.rope_dim = int(cfg.get("rotary_dim") or c.head_dim * float(rope.get("partial_rotary_factor", 1.0)))
    return c


def synth_config(d):
    """moecli.synth.SynthDims as the config its file loads into; `extra` e.g. (("rope_dim", 32),) (partial
    rotary), ("gating", "softmax")."""
    extra = dict(d.extra)
    return synth_common(d, "minimax-m2", gating=extra.pop("gating", "sigmoid"), **_fixed(**extra))


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff_exp, expert_feed_forward_length=c.n_ff_exp,
                         expert_gating_func={v: k for k, v in _GATING.items()}[c.gating])
