"""smallthinker: SmallThinker-21B-A3B / 4B-A0.6B (GGUF "smallthinker"), as llama.cpp computes them.

Every layer is MoE (no shared expert, no biases). The router reads the layer INPUT, before attention (what lets
the real engine prefetch a layer's experts while its attention runs); softmax or sigmoid scores, top-k weights
always renormalised and never scaled (llama.cpp reads no expert_weights_scale for it); ReGLU experts:
down(relu(gate x) * up x). With `attention.sliding_window` in the file: every fourth layer from layer 0 is a
full-attention layer WITHOUT RoPE, the others slide over 4096 keys (llama.cpp's fixed window, whatever the file
says) with NEOX RoPE over the whole head; without it: full attention and RoPE everywhere. Transformers 5.x has no
SmallThinker: GGUF only.
"""
from moecli.errors import UnsupportedError
from moecli.models import spec as S
from moecli.models.common import gguf_common, gguf_metadata, synth_common
from moecli.models.transformer import Transformer as TRANSFORMER  # noqa: F401  the shared decoder
from moecli.models.transformer import ggml_qkv, kv_shape  # noqa: F401

_GATING = {1: "softmax", 2: "sigmoid"}  # expert_gating_func
WINDOW, STEP = 4096, 4  # llama.cpp: n_swa forced to 4096, set_swa_pattern(4, dense_first), n_no_rope_layer_step 4


def _layout(n_layer: int, swa: bool) -> dict:
    """Sliding-window and NoPE layers (swa files only): layer l is full attention when l % 4 == 0, and without RoPE
    too unless the model has exactly 4 layers (llama.cpp: n_no_rope_layer_step == n_layer means RoPE everywhere)."""
    if not swa:
        return dict(sliding_window=0, swa_layers=(), nope_layers=())
    return dict(sliding_window=WINDOW, swa_layers=tuple(l for l in range(n_layer) if l % STEP),
                nope_layers=tuple(l for l in range(n_layer) if l % STEP == 0 and n_layer != STEP))


def _fixed(**fields) -> dict:
    return dict(norm_topk=True, routed_scale=0.0, expert_act="reglu", router_input="layer", **fields)


def from_gguf(g):
    gating = _GATING.get(int(g.require("expert_gating_func")))
    if gating is None:
        raise UnsupportedError(f"{g.path.name}: expert_gating_func {g.arch_get('expert_gating_func')} is not "
                               "supported (softmax=1, sigmoid=2)")
    n_embd, n_head, n_layer = (int(g.require(k)) for k in ("embedding_length", "attention.head_count",
                                                            "block_count"))
    head_dim = int(g.arch_get("attention.key_length") or n_embd // n_head)
    n_rot = int(g.arch_get("rope.dimension_count") or head_dim)
    if n_rot != head_dim:
        raise UnsupportedError(f"{g.path.name}: rope.dimension_count {n_rot} != head dim {head_dim} (llama.cpp "
                               "requires them equal for smallthinker)")
    swa = int(g.arch_get("attention.sliding_window", 0) or 0) > 0
    # this llama.cpp fixes the layer pattern and one RoPE base: refuse files that ask for another
    if g.arch_get("attention.sliding_window_pattern") not in (None, STEP):
        raise UnsupportedError(f"{g.path.name}: attention.sliding_window_pattern "
                               f"{g.arch_get('attention.sliding_window_pattern')} is not supported (only {STEP})")
    if g.arch_get("rope.freq_base_swa") not in (None, g.arch_get("rope.freq_base", 10000.0)):
        raise UnsupportedError(f"{g.path.name}: a separate RoPE base for sliding-window layers is not supported")
    return gguf_common(g, head_dim=head_dim, n_ff_exp=int(g.require("expert_feed_forward_length")), gating=gating,
                       **_fixed(**_layout(n_layer, swa)))


SPEC = S.Spec(layer=S.attention() + (S.norm("ffn_norm.weight"),) + S.moe(), globals=S.GLOBALS)


def build_layer(g, l: int, L: dict, x):
    """llama.cpp's llm_build_smallthinker layer: router logits from the layer input, attention (RoPE unless a
    NoPE layer), residual, ffn_norm, experts, residual."""
    logits = g.linear((L["ffn_gate_inp"], None), x)  # [E, n], before attn_norm
    h = g.build_norm(x, L["attn_norm"])
    x_out = g.residual(l, g.build_attn(l, L, *ggml_qkv(g, L, h, rope=l not in g.c.nope_layers)), x)
    h = g.build_norm(x_out, L["ffn_norm"])
    return g.build_moe_ffn(l, L, h, x_out, logits=g.kept_rows(l, logits))


def synth_config(d):
    """moecli.synth.SynthDims as the config its file loads into; `extra`: ("gating", "softmax"|"sigmoid"),
    ("swa", True|False) (default: softmax, sliding window on); tie_embeddings honoured (the 4B is tied)."""
    extra = dict(d.extra)
    return synth_common(d, "smallthinker", gating=extra.get("gating", "softmax"), tie_embeddings=d.tie_embeddings,
                        **_fixed(**_layout(d.n_layer, extra.get("swa", True))))


def to_gguf(c) -> dict:
    m = dict(expert_feed_forward_length=c.n_ff_exp,
             expert_gating_func={v: k for k, v in _GATING.items()}[c.gating])
    if c.sliding_window:
        m["attention.sliding_window"] = c.sliding_window
    return gguf_metadata(c, **m)
