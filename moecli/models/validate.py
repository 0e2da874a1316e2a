"""The validation pass between parsing and building: a model file is untrusted input.

Every number that later reaches ggml, llama.cpp, an index or a loop bound is checked here, before the loader's
per-layer loops and before the families read the metadata:
  1. types: each metadata / config.json key the families read has a declared kind (`GGUF_KEYS`, `HF_KEYS`);
  2. the vocabulary (GGUF): token list, its parallel arrays, special ids and byte coverage against the embedding;
  3. ranges: the typed config (`ModelConfig`) against itself and against the layers the file has tensors for.
The tensor shapes against the config are checked by the loader's `validate` afterwards (per family). Each failure
is one MoecliError naming the field and its value. Per-architecture needs are data (the tables below), so a family's
layer spec can feed them.
"""
from __future__ import annotations

import math
import re

from moecli.errors import MoecliError, UnsupportedError

INT, FLOAT, BOOL, STR = "int", "float", "bool", "str"
INTS, FLOATS, STRS = "array of int", "array of float", "array of str"

# `{arch}.<key>` metadata the families read -> the kinds accepted (a per-layer array where one is allowed).
GGUF_KEYS = {
    "context_length": (INT,), "embedding_length": (INT,), "block_count": (INT,), "feed_forward_length": (INT,),
    "attention.head_count": (INT,), "attention.head_count_kv": (INT, INTS), "attention.key_length": (INT,),
    "attention.value_length": (INT,), "attention.key_length_mla": (INT,), "attention.value_length_mla": (INT,),
    "attention.layer_norm_rms_epsilon": (FLOAT, INT), "attention.q_lora_rank": (INT,),
    "attention.kv_lora_rank": (INT,), "attention.sliding_window": (INT,), "attention.sliding_window_pattern": (INT,),
    "attention.temperature_scale": (FLOAT, INT),
    "rope.freq_base": (FLOAT, INT), "rope.freq_base_swa": (FLOAT, INT), "rope.dimension_count": (INT,),
    "rope.scaling.type": (STR,), "rope.scaling.factor": (FLOAT, INT), "rope.scaling.attn_factor": (FLOAT, INT),
    "rope.scaling.original_context_length": (INT,), "rope.scaling.yarn_log_multiplier": (FLOAT, INT),
    "rope.scaling.yarn_beta_fast": (FLOAT, INT), "rope.scaling.yarn_beta_slow": (FLOAT, INT),
    "rope.scaling.yarn_ext_factor": (FLOAT, INT), "rope.scaling.yarn_attn_factor": (FLOAT, INT),
    "expert_count": (INT,), "expert_used_count": (INT,), "expert_feed_forward_length": (INT,),
    "expert_shared_feed_forward_length": (INT,), "expert_shared_count": (INT,), "leading_dense_block_count": (INT,),
    "expert_weights_scale": (FLOAT, INT), "expert_weights_norm": (BOOL,), "expert_gating_func": (INT,),
    "expert_group_count": (INT,), "expert_group_used_count": (INT,),
}
# Keys outside the architecture's namespace.
GGUF_GLOBAL_KEYS = {
    "general.architecture": (STR,), "general.alignment": (INT,), "tokenizer.ggml.model": (STR,),
    "tokenizer.ggml.pre": (STR,), "tokenizer.ggml.tokens": (STRS,), "tokenizer.ggml.token_type": (INTS,),
    "tokenizer.ggml.scores": (FLOATS,), "tokenizer.ggml.merges": (STRS,), "tokenizer.chat_template": (STR,),
    "tokenizer.ggml.add_bos_token": (BOOL,), "tokenizer.ggml.add_eos_token": (BOOL,),
    **{f"tokenizer.ggml.{t}_token_id": (INT,) for t in ("bos", "eos", "unknown", "seperator", "padding", "cls",
                                                          "mask", "eot", "eom")},
}
TOKENIZER_MODELS = ("gpt2", "llama")  # BPE and SentencePiece: what the supported architectures ship

# config.json keys the families read -> accepted JSON types (None: null allowed).
_N = type(None)
HF_KEYS = {
    **{k: (int,) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
                           "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts",
                           "num_experts_per_tok", "n_routed_experts", "kv_lora_rank", "qk_nope_head_dim",
                           "qk_rope_head_dim", "v_head_dim", "decoder_sparse_step", "linear_conv_kernel_dim",
                           "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
                           "linear_num_value_heads")},
    **{k: (int, _N) for k in ("num_key_value_heads", "head_dim", "max_position_embeddings", "n_group", "topk_group",
                              "shared_expert_intermediate_size", "sliding_window", "q_lora_rank", "n_shared_experts",
                              "first_k_dense_replace", "full_attention_interval")},
    **{k: (float, int) for k in ("rms_norm_eps", "routed_scaling_factor", "swiglu_limit", "swiglu_alpha")},
    "partial_rotary_factor": (float, int, _N), "text_config": (dict, _N), "attn_output_gate": (bool,),
    "rope_theta": (float, int, _N), "rope_parameters": (dict, _N), "rope_scaling": (dict, _N),
    **{k: (bool,) for k in ("tie_word_embeddings", "norm_topk_prob", "qkv_bias", "rope_interleave")},
    "model_type": (str,), "topk_method": (str, _N), "architectures": (list, _N), "mlp_only_layers": (list, _N),
    "layer_types": (list, _N), "bos_token_id": (int, list, _N), "eos_token_id": (int, list, _N),
    # llama4 (attn_temperature_tuning: Meta's configs write 4 for true)
    **{k: (int,) for k in ("intermediate_size_mlp", "interleave_moe_layer_step", "no_rope_layer_interval",
                           "floor_scale")},
    "attention_chunk_size": (int, _N), "attn_scale": (float, int), "use_qk_norm": (bool,), "attention_bias": (bool,),
    "attn_temperature_tuning": (bool, int), "no_rope_layers": (list, _N), "moe_layers": (list, _N),
}
_JSON_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string", dict: "an object",
               list: "an array", _N: "null"}


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ GGUF metadata

