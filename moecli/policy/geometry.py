"""Model geometries: the one registry of named real models (REAL_MODELS, read by the cost model and by the
synthetic-model writer), and for the cost model what one routed expert weighs and costs, per quant type.

Figures come from each model's config.json (hidden_size, moe_intermediate_size, num_experts, top-k, shared experts,
dense layers). An expert is three matrices (gate, up: hidden→ffn; down: ffn→hidden), so it holds 3·hidden·ffn
weights and costs 2·3·hidden·ffn FLOPs per token. Bytes follow GGUF block sizes (BITS_PER_WEIGHT).
"""
from __future__ import annotations

from dataclasses import dataclass

from moecli.errors import MoecliError

# GGUF block layouts: bytes per block / weights per block * 8.
BITS_PER_WEIGHT: dict[str, float] = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 34 * 8 / 32,     # 8.5
    "Q6_K": 210 * 8 / 256,   # 6.5625
    "Q5_K": 176 * 8 / 256,   # 5.5
    "Q4_K": 144 * 8 / 256,   # 4.5
    "Q4_0": 18 * 8 / 32,     # 4.5
    "IQ4_XS": 136 * 8 / 256,  # 4.25
    "MXFP4": 17 * 8 / 32,    # 4.25 (gpt-oss native experts)
    "Q3_K": 110 * 8 / 256,   # 3.4375
    "Q2_K": 84 * 8 / 256,    # 2.625
    # llama.cpp's Q4_K_M recipe for expert tensors: gate and up in Q4_K; down in Q6_K for half of the layers
    # (use_more_bits) and Q4_K otherwise -> averaged over an expert: (2*4.5 + (6.5625+4.5)/2) / 3 = 4.84 bits.
    "Q4_K_M": (2 * 4.5 + (6.5625 + 4.5) / 2) / 3,
}


@dataclass(frozen=True)
class ModelGeometry:
    name: str
    n_layers: int            # MoE layers (dense layers excluded)
    hidden: int
    expert_ffn: int          # routed expert intermediate size
    n_experts: int           # routed experts per layer
    top_k: int
    n_shared: int = 0        # shared experts (always run, on the device)
    shared_ffn: int = 0      # intermediate size of ONE shared expert
    attn_params: int = 0     # attention + router parameters per layer (on the device)
    head_params: int = 0     # output head (once per token, on the device)
    default_quant: str = "Q4_K"

    def bits(self, quant: str | None = None) -> float:
        q = (quant or self.default_quant).upper()
        if q not in BITS_PER_WEIGHT:
            raise MoecliError(f"unknown quant type {quant!r} (known: {', '.join(BITS_PER_WEIGHT)})")
        return BITS_PER_WEIGHT[q]

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.expert_ffn

    def expert_bytes(self, quant: str | None = None) -> int:
        return int(self.expert_params * self.bits(quant) / 8)

    @property
    def expert_flops_per_token(self) -> float:
        return 2.0 * self.expert_params

    @property
    def dense_params_per_layer(self) -> int:
        """Parameters that run on the device every layer: attention, router, shared experts."""
        return self.attn_params + self.n_shared * 3 * self.hidden * self.shared_ffn

    def total_expert_bytes(self, quant: str | None = None) -> int:
        return self.n_layers * self.n_experts * self.expert_bytes(quant)


def _attn(hidden: int, heads: int, kv_heads: int, head_dim: int, n_experts: int) -> int:
    # q, o: hidden x heads*head_dim; k, v: hidden x kv_heads*head_dim; router: hidden x n_experts.
    return hidden * head_dim * (2 * heads + 2 * kv_heads) + hidden * n_experts


