"""llama4: Llama 4 Scout (17B-16E) / Maverick (17B-128E) (GGUF "llama4"), as llama.cpp computes them.

Dense and MoE layers interleaved (layer l is MoE when (l + 1) % interleave_moe_layer_step == 0); an MoE layer has
one shared expert of the routed experts' width and top-k SIGMOID routing where the experts are picked by the raw
logits and the weight scales each expert's INPUT (not its output), never renormalised. Attention in groups of four
layers: three chunked-attention layers (a query sees the keys of its own 8192-token chunk) with NORM RoPE (times the
rope_freqs factors when the file has them) and weightless L2 q/k norms after it (not on the 128-expert Maverick), then
one full-attention layer without RoPE whose queries get llama.cpp's temperature tuning. Chunk size, temperature
floor and scale are llama.cpp's fixed values, whatever the file says.
"""
import numpy as np
import torch

from moecli.errors import UnsupportedError
from moecli.kernels import ggml as G
from moecli.models import spec as S
from moecli.models.common import gguf_common, gguf_metadata, synth_common
from moecli.models.gpt_oss import attend_sinks
from moecli.models.layers import attend, rms_norm
from moecli.models.rope import attn_temperature
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