def gguf_metadata(g) -> None:
    """Types of every key the families read, the embedding, and the vocabulary against it (GGUFFile `g`)."""
    name = g.path.name
    for key, kinds in GGUF_GLOBAL_KEYS.items():
        _check_kind(g, key, kinds, name)
    arch = g.arch
    for key, kinds in GGUF_KEYS.items():
        _check_kind(g, f"{arch}.{key}", kinds, name)
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise MoecliError(f"{name}: model file lacks tensor token_embd.weight")
    if len(embd.ne) != 2:
        raise MoecliError(f"{name}: tensor token_embd.weight has shape {list(embd.ne)}, expected 2 dimensions")
    gguf_vocab(g, embd.ne[1])


def _check_kind(g, key: str, kinds: tuple[str, ...], name: str) -> None:
    kind = g.kind(key)
    if kind is not None and kind not in kinds:
        what = f"an {kind} ({g.array_len(key)} values)" if kind.startswith("array") else f"{kind} {_short(g.get(key))}"
        raise MoecliError(f"{name}: metadata {key} is {what}, expected {' or '.join(kinds)}")


def gguf_vocab(g, n_rows: int) -> None:
    """The token list, its parallel arrays and the special ids against `n_rows` embedding rows.

    llama.cpp turns an id or a byte missing from the vocabulary into a C++ exception that aborts the process, so
    what it will index is checked here: every id we pass is below len(tokens) <= n_rows, and every byte a
    SentencePiece text can fall back to has its `<0xXX>` token (gpt2's byte-level BPE skips a missing byte)."""
    name = g.path.name
    model = g.get("tokenizer.ggml.model")
    if model is None:
        return  # no vocabulary: llama.cpp's tokenizer refuses the file on its own, with a clean error
    if model not in TOKENIZER_MODELS:
        raise UnsupportedError(f"{name}: tokenizer.ggml.model {_short(model)} is not supported "
                               f"({', '.join(TOKENIZER_MODELS)})")
    if g.kind("tokenizer.ggml.tokens") is None:
        raise MoecliError(f"{name}: metadata lacks tokenizer.ggml.tokens")
    n = g.array_len("tokenizer.ggml.tokens")
    if not 0 < n <= n_rows:
        raise MoecliError(f"{name}: tokenizer.ggml.tokens has {n} tokens, the embedding {n_rows} rows "
                          "(a vocabulary needs 1 token at least and at most one per row)")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        if g.kind(key) is not None and g.array_len(key) != n:
            raise MoecliError(f"{name}: {key} has {g.array_len(key)} entries for {n} tokens")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        tid = g.get(key)
        if tid is not None and not 0 <= tid < n:
            raise MoecliError(f"{name}: {key} = {tid} is outside the vocabulary of {n} tokens")
    if model == "llama":  # SentencePiece falls back to byte tokens with std::map::at: each must be there
        tokens = set(g.get("tokenizer.ggml.tokens"))
        missing = [b for b in range(256) if f"<0x{b:02X}>" not in tokens and not (b < 128 and chr(b) in tokens)]
        if missing:
            raise MoecliError(f"{name}: the llama (SentencePiece) vocabulary has no token for byte 0x{missing[0]:02X}"
                              f" ({len(missing)} of 256 bytes missing): tokenizer.ggml.model does not match the tokens?")


# ------------------------------------------------------------------------------------------------ config.json

def hf_config(cfg, name: str = "config.json") -> None:
    """Types of every config.json key the families read."""
    if not isinstance(cfg, dict):
        raise MoecliError(f"{name}: must be a JSON object, not {type(cfg).__name__}")
    for key, types in HF_KEYS.items():
        if key not in cfg:
            continue
        value = cfg[key]
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise MoecliError(f"{name}: {key} is {_short(value)}, expected "
                              f"{' or '.join(_JSON_NAMES[t] for t in types)}")
    for key in ("rope_parameters", "rope_scaling"):
        for sub, v in (cfg.get(key) or {}).items():
            if sub in ("rope_theta", "factor") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise MoecliError(f"{name}: {key}.{sub} is {_short(v)}, expected a number")


# ------------------------------------------------------------------------------------------------ ranges