def _hybrid_attn(hidden: int, heads: int, kv_heads: int, head_dim: int, n_experts: int, k_heads: int, v_heads: int,
                 d: int, interval: int, conv: int = 4) -> int:
    """Mixer + router parameters per layer, averaged over qwen3next / qwen35moe's 1 gated-attention layer (q twice
    as wide: its gate) per `interval` layers, the others Gated DeltaNet (q/k/v + z + b/a projections, the conv,
    ssm_out)."""
    attn = _attn(hidden, heads, kv_heads, head_dim, n_experts) + hidden * heads * head_dim
    qkv = (2 * k_heads + v_heads) * d
    delta = hidden * (qkv + v_heads * d + 2 * v_heads) + conv * qkv + v_heads * d * hidden + hidden * n_experts
    return (attn + (interval - 1) * delta) // interval


@dataclass(frozen=True)
class RealModel:
    """A named real model: its GGUF architecture and its config in the synthetic writer's terms (moecli.synth's
    SynthDims fields: n_layer counts every layer, n_ff is the routed expert's FFN, n_ff_shexp the shared experts'
    total width; per-family fields beside them), read by the cost model (`geometry`) and by moecli.synth
    (synthetic models of these shapes). Plain data: policy/ imports nothing of ours."""
    name: str
    arch: str
    dims: dict
    attn_params: int = 0  # attention + router parameters per layer; 0: from the heads (not MLA)
    default_quant: str = "Q4_K"

    @property
    def geometry(self) -> ModelGeometry:
        d = self.dims
        n_shared = d.get("n_shared", 1 if d.get("n_ff_shexp") else 0)
        attn = self.attn_params or _attn(d["n_embd"], d["n_head"], d["n_head_kv"], d["head_dim"], d["n_expert"])
        step = dict(d.get("extra", ())).get("moe_step", 1)  # llama4: every step-th layer is MoE
        return ModelGeometry(self.name, (d["n_layer"] - d.get("n_dense", 0)) // step, d["n_embd"], d["n_ff"],
                             d["n_expert"],
                             d["n_expert_used"], n_shared=n_shared,
                             shared_ffn=d.get("n_ff_shexp", d["n_ff"] * n_shared) // max(n_shared, 1),
                             attn_params=attn, head_params=d["n_vocab"] * d["n_embd"],
                             default_quant=self.default_quant)


def _m(name: str, arch: str, attn_params: int = 0, default_quant: str = "Q4_K", **dims) -> RealModel:
    return RealModel(name, arch, dims, attn_params, default_quant)


