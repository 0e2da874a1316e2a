"""gpt-oss (gpt-oss-20b / gpt-oss-120b, GGUF arch "gpt-oss"), as llama.cpp's openai-moe graph computes it.

Differences from the shared decoder:
  * attention: q/k/v/o biases, a learned per-head "sink" logit that joins every softmax denominator (it takes
    probability mass without contributing a value), and a sliding window (128 keys) on every other layer,
    starting with layer 0; NEOX RoPE over the whole head with YaRN (x32 from 4096);
  * the FFN norm is called `post_attention_norm` in the file;
  * routing: top-k of the router logits (+ bias), then a softmax over the k chosen logits;
  * experts with biases and the clamped SwiGLU (see moecli.runtime.experts.glu), usually MXFP4.
"""
from __future__ import annotations


import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.tensor import TensorData
from moecli.models import spec as S
from moecli.models.common import ggml_tensor_of, gguf_metadata, hf_fused_experts, synth_common
from moecli.models.config import Checkpoint, ExpertStack, ModelConfig
from moecli.models.layers import to_torch
from moecli.models import transformer
from moecli.models.transformer import Transformer, build_layer, kv_shape  # noqa: F401  the shared graph


def from_gguf(g) -> ModelConfig:
    t = g.tensors
    embd = t.get("token_embd.weight")
    if embd is None:
        raise MoecliError(f"{g.path.name}: model file lacks tensor token_embd.weight")
    n_embd, n_head, n_layer = (int(g.require(k)) for k in ("embedding_length", "attention.head_count",
                                                            "block_count"))
    head_dim = int(g.arch_get("attention.key_length") or n_embd // n_head)
    n_rot = int(g.arch_get("rope.dimension_count") or head_dim)
    if n_rot != head_dim:
        raise UnsupportedError(f"{g.path.name}: partial RoPE ({n_rot} of {head_dim} dims) is not supported for gpt-oss")
    base = g.arch_get("rope.freq_base", 10000.0)
    if g.arch_get("rope.freq_base_swa") not in (None, base):
        raise UnsupportedError(f"{g.path.name}: a separate RoPE base for sliding-window layers is not supported")
    pattern = g.arch_get("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):  # per-layer flags
        swa = tuple(l for l, on in enumerate(pattern) if on)
    else:  # llama.cpp's set_swa_pattern(n): layer l slides unless l % n == n - 1 (n = 0: every layer)
        n = int(pattern)
        swa = tuple(l for l in range(n_layer) if n == 0 or l % n < n - 1)
    n_ctx_train = int(g.arch_get("context_length", 4096))
    fields = {}
    stype = g.arch_get("rope.scaling.type")
    if stype == "yarn":
        fields = dict(rope_scaling="yarn", rope_factor=float(g.arch_get("rope.scaling.factor", 1.0) or 1.0),
                      yarn_orig_ctx=int(g.arch_get("rope.scaling.original_context_length", 0) or n_ctx_train),
                      yarn_beta_fast=float(g.arch_get("rope.scaling.yarn_beta_fast", 32.0)),
                      yarn_beta_slow=float(g.arch_get("rope.scaling.yarn_beta_slow", 1.0)),
                      yarn_ext_factor=float(g.arch_get("rope.scaling.yarn_ext_factor", -1.0)),
                      yarn_attn_factor=float(g.arch_get("rope.scaling.yarn_attn_factor", 1.0)))
    elif stype not in (None, "none"):
        raise UnsupportedError(f"{g.path.name}: RoPE scaling '{stype}' is not supported (only YaRN)")
    if g.arch_get("rope.scaling.yarn_log_multiplier") or g.arch_get("rope.scaling.attn_factor") not in (None, 1.0):
        raise UnsupportedError(f"{g.path.name}: YaRN log multiplier / rope attn_factor is not supported for gpt-oss")
    return ModelConfig(
        arch=g.arch, n_vocab=int(embd.ne[1]), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_head_kv=int(g.arch_get("attention.head_count_kv", n_head)), head_dim=head_dim, n_ctx_train=n_ctx_train,
        rms_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(base), rope_neox=True,
        n_expert=int(g.require("expert_count")), n_expert_used=int(g.require("expert_used_count")),
        n_ff_exp=int(g.require("expert_feed_forward_length")), tie_embeddings="output.weight" not in t,
        routed_scale=float(g.arch_get("expert_weights_scale", 0.0) or 0.0), gating="softmax_weight",
        sliding_window=int(g.require("attention.sliding_window")), swa_layers=swa, attn_sinks=True,
        expert_act="swiglu_oai", **fields)


def synth_config(d) -> ModelConfig:
    """moecli.synth.GptOssDims as the config its file loads into (sliding window on even layers)."""
    yarn = {}
    if d.yarn_factor:
        yarn = dict(rope_scaling="yarn", rope_factor=d.yarn_factor, yarn_orig_ctx=d.yarn_orig_ctx)
    return synth_common(d, "gpt-oss", gating="softmax_weight", sliding_window=d.sliding_window,
                        swa_layers=tuple(range(0, d.n_layer, 2)), attn_sinks=True, expert_act="swiglu_oai", **yarn)


def to_gguf(c: ModelConfig) -> dict:
    m = {"feed_forward_length": c.n_ff_exp, "attention.sliding_window": c.sliding_window,
         "expert_feed_forward_length": c.n_ff_exp}
    if c.rope_scaling == "yarn":
        m.update({"rope.scaling.type": "yarn", "rope.scaling.factor": c.rope_factor,
                  "rope.scaling.original_context_length": c.yarn_orig_ctx})
    return gguf_metadata(c, **m)


def _always(c, l) -> bool:
    return True


def _exps_bias(kind: str, ne) -> S.TensorSpec:
    return S.TensorSpec(f"ffn_{kind}_exps.bias", ne, "bias", required=False)


SPEC = S.Spec(layer=S.attention(bias=_always, out_bias=_always) + (
    S.TensorSpec("attn_sinks.weight", lambda c: (c.n_head,), "sinks"),
    S.norm("post_attention_norm.weight"),
    *S.moe(gate_up_init="w_oai")[:1],
    S.TensorSpec("ffn_gate_inp.bias", lambda c: (c.n_expert,), "bias", required=False),
    *S.moe(gate_up_init="w_oai")[1:],
    _exps_bias("gate", lambda c: (c.n_ff_exp, c.n_expert)), _exps_bias("up", lambda c: (c.n_ff_exp, c.n_expert)),
    _exps_bias("down", lambda c: (c.n_embd, c.n_expert)),
), globals=S.GLOBALS)


class Layer(transformer.Layer):
    def __init__(self, ckpt: Checkpoint, spec: S.Spec, l: int, device, linear):
        super().__init__(ckpt, spec, l, device, linear)
        self.sinks = to_torch(ckpt.tensor(f"blk.{l}.attn_sinks.weight"), device)
        self.window = ckpt.config.sliding_window if l in ckpt.config.swa_layers else 0


def attend_sinks(q, k, v, start: int, k0: int, sinks, scale: float, window: int, chunk: int = 0) -> torch.Tensor:
    """Causal GQA attention with a sink logit per head and an optional sliding window (or llama4's chunks), as
    ggml's soft_max_ext + add_sinks: q [n, H, d] at positions start.., k/v [T, Hkv, d] holding positions
    k0..k0+T-1 -> [n, H*d]."""
    n, H, d = q.shape
    T, Hkv = k.shape[:2]
    g = H // Hkv
    qg = q.view(n, Hkv, g, d).permute(1, 2, 0, 3).reshape(Hkv, g * n, d)
    # an f16 cache: both products in its type (fp32 accumulation inside), the softmax in float32
    s = torch.bmm(qg.to(k.dtype), k.permute(1, 2, 0)).float().view(Hkv, g, n, T) * scale
    if n > 1 or window or chunk:
        qpos = torch.arange(start, start + n, device=q.device)[:, None]
        kpos = torch.arange(k0, k0 + T, device=q.device)[None, :]
        masked = kpos > qpos
        if window:
            masked |= qpos - kpos >= window
        if chunk:
            masked |= kpos < qpos // chunk * chunk
        s = s.masked_fill(masked, float("-inf"))
    sink = sinks.view(Hkv, g, 1, 1)
    m = torch.maximum(s.amax(-1, keepdim=True), sink)
    e = torch.exp(s - m)
    p = e / (e.sum(-1, keepdim=True) + torch.exp(sink - m))
    out = torch.bmm(p.to(v.dtype).view(Hkv, g * n, T), v.transpose(0, 1)).float()  # [Hkv, g*n, d]
    return out.view(Hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, H * d)


class GptOssTransformer(Transformer):
    """Transformer's forward pass with gpt-oss attention (sinks, sliding window) and routing."""

    LAYER = Layer  # YaRN as llama.cpp derives it (models/rope.py); q.k scaled by 1/sqrt(head_dim)

    def attention(self, l, layer: Layer, h, pos, cache, start: int) -> torch.Tensor:
        c, n = self.config, h.shape[0]
        q = self.rope(layer.q(h).view(n, c.n_head, c.head_dim), pos)
        k = self.rope(layer.k(h).view(n, c.n_head_kv, c.head_dim), pos)
        end = start + n
        cache.k[l, start:end] = k
        cache.v[l, start:end] = layer.v(h).view(n, c.n_head_kv, c.head_dim)
        # a sliding-window layer never needs keys older than the window of its first query
        k0 = max(0, start - layer.window + 1) if layer.window else 0
        out = attend_sinks(q, cache.k[l, k0:end], cache.v[l, k0:end], start, k0, layer.sinks, self.kq_scale,
                           layer.window)
        return layer.o(out)


TRANSFORMER = GptOssTransformer


# ------------------------------------------------------------------------------------------------------ Hugging Face
_L = r"model\.layers\.(\d+)\."
HF_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_L + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (_L + r"post_attention_layernorm\.weight", r"blk.\1.post_attention_norm.weight"),
    (_L + r"self_attn\.([qkv])_proj\.(weight|bias)", r"blk.\1.attn_\2.\3"),
    (_L + r"self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (_L + r"self_attn\.sinks", r"blk.\1.attn_sinks.weight"),
    (_L + r"mlp\.router\.(weight|bias)", r"blk.\1.ffn_gate_inp.\2"),
]  # the fused experts (mlp.experts.*) are read by hf_experts()


def from_hf(cfg: dict) -> ModelConfig:
    try:
        n_layer, n_embd, n_head = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("yarn", "default"):
            raise UnsupportedError(f"gpt-oss: RoPE scaling '{kind}' is not supported (only YaRN)")
        types = cfg.get("layer_types") or ["sliding_attention" if l % 2 == 0 else "full_attention"
                                           for l in range(n_layer)]
        yarn = {}
        if kind == "yarn":
            yarn = dict(rope_scaling="yarn", rope_factor=float(rope["factor"]),
                        yarn_orig_ctx=int(rope["original_max_position_embeddings"]),
                        yarn_beta_fast=float(rope.get("beta_fast", 32.0)),
                        yarn_beta_slow=float(rope.get("beta_slow", 1.0)),
                        yarn_truncate=bool(rope.get("truncate", True)))
        if (cfg.get("swiglu_limit", 7.0), cfg.get("swiglu_alpha", 1.702)) != (7.0, 1.702):
            raise UnsupportedError("gpt-oss: only swiglu_limit 7 and swiglu_alpha 1.702 are supported")
        return ModelConfig(
            arch="gpt-oss", n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=n_layer, n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            n_ctx_train=int(cfg.get("max_position_embeddings", 131072)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(rope.get("rope_theta") or cfg.get("rope_theta") or 150000.0), rope_neox=True,
            n_expert=int(cfg["num_local_experts"]), n_expert_used=int(cfg.get("num_experts_per_tok", 4)),
            n_ff_exp=int(cfg["intermediate_size"]), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            gating="softmax_weight", sliding_window=int(cfg.get("sliding_window") or 0),
            swa_layers=tuple(l for l, t in enumerate(types) if t == "sliding_attention"), attn_sinks=True,
            expert_act="swiglu_oai", **yarn)
    except KeyError as e:
        raise MoecliError(f"config.json lacks {e.args[0]}") from None


def hf_experts(m, c: ModelConfig) -> dict:
    """Expert stacks in ggml's layout from transformers' fused tensors, per layer: gate_up_proj [E, d, 2ff] (gate
    and up interleaved column by column) and down_proj [E, ff, d] (x @ W), or their MXFP4 `_blocks`/`_scales`
    (rows of 32-value blocks). Both are transposed against ggml, so this is a one-time copy of the experts; the
    MXFP4 blocks are repacked to ggml's block_mxfp4 (the bytes stay 4.25 bits per weight)."""
    out = {}
    for l in range(c.n_layer):
        p = f"model.layers.{l}.mlp.experts."
        gate_up, down = _hf_expert_weights(m.tensors, p + "gate_up_proj", c), _hf_expert_weights(m.tensors, p +
                                                                                                  "down_proj", c)
        if gate_up is None or down is None:
            raise MoecliError(f"{m.path.name}: layer {l} lacks {p}gate_up_proj / down_proj (or their MXFP4 blocks)")
        gu_bias, d_bias = _f32_rows(m.tensors.get(p + "gate_up_proj_bias")), _f32_rows(m.tensors.get(p + "down_proj_bias"))
        b = f"blk.{l}."
        for kind, w, bias in (("gate", gate_up[0], None if gu_bias is None else gu_bias[:, 0::2]),
                              ("up", gate_up[1], None if gu_bias is None else gu_bias[:, 1::2]),
                              ("down", down[0], d_bias)):
            bt = None if bias is None else ggml_tensor_of(f"{b}ffn_{kind}_exps.bias", T.F32,
                                                          (bias.shape[1], bias.shape[0]), np.ascontiguousarray(bias))
            out[f"{b}ffn_{kind}_exps"] = ExpertStack(stacked=w, bias=bt)
    return out


def _f32_rows(t: TensorData | None) -> np.ndarray | None:
    return None if t is None else t.numpy().reshape(t.ne[1], t.ne[0]).astype(np.float32)


def _hf_expert_weights(tensors, name: str, c: ModelConfig):
    """(gate, up) for gate_up_proj or (down,) for down_proj as 3-D ggml-layout TensorData, or None if absent."""
    fused = name.endswith("gate_up_proj")
    if name in tensors:  # float: [E, in, out]
        return hf_fused_experts(tensors[name], name, "interleaved" if fused else None)
    blocks, scales = tensors.get(name + "_blocks"), tensors.get(name + "_scales")
    if blocks is None or scales is None:
        return None
    E, n_out, nb, _ = blocks.shape  # [E, out, in/32, 16] nibbles, [E, out, in/32] E8M0 exponents
    q = blocks.raw.reshape(E, n_out, nb, 16)
    e = scales.raw.reshape(E, n_out, nb, 1)
    rows = (slice(0, None, 2), slice(1, None, 2)) if fused else (slice(None),)
    return tuple(ggml_tensor_of(f"{name}[{i}]", T.MXFP4, (nb * 32, q[:, r].shape[1], E),
                                np.concatenate([e[:, r], _mxfp4_qs(q[:, r])], axis=-1)) for i, r in enumerate(rows))


def _mxfp4_qs(q: np.ndarray) -> np.ndarray:
    """OpenAI's MXFP4 packing (byte i = value 2i in the low nibble, 2i+1 in the high one) -> ggml's block_mxfp4
    (byte j = value j low, value j + 16 high)."""
    v = np.empty(q.shape[:-1] + (32,), dtype=np.uint8)
    v[..., 0::2], v[..., 1::2] = q & 0x0F, q >> 4
    return v[..., :16] | (v[..., 16:] << 4)