# ModelConfig field -> (GGUF key, config.json key): how errors name a field.
FIELD_KEYS = {
    "n_vocab": ("token_embd.weight rows", "vocab_size"), "n_embd": ("embedding_length", "hidden_size"),
    "n_layer": ("block_count", "num_hidden_layers"), "n_head": ("attention.head_count", "num_attention_heads"),
    "n_head_kv": ("attention.head_count_kv", "num_key_value_heads"), "head_dim": ("attention.key_length", "head_dim"),
    "n_ctx_train": ("context_length", "max_position_embeddings"),
    "rms_eps": ("attention.layer_norm_rms_epsilon", "rms_norm_eps"), "rope_theta": ("rope.freq_base", "rope_theta"),
    "rope_dim": ("rope.dimension_count", "qk_rope_head_dim"), "n_ff": ("feed_forward_length", "intermediate_size"),
    "n_expert": ("expert_count", "num_experts"), "n_expert_used": ("expert_used_count", "num_experts_per_tok"),
    "n_ff_exp": ("expert_feed_forward_length", "moe_intermediate_size"),
    "n_ff_shexp": ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    "kv_lora_rank": ("attention.kv_lora_rank", "kv_lora_rank"), "qk_rope_dim": ("rope.dimension_count",
                                                                                  "qk_rope_head_dim"),
    "n_dense_layers": ("leading_dense_block_count", "first_k_dense_replace"),
    "n_group": ("expert_group_count", "n_group"), "topk_group": ("expert_group_used_count", "topk_group"),
    "rope_factor": ("rope.scaling.factor", "rope_scaling.factor"),
    "yarn_orig_ctx": ("rope.scaling.original_context_length", "rope_scaling.original_max_position_embeddings"),
    "sliding_window": ("attention.sliding_window", "sliding_window"),
}
MAX_DIM = 1 << 20  # no real model has a width, head count or vocabulary row count beyond this
LAYER = re.compile(r"^(?:blk|(?:language_model\.)?model\.layers|model\.language_model\.layers)\.(\d+)\.")  # llama4, Qwen3.5


def layers_present(names) -> int:
    """How many layers the tensor names cover (highest `blk.N.` / `model.layers.N.` index + 1)."""
    top = -1
    for n in names:
        m = LAYER.match(n)
        if m:
            top = max(top, int(m[1]))
    return top + 1


def config(c, n_layers_present: int, where: str, hf: bool = False) -> None:
    """The typed config against itself and the file's layers: what ggml asserts on, divides by or loops over."""

    def bad(field: str, problem: str):
        key = FIELD_KEYS.get(field, (field, field))[hf]
        raise MoecliError(f"{where}: {key} = {_short(getattr(c, field))} {problem}")

    if c.n_layer > n_layers_present:
        bad("n_layer", f"but the file has tensors for {n_layers_present} layers")
    for f in ("n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ctx_train"):
        if not 1 <= getattr(c, f) <= (1 << 31 if f == "n_ctx_train" else MAX_DIM):
            bad(f, "is out of range")
    if c.n_head % c.n_head_kv:
        bad("n_head", f"is not a multiple of the {c.n_head_kv} KV heads")
    if not (math.isfinite(c.rms_eps) and 0 < c.rms_eps < 1):
        bad("rms_eps", "must be a finite number in (0, 1)")
    if not (math.isfinite(c.rope_theta) and c.rope_theta > 0):
        bad("rope_theta", "must be a finite positive number")
    rope_field = "qk_rope_dim" if c.arch == "deepseek2" else "rope_dim"
    if not (0 < c.rope_dim <= c.head_dim and c.rope_dim % 2 == 0):
        bad(rope_field, f"must be even and within the head dimension {c.head_dim}")
    if c.n_expert or c.n_expert_used:
        if not 1 <= c.n_expert <= MAX_DIM:
            bad("n_expert", "is out of range")
        if not 1 <= c.n_expert_used <= c.n_expert:
            bad("n_expert_used", f"must be between 1 and the {c.n_expert} experts")
        if not 1 <= c.n_ff_exp <= MAX_DIM:
            bad("n_ff_exp", "is out of range")
    elif not 1 <= c.n_ff <= MAX_DIM:
        bad("n_ff", "is out of range")
    for f in ("n_ff_shexp", "kv_lora_rank", "q_lora_rank", "n_shared", "n_group", "topk_group", "sliding_window"):
        if not 0 <= getattr(c, f) <= MAX_DIM:
            bad(f, "is out of range")
    if not 0 <= c.n_dense_layers <= c.n_layer:
        bad("n_dense_layers", f"must be between 0 and the {c.n_layer} layers")
    for f in ("rope_factor", "routed_scale", "yarn_log_mul", "yarn_beta_fast", "yarn_beta_slow", "yarn_ext_factor",
              "yarn_attn_factor"):
        if not math.isfinite(getattr(c, f)):
            bad(f, "must be finite")
    if c.rope_scaling and not (c.rope_factor > 0 and 1 <= c.yarn_orig_ctx <= 1 << 31):
        bad("rope_factor" if c.rope_factor <= 0 else "yarn_orig_ctx", "is out of range for YaRN")
