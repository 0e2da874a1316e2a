"""llama4: Llama 4 Scout (17B-16E) / Maverick (17B-128E) (GGUF "llama4"), as llama.cpp computes them.

Dense and MoE layers interleaved (layer l is MoE when (l + 1) % interleave_moe_layer_step == 0); an MoE layer has
one shared expert of the routed experts' width and top-k SIGMOID routing where the experts are picked by the raw
logits and the weight scales each expert's INPUT (not its output), never renormalised. Attention in groups of four
layers: three chunked-attention layers (a query sees the keys of its own 8192-token chunk) with NORM RoPE (times the
rope_freqs factors when the file has them) and weightless L2 q/k norms after it (not on the 128-expert Maverick), then
one full-attention layer without RoPE whose queries get llama.cpp's temperature tuning. Chunk size, temperature
floor and scale are llama.cpp's fixed values, whatever the file says. From Hugging Face safetensors (from_hf:
Meta's Llama4ForConditionalGeneration or a text-only Llama4ForCausalLM) they come from config.json instead, as
transformers reads them, and the llama3 rope_parameters become the factors (what llama.cpp's converter writes).
"""
import math

import numpy as np
import torch

from moecli.errors import MoecliError, UnsupportedError
from moecli.kernels import ggml as G
from moecli.models import spec as S
from moecli.models import validate as checks
from moecli.models.common import ATTN_NAMES, gguf_common, gguf_metadata, hf_common, hf_fused_experts, synth_common
from moecli.models.config import ExpertStack
from moecli.models.gpt_oss import attend_sinks
from moecli.models.layers import attend, rms_norm
from moecli.models.rope import attn_temperature, llama3_factors
from moecli.models.transformer import Transformer, kv_shape  # noqa: F401

CHUNK, STEP = 8192, 4  # llama.cpp: n_swa = 8192 (chunked), swa pattern 4, n_no_rope_layer_step 4
TEMP_FLOOR, TEMP_SCALE = 8192, 0.1  # n_attn_temp_floor_scale, f_attn_temp_scale


def _layout(n_layer: int, n_expert: int, moe_step: int) -> dict:
    return dict(moe_step=moe_step, swa_layers=tuple(l for l in range(n_layer) if l % STEP < STEP - 1),
                nope_layers=tuple(l for l in range(n_layer) if (l + 1) % STEP == 0), attn_chunk=CHUNK,
                attn_temp_scale=TEMP_SCALE, attn_temp_floor=TEMP_FLOOR, rope_neox=False,
                qk_norm=None if n_expert == 128 else "l2",  # llama.cpp: use_kq_norm unless 17B-128E
                gating="sigmoid", select_logits=True, weight_input=True, norm_topk=False, routed_scale=0.0)


