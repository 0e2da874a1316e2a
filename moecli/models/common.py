"""What the architectures share: GGUF/HF config keys and Hugging Face -> GGUF tensor names."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

from moecli.errors import MoecliError, UnsupportedError
from moecli.formats.gguf import GGUFFile
from moecli.formats.tensor import TensorData
from moecli.models.config import ModelConfig

_L = r"model\.layers\.(\d+)\."
ATTN_NAMES = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (_L + r"input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (_L + r"post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (_L + r"self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (_L + r"self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (_L + r"self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (_L + r"self_attn\.o_proj\.weight", r"blk.\1.attn_output.weight"),
    (_L + r"self_attn\.q_norm\.weight", r"blk.\1.attn_q_norm.weight"),
    (_L + r"self_attn\.k_norm\.weight", r"blk.\1.attn_k_norm.weight"),
]
DENSE_NAMES = [
    (_L + r"mlp\.gate_proj\.weight", r"blk.\1.ffn_gate.weight"),
    (_L + r"mlp\.up_proj\.weight", r"blk.\1.ffn_up.weight"),
    (_L + r"mlp\.down_proj\.weight", r"blk.\1.ffn_down.weight"),
]
# Routed experts become "blk.N.ffn_X_exps.E": the loader stacks them per layer (zero-copy, one view per expert).
EXPERT_NAMES = [
    (_L + r"mlp\.gate\.weight", r"blk.\1.ffn_gate_inp.weight"),
    (_L + r"mlp\.experts\.(\d+)\.gate_proj\.weight", r"blk.\1.ffn_gate_exps.\2"),
    (_L + r"mlp\.experts\.(\d+)\.up_proj\.weight", r"blk.\1.ffn_up_exps.\2"),
    (_L + r"mlp\.experts\.(\d+)\.down_proj\.weight", r"blk.\1.ffn_down_exps.\2"),
]


def gguf_common(g: GGUFFile, **fields) -> ModelConfig:
    """The keys every GGUF architecture shares (FACTS §2); families pass what differs."""
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise MoecliError(f"{g.path.name}: model file lacks tensor token_embd.weight")
    n_embd = int(g.require("embedding_length"))
    n_head = int(g.require("attention.head_count"))
    n_head_kv = g.arch_get("attention.head_count_kv", n_head)
    if isinstance(n_head_kv, list):
        raise UnsupportedError(f"{g.path.name}: per-layer KV head counts are not supported")
    head_dim = int(g.arch_get("attention.key_length") or g.arch_get("rope.dimension_count") or n_embd // n_head)
    base = dict(
        arch=g.arch, n_vocab=int(embd.ne[1]), n_embd=n_embd, n_layer=int(g.require("block_count")),
        n_head=n_head, n_head_kv=int(n_head_kv), head_dim=head_dim,
        n_ctx_train=int(g.arch_get("context_length", 4096)),
        rms_eps=float(g.arch_get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(g.arch_get("rope.freq_base", 10000.0)),
        rope_neox=True, rope_dim=int(g.arch_get("rope.dimension_count", 0) or 0),
        n_expert=int(g.arch_get("expert_count", 0) or 0), n_expert_used=int(g.arch_get("expert_used_count", 0) or 0),
        tie_embeddings="output.weight" not in g.tensors,
    )
    if g.arch_get("rope.scaling.type") not in (None, "none") or g.arch_get("rope.scaling.factor") not in (None, 1.0):
        raise UnsupportedError(f"{g.path.name}: RoPE scaling is not supported yet")
    base.update(fields)
    return ModelConfig(**base)


def hf_common(cfg: dict, arch: str, **fields) -> ModelConfig:
    """The config.json keys every Hugging Face architecture shares; families pass what differs."""
    try:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedError(f"RoPE scaling '{rope.get('rope_type', rope.get('type'))}' is not supported yet")
        base = dict(
            arch=arch, n_vocab=int(cfg["vocab_size"]), n_embd=n_embd, n_layer=int(cfg["num_hidden_layers"]),
            n_head=n_head, n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            n_ctx_train=int(cfg.get("max_position_embeddings", 4096)),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_neox=True,  # HF checkpoints rotate halves; the GGUF converter permutes llama's Q/K instead
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise MoecliError(f"config.json lacks {e.args[0]}") from None
    base.update(fields)
    return ModelConfig(**base)


def synth_common(d, arch: str, **fields) -> ModelConfig:
    """A synthetic model's dims (moecli.synth.SynthDims) as the config its file will load into; families pass
    what differs."""
    base = dict(arch=arch, n_vocab=d.n_vocab, n_embd=d.n_embd, n_layer=d.n_layer, n_head=d.n_head,
                n_head_kv=d.n_head_kv, head_dim=d.head_dim, n_ctx_train=d.context_length, rms_eps=d.rms_eps,
                rope_theta=d.rope_theta, rope_neox=True, n_expert=d.n_expert, n_expert_used=d.n_expert_used,
                n_ff_exp=d.n_ff if d.n_expert else 0, n_ff=0 if d.n_expert else d.n_ff)
    base.update(fields)
    return ModelConfig(**base)


def moe_only(d, arch: str) -> None:
    if not d.n_expert:
        raise ValueError(f"{arch} needs n_expert > 0")


def gguf_metadata(c: ModelConfig, **fields) -> dict:
    """The GGUF keys (under `<arch>.`) every architecture writes, as gguf_common reads them; families add theirs.
    ints are written as uint32, floats as float32."""
    m = {"context_length": c.n_ctx_train, "embedding_length": c.n_embd, "block_count": c.n_layer,
         "attention.head_count": c.n_head, "attention.head_count_kv": c.n_head_kv,
         "attention.key_length": c.head_dim, "attention.value_length": c.head_dim,
         "attention.layer_norm_rms_epsilon": c.rms_eps, "rope.freq_base": c.rope_theta,
         "rope.dimension_count": c.rope_dim}
    if c.n_expert:
        m.update({"expert_count": c.n_expert, "expert_used_count": c.n_expert_used})
    m.update(fields)
    return m


FLOAT_ELEMENTS = {T.F32: np.float32, T.F16: np.uint16, T.BF16: np.uint16}  # bf16/f16 moved as 16-bit patterns


def ggml_tensor_of(name: str, ggml_type, ne, arr: np.ndarray) -> TensorData:
    """A TensorData over `arr`'s bytes (ggml order `ne`), for tensors built in memory."""
    return TensorData(name, ggml_type, tuple(int(n) for n in ne), arr.reshape(-1).view(np.uint8))


