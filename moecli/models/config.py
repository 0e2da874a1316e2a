"""The typed configuration every architecture is read into, and the checkpoint's tensors under canonical names.

Canonical names are GGUF's (`blk.N.attn_q.weight`...): safetensors checkpoints are renamed once at load, the way
mlx-lm's `sanitize()` does, so the forward pass knows one naming only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moecli.errors import MoecliError
from moecli.formats.tensor import TensorData


OAI_ALPHA, OAI_LIMIT = 1.702, 7.0  # gpt-oss's clamped SwiGLU (llama.cpp: LLM_FFN_SWIGLU_OAI_MOE)


@dataclass
class ModelConfig:
    arch: str  # family name: llama, qwen2moe, qwen3moe, olmoe, deepseek2, gpt-oss
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rms_eps: float
    rope_theta: float
    rope_neox: bool  # NEOX (rotate halves) vs NORM (rotate adjacent pairs) layout
    rope_dim: int = 0  # rotary dimensions per head (0: all of head_dim)
    n_ff: int = 0  # dense FFN width (dense models)
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # routed expert FFN width
    n_ff_shexp: int = 0  # shared expert FFN width (qwen2moe)
    norm_topk: bool = False  # renormalise the top-k routing weights to sum to 1
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (qwen2moe)
    qk_norm: str | None = None  # "head": RMSNorm per head (qwen3moe); "full": over the whole projection (olmoe,
    #                             minimax-m2); "l2": weightless, per head, after RoPE on the RoPE layers (llama4)
    attn_bias: bool = False  # q/k/v biases (qwen2moe)
    tie_embeddings: bool = False
    # deepseek2 (DeepSeek-V2/V2-Lite/V3): MLA attention, leading dense layers, shared experts, grouped routing
    q_lora_rank: int = 0  # 0: plain attn_q (V2-Lite)
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    mla_split: bool = False  # attn_k_b/attn_v_b (newer GGUFs) instead of attn_kv_b
    n_dense_layers: int = 0  # leading dense FFN layers
    n_nextn_layers: int = 0  # trailing multi-token-prediction layers the file holds beyond n_layer (skipped)
    n_shared: int = 0  # shared experts (their FFN width is n_ff_shexp)
    routed_scale: float = 0.0  # expert_weights_scale (0 or 1: no scaling, as llama.cpp)
    gating: str = "softmax"  # "softmax" | "sigmoid" | "softmax_weight" (top-k of the logits, softmax over those)
    expert_bias: bool = False  # exp_probs_b: selection-only bias (V3)
    n_group: int = 0
    topk_group: int = 0
    group_score: str = "top2"  # how a group of experts is scored: its two best (V3, llama.cpp) or its best ("max")
    rope_scaling: str | None = None  # "yarn"
    rope_factor: float = 1.0
    yarn_orig_ctx: int = 0
    yarn_log_mul: float = 0.0  # mscale_all_dim (GGUF value / 0.1, as llama.cpp)
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_ext_factor: float = -1.0  # -1: 1.0 when YaRN
    yarn_attn_factor: float = 1.0
    yarn_truncate: bool = True  # round the correction range to whole dims (llama.cpp; transformers' gpt-oss: no)
    # gpt-oss: attention sinks, sliding-window layers, expert biases and the clamped SwiGLU
    sliding_window: int = 0  # keys a sliding-window layer sees (its own position included)
    swa_layers: tuple = ()  # layer indices that use the sliding window
    attn_sinks: bool = False  # a learned per-head logit in every softmax denominator
    expert_act: str = "swiglu"  # "swiglu" | "swiglu_oai" (x = min(g, 7); x * sigmoid(1.702 x) * (clamp(u, ±7) + 1))
    #                             | "reglu" (relu(g) * u: SmallThinker)
    nope_layers: tuple = ()  # layer indices whose q/k are not rotated (SmallThinker's full-attention layers)
    router_input: str = "ffn"  # what the router reads: the FFN input, or "layer": the layer input (SmallThinker)
    shexp_gate: str = "silu_div"  # the shared expert's gate as llama.cpp writes it: silu(g) / g, or "sigmoid"
    # qwen3next / qwen35moe: Gated DeltaNet layers (recurrent state in place of KV) between gated attention layers
    recurrent_layers: tuple = ()  # layer indices of the DeltaNet layers (no KV cache)
    ssm_conv: int = 0  # short causal convolution's kernel size (ssm.conv_kernel)
    ssm_state: int = 0  # head dim of q/k/v (ssm.state_size)
    ssm_groups: int = 0  # q/k heads (ssm.group_count)
    ssm_heads: int = 0  # v heads (ssm.time_step_rank)
    rope_sections: tuple = ()  # IMRoPE sections (qwen35moe; text positions use the first three)
    # llama4: interleaved MoE layers, chunked attention, temperature tuning on NoPE layers, rope_freqs factors
    moe_step: int = 1  # layer l is MoE when (l + 1) % moe_step == 0 (interleave_moe_layer_step)
    attn_chunk: int = 0  # chunked attention on swa_layers: a query sees the keys of its own chunk only
    attn_temp_scale: float = 0.0  # NoPE layers' q times log(floor((pos + 1) / attn_temp_floor) + 1) * scale + 1
    attn_temp_floor: int = 0
    rope_factors: tuple = ()  # rope_freqs.weight: each rotated pair's angle divided by its factor
    select_logits: bool = False  # experts picked by the raw router logits (llama4), weights still from the scores
    weight_input: bool = False  # the routing weight scales each expert's INPUT, not its output (llama4)

    def __post_init__(self):
        if not self.rope_dim:
            self.rope_dim = self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0


class ExpertStack:
    """One projection (gate, up or down) of all routed experts of a layer.

    GGUF stores a 3-D tensor (`stacked`); safetensors one 2-D tensor per expert. Both give `expert(e)` zero-copy.
    `bias` (gpt-oss): one bias row per expert, ggml ne = (out, E).
    """

    def __init__(self, stacked: TensorData | None = None, experts: list[TensorData] | None = None,
                 bias: TensorData | None = None):
        self.stacked = stacked
        self._experts = experts
        self.n = stacked.ne[2] if stacked is not None else len(experts)
        self.bias = bias

    def bias_rows(self):
        """The biases as float32 numpy [E, out], or None."""
        return None if self.bias is None else self.bias.numpy().reshape(self.n, -1)

    def expert(self, e: int) -> TensorData:
        return self.stacked.expert(e) if self.stacked is not None else self._experts[e]

    @property
    def type(self):
        return self.expert(0).type

    @property
    def ne(self) -> tuple[int, int]:
        """(ne0, ne1) of one expert's matrix: (in, out)."""
        return self.expert(0).ne[:2]