def from_gguf(g):
    name = g.path.name
    step = int(g.require("interleave_moe_layer_step"))
    if step < 1:
        raise UnsupportedError(f"{name}: interleave_moe_layer_step {step} is not supported (at least 1)")
    if g.arch_get("attention.sliding_window") is not None and int(g.arch_get("attention.sliding_window")) == 0:
        raise UnsupportedError(f"{name}: attention.sliding_window 0 (no chunked attention) is not supported "
                               "(llama.cpp aborts on it)")
    if g.arch_get("attention.sliding_window_pattern") not in (None, STEP):
        raise UnsupportedError(f"{name}: attention.sliding_window_pattern "
                               f"{g.arch_get('attention.sliding_window_pattern')} is not supported (only {STEP})")
    if g.arch_get("rope.freq_base_swa") not in (None, g.arch_get("rope.freq_base", 10000.0)):
        raise UnsupportedError(f"{name}: a separate RoPE base for chunked layers is not supported")
    n_embd, n_head, n_layer = (int(g.require(k)) for k in ("embedding_length", "attention.head_count",
                                                            "block_count"))
    head_dim = int(g.arch_get("attention.key_length") or n_embd // n_head)
    for key in ("attention.value_length", "rope.dimension_count"):  # llama.cpp asserts both equal the head dim
        if int(g.arch_get(key) or head_dim) != head_dim:
            raise UnsupportedError(f"{name}: {key} {g.arch_get(key)} != head dim {head_dim} (llama.cpp requires "
                                   "them equal for llama4)")
    n_expert = int(g.require("expert_count"))
    n_ff_exp = int(g.require("expert_feed_forward_length"))
    factors = ()
    t = g.tensors.get("rope_freqs.weight")
    if t is not None:
        if tuple(t.ne) not in ((head_dim // 2,), (head_dim // 2, 1)):
            raise UnsupportedError(f"{name}: rope_freqs.weight has shape {list(t.ne)}, expected [{head_dim // 2}]")
        factors = tuple(float(x) for x in np.asarray(t.numpy(), dtype=np.float32).reshape(-1))
        if not all(np.isfinite(factors)) or min(factors) <= 0:
            raise UnsupportedError(f"{name}: rope_freqs.weight must hold finite positive factors")
    return gguf_common(g, head_dim=head_dim, n_ff=int(g.arch_get("feed_forward_length", 0) or 0), n_ff_exp=n_ff_exp,
                       n_ff_shexp=n_ff_exp, rope_factors=factors, **_layout(n_layer, n_expert, step))


GLOBALS = S.GLOBALS + (S.TensorSpec("rope_freqs.weight", lambda c: (c.rope_dim // 2,), "rope_freqs",
                                    lambda c, l: bool(c.rope_factors), required=False),)
SPEC = S.Spec(layer=S.attention() + (S.norm("ffn_norm.weight"),) + S.ffn() + S.moe() + S.shared_expert(),
              globals=GLOBALS)


def build_layer(g, l: int, L: dict, x):
    """llm_build_llama4's layer: q/k/v; RoPE (+ factors) and L2 q/k norms, or no RoPE and the temperature-tuned
    queries; chunked or full attention; residual; ffn_norm; dense FFN or experts + shared expert; residual."""
    c, p = g.c, g.p
    h = g.build_norm(x, L["attn_norm"])
    q, k, v = (g.linear(L[f"attn_{n}"], h) for n in "qkv")
    q, k = g.heads(q, c.head_dim, c.n_head), g.heads(k, c.head_dim, c.n_head_kv)
    if l in c.nope_layers:
        if g.attn_scale_t is not None:
            q = G.ggml_mul(p, q, g.attn_scale_t)
    else:
        q, k = g.rope_heads(q), g.rope_heads(k)
        if c.qk_norm == "l2":
            q, k = G.ggml_rms_norm(p, q, c.rms_eps), G.ggml_rms_norm(p, k, c.rms_eps)
    x = g.residual(l, g.build_attn(l, L, q, k, v), x)
    h = g.build_norm(x, L["ffn_norm"])
    if "ffn_gate_inp" not in L:
        return g.add(g.build_ffn(L["ffn_gate"], L["ffn_up"], L["ffn_down"], h), x)
    return g.build_moe_ffn(l, L, h, x)


class Llama4Transformer(Transformer):
    """The shared decoder with llama4's attention (the MoE side is config: weight_input, select_logits)."""

    def attention(self, l, layer, h, pos, cache, start: int) -> torch.Tensor:
        c, n = self.config, h.shape[0]
        q = layer.q(h).view(n, c.n_head, c.head_dim)
        k = layer.k(h).view(n, c.n_head_kv, c.head_dim)
        if l in c.nope_layers:
            if c.attn_temp_scale:  # 0: a Hugging Face config with attn_temperature_tuning off
                q = q * torch.from_numpy(attn_temperature(c, pos.cpu().numpy())).to(q.device)[:, None, None]
        else:
            q, k = self.rope(q, pos), self.rope(k, pos)
            if c.qk_norm == "l2":
                q, k = rms_norm(q, 1.0, c.rms_eps), rms_norm(k, 1.0, c.rms_eps)
        end = start + n
        cache.k[l, start:end] = k
        cache.v[l, start:end] = layer.v(h).view(n, c.n_head_kv, c.head_dim)
        chunk = c.attn_chunk if l in c.swa_layers else 0
        if chunk and end > chunk:  # some query's chunk starts after key 0: masked attention from its start
            if self._no_sinks is None:
                self._no_sinks = torch.full((c.n_head,), float("-inf"), device=self.device)
            k0 = start // chunk * chunk
            return layer.o(attend_sinks(q, cache.k[l, k0:end], cache.v[l, k0:end], start, k0, self._no_sinks,
                                        self.kq_scale, 0, chunk=chunk))
        return layer.o(attend(q, cache.k[l, :end], cache.v[l, :end], start))


TRANSFORMER = Llama4Transformer


def synth_config(d):
    """moecli.synth.SynthDims (n_ff: routed and shared expert FFN, n_ff_dense: the dense layers') as the config
    its file loads into; `extra`: ("moe_step", N) (default 1: every layer MoE, as Scout), ("rope_freqs", True)
    (write rope_freqs.weight: factors > 1)."""
    extra = dict(d.extra)
    c = synth_common(d, "llama4", n_ff=d.n_ff_dense, n_ff_shexp=d.n_ff, tie_embeddings=d.tie_embeddings,
                     **_layout(d.n_layer, d.n_expert, int(extra.get("moe_step", 1))))
    if extra.get("rope_freqs"):
        c.rope_factors = (1.0,) * (c.rope_dim // 2)  # the writer draws the values; the plan needs the tensor
    return c


def to_gguf(c) -> dict:
    return gguf_metadata(c, feed_forward_length=c.n_ff, expert_feed_forward_length=c.n_ff_exp,
                         interleave_moe_layer_step=c.moe_step)


# ------------------------------------------------------------------------------------------------------ Hugging Face
# Llama4ForConditionalGeneration (what Meta ships: config.json's text_config, which the loader passes, the text model
# under language_model., vision_model.* / multi_modal_projector.* skipped since no pattern names them) or
# Llama4ForCausalLM (llama4_text).
_P, _L = r"(?:language_model\.)?", r"model\.layers\.(\d+)\.feed_forward\."
HF_NAMES = [(_P + pattern, template) for pattern, template in ATTN_NAMES] + [
    (_P + _L + r"router\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (_P + _L + r"shared_expert\.(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2_shexp.weight"),
    (_P + _L + r"(gate|up|down)_proj\.weight", r"blk.\1.ffn_\2.weight"),  # the dense layers' FFN
]  # the fused experts (feed_forward.experts.*) are read by hf_experts()


def _flags(text: dict, key: str, n: int, default: list) -> list:
    v = text.get(key)
    if v is None:
        return default
    if len(v) < n or not all(type(x) is int for x in v):
        raise MoecliError(f"config.json: {key} must list an integer for each of the {n} layers, got {v!r:.80}")
    return v[:n]


def from_hf(text: dict):
    """transformers' Llama4TextConfig (for a Llama4Config, the loader passes its text_config). What it makes
    configurable is read from the file (transformers is the reference here), where from_gguf takes llama.cpp's
    fixed values."""
    checks.hf_config(text)  # the loader checked it already; from_hf is called directly too
    try:
        n_layer, n_expert = int(text["num_hidden_layers"]), int(text["num_local_experts"])
        n_ff_exp, n_ff = int(text["intermediate_size"]), int(text.get("intermediate_size_mlp", 16384))
        head_dim = int(text.get("head_dim") or text["hidden_size"] // max(1, text["num_attention_heads"]))
    except KeyError as e:
        raise MoecliError(f"config.json lacks {e.args[0]}") from None
    if text.get("hidden_act", "silu") != "silu" or text.get("attention_bias"):
        raise UnsupportedError(f"llama4: hidden_act {text.get('hidden_act')!r} / attention_bias "
                               f"{text.get('attention_bias')} are not supported (silu, no biases)")
    step = text.get("interleave_moe_layer_step", 1)
    moe = text.get("moe_layers")
    if step < 1 or moe not in (None, list(range(step - 1, n_layer, step))):
        raise UnsupportedError(f"llama4: moe_layers {moe!r:.80} with interleave_moe_layer_step {step} is not "
                               "supported (every step-th layer MoE, as interleave_moe_layer_step says)")
    interval = text.get("no_rope_layer_interval", 4)
    if interval < 1:
        raise MoecliError(f"config.json: no_rope_layer_interval {interval} must be at least 1")
    rope_on = _flags(text, "no_rope_layers", n_layer, [int((l + 1) % interval != 0) for l in range(n_layer)])
    chunk = text.get("attention_chunk_size")
    if chunk is not None and chunk < 1:
        raise MoecliError(f"config.json: attention_chunk_size {chunk} must be at least 1 (or null: no chunking)")
    types = text.get("layer_types") or ["chunked_attention" if r and chunk else "full_attention" for r in rope_on]
    if len(types) < n_layer or not all(t in ("chunked_attention", "full_attention") for t in types[:n_layer]) or \
            ("chunked_attention" in types[:n_layer] and not chunk):
        raise UnsupportedError(f"llama4: layer_types {types!r:.80} are not supported (chunked_attention, which "
                               "needs attention_chunk_size, or full_attention per layer)")
    floor, scale = text.get("floor_scale", 8192), float(text.get("attn_scale", 0.1))
    tuning = bool(text.get("attn_temperature_tuning", True))
    if tuning and not (floor >= 1 and math.isfinite(scale)):
        raise MoecliError(f"config.json: floor_scale {floor} / attn_scale {scale} must be at least 1 / finite")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(text.get("rope_theta") or rope.get("rope_theta") or 500000.0)  # Llama4TextConfig's default
    if kind not in ("default", "llama3"):
        raise UnsupportedError(f"llama4: RoPE scaling '{kind}' is not supported (llama3 factors only)")
    factors = llama3_factors(rope, head_dim, theta) if kind == "llama3" else ()
    if factors and not all(math.isfinite(f) and f > 0 for f in factors):
        raise MoecliError(f"config.json: rope_parameters {rope!r:.80} give non-positive RoPE factors")
    plain = {**text, "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_scaling": None}
    return hf_common(plain, "llama4", head_dim=head_dim, n_expert=n_expert,
                     n_expert_used=int(text.get("num_experts_per_tok", 1)), n_ff=n_ff, n_ff_exp=n_ff_exp,
                     n_ff_shexp=n_ff_exp, rope_factors=factors, rope_neox=False,
                     moe_step=step, swa_layers=tuple(l for l in range(n_layer) if types[l] == "chunked_attention"),
                     nope_layers=tuple(l for l in range(n_layer) if not rope_on[l]), attn_chunk=int(chunk or 0),
                     attn_temp_scale=scale if tuning else 0.0, attn_temp_floor=int(floor) if tuning else 0,
                     qk_norm="l2" if text.get("use_qk_norm", True) else None, gating="sigmoid", select_logits=True,
                     weight_input=True, norm_topk=False, routed_scale=0.0)


def hf_experts(m, c) -> dict:
    """The MoE layers' expert stacks from the fused feed_forward.experts.gate_up_proj [E, d, 2 ff] (gate columns,
    then up) and down_proj [E, ff, d] (x @ W): a one-time transposing copy into ggml's layout."""
    pre = "language_model." if "language_model.model.embed_tokens.weight" in m.tensors else ""
    out = {}
    for l in range(c.n_layer):
        if not S.moe_layer(c, l):
            continue
        p = f"{pre}model.layers.{l}.feed_forward.experts."
        gate_up, down = m.tensors.get(p + "gate_up_proj"), m.tensors.get(p + "down_proj")
        if gate_up is None or down is None:
            raise MoecliError(f"{m.path.name}: MoE layer {l} lacks {p}gate_up_proj / down_proj")
        stacks = hf_fused_experts(gate_up, p + "gate_up_proj", "halves") + hf_fused_experts(down, p + "down_proj", None)
        for kind, w in zip(("gate", "up", "down"), stacks):
            out[f"blk.{l}.ffn_{kind}_exps"] = ExpertStack(stacked=w)
    return out