REAL_MODELS: dict[str, RealModel] = {
    r.name: r
    for r in [
        # Mixtral-8x7B: 32 layers, 4096 hidden, 14336 ffn, 8 experts top-2, GQA 32/8 heads of 128.
        _m("mixtral-8x7b", "llama", n_vocab=32000, n_embd=4096, n_layer=32, n_head=32, n_head_kv=8, head_dim=128,
           n_ff=14336, n_expert=8, n_expert_used=2, context_length=32768, rope_theta=1e6, rms_eps=1e-5),
        # Qwen2-57B-A14B: 28 layers, 3584 hidden, 64 experts (2560) top-8, one shared expert of 20480.
        _m("qwen2-57b-a14b", "qwen2moe", n_vocab=151936, n_embd=3584, n_layer=28, n_head=28, n_head_kv=4,
           head_dim=128, n_ff=2560, n_expert=64, n_expert_used=8, n_ff_shexp=20480, context_length=32768,
           rope_theta=1e6, rms_eps=1e-6, attn_bias=True),
        # DeepSeek-V2-Lite: 27 layers (the first dense); 2048 hidden, 64 experts (1408) top-6, 2 shared; MLA
        # without q LoRA ≈ 16 heads; q 2048x3072, kv_a 2048x576, kv_b 512x4096, o 2048x2048 ≈ 13.8 M; YaRN x40.
        _m("deepseek-v2-lite", "deepseek2", attn_params=13_800_000 + 2048 * 64, n_vocab=102400, n_embd=2048,
           n_layer=27, n_head=16, n_head_kv=16, head_dim=192, n_ff=1408, n_expert=64, n_expert_used=6,
           context_length=163840, rope_theta=10000.0, rms_eps=1e-6, q_lora_rank=0, kv_lora_rank=512, qk_nope=128,
           qk_rope=64, v_head_dim=128, n_dense=1, n_ff_dense=10944, n_shared=2, weights_scale=1.0, mla_split=True,
           yarn_factor=40.0, yarn_orig_ctx=4096, yarn_mscale_all_dim=0.707),
        # Qwen3-30B-A3B: 48 layers, 2048 hidden, 128 experts (768) top-8, no shared; 32/4 heads of 128.
        _m("qwen3-30b-a3b", "qwen3moe", n_vocab=151936, n_embd=2048, n_layer=48, n_head=32, n_head_kv=4,
           head_dim=128, n_ff=768, n_expert=128, n_expert_used=8, context_length=40960, rope_theta=1e6,
           rms_eps=1e-6),
        # Qwen1.5-MoE-A2.7B (the qwen trace): 24 layers, 2048 hidden, 60 experts (1408) top-4, shared 5632.
        _m("qwen1.5-moe-a2.7b", "qwen2moe", n_vocab=151936, n_embd=2048, n_layer=24, n_head=16, n_head_kv=16,
           head_dim=128, n_ff=1408, n_expert=60, n_expert_used=4, n_ff_shexp=5632, context_length=8192,
           rope_theta=1e6, rms_eps=1e-6, attn_bias=True),
        # OLMoE-1B-7B: 16 layers, 2048 hidden, 64 experts (1024) top-8, 16 heads of 128 (MHA).
        _m("olmoe-1b-7b", "olmoe", n_vocab=50304, n_embd=2048, n_layer=16, n_head=16, n_head_kv=16, head_dim=128,
           n_ff=1024, n_expert=64, n_expert_used=8, context_length=4096, rope_theta=1e4, rms_eps=1e-5),
        # gpt-oss: experts natively MXFP4; 2880 hidden and ffn; 64/8 heads of 64, window 128, YaRN x32 from 4096.
        _m("gpt-oss-20b", "gpt-oss", default_quant="MXFP4", n_vocab=201088, n_embd=2880, n_layer=24, n_head=64,
           n_head_kv=8, head_dim=64, n_ff=2880, n_expert=32, n_expert_used=4, context_length=131072,
           rope_theta=150000.0, rms_eps=1e-5, sliding_window=128, yarn_factor=32.0, yarn_orig_ctx=4096),
        _m("gpt-oss-120b", "gpt-oss", default_quant="MXFP4", n_vocab=201088, n_embd=2880, n_layer=36, n_head=64,
           n_head_kv=8, head_dim=64, n_ff=2880, n_expert=128, n_expert_used=4, context_length=131072,
           rope_theta=150000.0, rms_eps=1e-5, sliding_window=128, yarn_factor=32.0, yarn_orig_ctx=4096),
        # GLM-4.5-Air: 46 layers (the first dense) + 1 NextN; 4096 hidden, 128 experts (1408) top-8 + 1 shared,
        # 96/8 heads of 128 with q/k/v biases, rope on half of each head; dense FFN 10944.
        _m("glm-4.5-air", "glm4moe", n_vocab=151552, n_embd=4096, n_layer=46, n_head=96, n_head_kv=8,
           head_dim=128, n_ff=1408, n_expert=128, n_expert_used=8, n_ff_shexp=1408, n_dense=1, n_ff_dense=10944,
           context_length=131072, rope_theta=1e6, rms_eps=1e-5, attn_bias=True, extra=(("rope_dim", 64),)),
        # SmallThinker-21B-A3B: 52 layers, 2560 hidden, 64 experts (768, ReGLU) top-6 softmax, no shared; 28/4 heads
        # of 128; every fourth layer full attention without RoPE, the others a 4096-key sliding window.
        _m("smallthinker-21b", "smallthinker", n_vocab=151936, n_embd=2560, n_layer=52, n_head=28, n_head_kv=4,
           head_dim=128, n_ff=768, n_expert=64, n_expert_used=6, context_length=16384, rope_theta=1.5e6,
           rms_eps=1e-6, extra=(("gating", "softmax"), ("swa", True))),
        # SmallThinker-4B-A0.6B: 32 layers, 1536 hidden, 32 experts (768) top-4 sigmoid; 12/2 heads of 128, no SWA.
        _m("smallthinker-4b", "smallthinker", n_vocab=151936, n_embd=1536, n_layer=32, n_head=12, n_head_kv=2,
           head_dim=128, n_ff=768, n_expert=32, n_expert_used=4, context_length=32768, rope_theta=1e6, rms_eps=1e-6,
           extra=(("gating", "sigmoid"), ("swa", False))),
        # DeepSeek-V3 / R1: 61 layers (3 dense); 7168 hidden, 256 experts (2048) top-8 in 8 groups (4 used),
        # 1 shared, sigmoid + selection bias; MLA with q LoRA ≈ 187 M attention parameters per layer.
        _m("deepseek-v3", "deepseek2", attn_params=187_000_000, n_vocab=129280, n_embd=7168, n_layer=61,
           n_head=128, n_head_kv=128, head_dim=192, n_ff=2048, n_expert=256, n_expert_used=8, context_length=163840,
           rope_theta=10000.0, rms_eps=1e-6, q_lora_rank=1536, kv_lora_rank=512, qk_nope=128, qk_rope=64,
           v_head_dim=128, n_dense=3, n_ff_dense=18432, n_shared=1, gating="sigmoid", expert_bias=True, n_group=8,
           topk_group=4, weights_norm=True, weights_scale=2.5, mla_split=True, yarn_factor=40.0,
           yarn_orig_ctx=4096, yarn_mscale_all_dim=1.0),
        # Llama 4 Scout 17B-16E (meta-llama/Llama-4-Scout-17B-16E-Instruct config.json text_config): 48 layers,
        # 5120 hidden, 16 experts (8192) top-1 + 1 shared (8192), every layer MoE; 40/8 heads of 128; dense FFN
        # (intermediate_size_mlp) 16384; rope_theta 5e5 with llama3 factors (rope_freqs); context 10M.
        _m("llama4-scout", "llama4", n_vocab=202048, n_embd=5120, n_layer=48, n_head=40, n_head_kv=8, head_dim=128,
           n_ff=8192, n_expert=16, n_expert_used=1, n_ff_shexp=8192, n_ff_dense=16384, context_length=10485760,
           rope_theta=5e5, rms_eps=1e-5, extra=(("moe_step", 1), ("rope_freqs", True))),
        # Llama 4 Maverick 17B-128E (meta-llama/Llama-4-Maverick-17B-128E-Instruct): as Scout but 128 experts on
        # every second layer (interleave_moe_layer_step 2: 24 MoE + 24 dense), no q/k norm; context 1M.
        _m("llama4-maverick", "llama4", n_vocab=202048, n_embd=5120, n_layer=48, n_head=40, n_head_kv=8,
           head_dim=128, n_ff=8192, n_expert=128, n_expert_used=1, n_ff_shexp=8192, n_ff_dense=16384,
           context_length=1048576, rope_theta=5e5, rms_eps=1e-5, extra=(("moe_step", 2),)),
        # MiniMax-M2 230B-A10B (MiniMaxAI/MiniMax-M2 config.json): 62 layers, 3072 hidden, 256 experts (1536) top-8,
        # sigmoid + routing bias, no shared; 48/8 heads of 128, q/k norm over the projections, rotary_dim 64.
        _m("minimax-m2", "minimax-m2", n_vocab=200064, n_embd=3072, n_layer=62, n_head=48, n_head_kv=8,
           head_dim=128, n_ff=1536, n_expert=256, n_expert_used=8, context_length=196608, rope_theta=5e6,
           rms_eps=1e-6, extra=(("rope_dim", 64),)),
        # Qwen3.6-35B-A3B (Qwen/Qwen3.6-35B-A3B config.json, same as Qwen3.5-35B-A3B's text model): 40 layers, 2048
        # hidden, 256 experts (512) top-8 + 1 shared (512, sigmoid gate); every 4th layer gated attention, 16/2 heads of
        # 256, partial_rotary 0.25 (64 dims), mrope_section [11, 11, 10], rope_theta 1e7; the others Gated DeltaNet:
        # 16 k heads / 32 v heads of 128, conv kernel 4; vocab 248320, context 262144.
        _m("qwen3.6-35b-a3b", "qwen35moe", attn_params=_hybrid_attn(2048, 16, 2, 256, 256, 16, 32, 128, 4),
           n_vocab=248320, n_embd=2048, n_layer=40, n_head=16, n_head_kv=2, head_dim=256, n_ff=512, n_expert=256,
           n_expert_used=8, n_ff_shexp=512, context_length=262144, rope_theta=1e7, rms_eps=1e-6,
           extra=(("interval", 4), ("rope_dim", 64), ("rope_sections", (11, 11, 10, 0)), ("ssm_state", 128),
                  ("ssm_groups", 16), ("ssm_heads", 32))),
        # Qwen3.5-122B-A10B (Qwen/Qwen3.5-122B-A10B config.json, as remembered: check against the card): 48 layers,
        # 3072 hidden, 256 experts (1024) top-8 + 1 shared (1024); attention every 4th layer, 32/2 heads of 256;
        # DeltaNet 16 k heads / 64 v heads of 128; rope as the 35B; vocab 248320, context 262144.
        _m("qwen3.5-122b-a10b", "qwen35moe", attn_params=_hybrid_attn(3072, 32, 2, 256, 256, 16, 64, 128, 4),
           n_vocab=248320, n_embd=3072, n_layer=48, n_head=32, n_head_kv=2, head_dim=256, n_ff=1024, n_expert=256,
           n_expert_used=8, n_ff_shexp=1024, context_length=262144, rope_theta=1e7, rms_eps=1e-6,
           extra=(("interval", 4), ("rope_dim", 64), ("rope_sections", (11, 11, 10, 0)), ("ssm_state", 128),
                  ("ssm_groups", 16), ("ssm_heads", 64))),
        # Qwen3-Next-80B-A3B (Qwen/Qwen3-Next-80B-A3B-Instruct config.json): 48 layers, 2048 hidden, 512 experts
        # (512) top-10 + 1 shared (512); every 4th layer gated attention, 16/2 heads of 256, partial_rotary 0.25,
        # rope_theta 1e7; DeltaNet 16 k heads / 32 v heads of 128, conv 4; vocab 151936, context 262144.
        _m("qwen3-next-80b-a3b", "qwen3next", attn_params=_hybrid_attn(2048, 16, 2, 256, 512, 16, 32, 128, 4),
           n_vocab=151936, n_embd=2048, n_layer=48, n_head=16, n_head_kv=2, head_dim=256, n_ff=512, n_expert=512,
           n_expert_used=10, n_ff_shexp=512, context_length=262144, rope_theta=1e7, rms_eps=1e-6,
           extra=(("interval", 4), ("rope_dim", 64), ("ssm_state", 128), ("ssm_groups", 16), ("ssm_heads", 32))),
    ]
}

GEOMETRIES: dict[str, ModelGeometry] = {name: r.geometry for name, r in REAL_MODELS.items()}


def get_geometry(name: str) -> ModelGeometry:
    key = name.lower()
    if key not in GEOMETRIES:
        raise MoecliError(f"unknown model geometry {name!r} (known: {', '.join(GEOMETRIES)})")
    return GEOMETRIES[key]