def hf_fused_experts(t: TensorData, name: str, split: str | None) -> tuple[TensorData, ...]:
    """transformers' fused float experts [E, in, out] (applied as x @ W) as 3-D ggml-layout TensorData (a row of
    `in` per output). Transposed against ggml, so this is a one-time copy of the experts. `split`: how gate_up_proj
    holds its two halves of the outputs, "interleaved" (gpt-oss: gate, up, gate, ... column by column) or "halves"
    (llama4: every gate column, then every up column) -> (gate, up); None (down_proj) -> (down,)."""
    if t.type not in FLOAT_ELEMENTS or len(t.shape) != 3:
        raise UnsupportedError(f"{name}: {t.type.name} {list(t.shape)} fused experts are not supported (float "
                               "[experts, in, out] only)")
    E, n_in, n_out = t.shape
    a = t.raw.view(FLOAT_ELEMENTS[t.type]).reshape(E, n_in, n_out)
    if split == "interleaved":
        cols = (a[:, :, 0::2], a[:, :, 1::2])
    elif split == "halves":
        cols = (a[:, :, :n_out // 2], a[:, :, n_out // 2:])
    else:
        cols = (a,)
    return tuple(ggml_tensor_of(f"{name}[{i}]", t.type, (n_in, w.shape[2], E),
                                np.ascontiguousarray(w.transpose(0, 2, 1))) for i, w in enumerate(cols))