@dataclass
class Checkpoint:
    """What a model file gave us: config, tensors by canonical name, expert stacks, tokenizer source."""

    config: ModelConfig
    tensors: dict[str, TensorData]
    experts: dict[str, ExpertStack] = field(default_factory=dict)  # "blk.N.ffn_gate_exps" -> stack
    file_bytes: int = 0
    source: object = None  # the GGUFFile or SafetensorsModel, for tokenizer and chat template

    def tensor(self, name: str) -> TensorData:
        t = self.tensors.get(name)
        if t is None:
            raise MoecliError(f"model file lacks tensor {name}")
        return t

    def optional(self, name: str) -> TensorData | None:
        return self.tensors.get(name)

    def check_shape(self, name: str, *ne: int, optional: bool = False) -> None:
        """Refuse a tensor whose shape disagrees with the config (ggml order), with the tensor's name."""
        t = self.tensors.get(name)
        if t is None:
            if optional:
                return
            raise MoecliError(f"model file lacks tensor {name}")
        if _squeeze(t.ne) != _squeeze(ne):  # ggml pads shapes with 1s: {n} is {n, 1}
            raise MoecliError(f"tensor {name} has shape {list(t.ne)}, expected {list(ne)} from the model config")


def _squeeze(ne) -> tuple:
    ne = tuple(int(n) for n in ne)
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne
