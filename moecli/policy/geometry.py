"""Model geometries for the cost model: what one routed expert weighs and costs, per quant type.

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


GEOMETRIES: dict[str, ModelGeometry] = {
    g.name: g
    for g in [
        # Mixtral-8x7B: 32 layers, 4096 hidden, 14336 ffn, 8 experts top-2, GQA 32/8 heads of 128.
        ModelGeometry("mixtral-8x7b", 32, 4096, 14336, 8, 2, attn_params=_attn(4096, 32, 8, 128, 8),
                      head_params=32000 * 4096),
        # Qwen2-57B-A14B: 28 layers, 3584 hidden, 64 experts (2560) top-8, one shared expert of 20480.
        ModelGeometry("qwen2-57b-a14b", 28, 3584, 2560, 64, 8, n_shared=1, shared_ffn=20480,
                      attn_params=_attn(3584, 28, 4, 128, 64), head_params=151936 * 3584),
        # DeepSeek-V2-Lite: 27 layers, the first dense -> 26 MoE; 2048 hidden, 64 experts (1408) top-6, 2 shared.
        # MLA attention ≈ 16 heads; q 2048x3072, kv_a 2048x576, kv_b 512x4096, o 2048x2048 ≈ 13.8 M.
        ModelGeometry("deepseek-v2-lite", 26, 2048, 1408, 64, 6, n_shared=2, shared_ffn=1408,
                      attn_params=13_800_000 + 2048 * 64, head_params=102400 * 2048),
        # Qwen3-30B-A3B: 48 layers, 2048 hidden, 128 experts (768) top-8, no shared; 32/4 heads of 128.
        ModelGeometry("qwen3-30b-a3b", 48, 2048, 768, 128, 8, attn_params=_attn(2048, 32, 4, 128, 128),
                      head_params=151936 * 2048),
        # Qwen1.5-MoE-A2.7B (the qwen trace): 24 layers, 2048 hidden, 60 experts (1408) top-4, shared 5632.
        ModelGeometry("qwen1.5-moe-a2.7b", 24, 2048, 1408, 60, 4, n_shared=1, shared_ffn=5632,
                      attn_params=_attn(2048, 16, 16, 128, 60), head_params=151936 * 2048),
        # gpt-oss: experts natively MXFP4; 2880 hidden and ffn; 64/8 heads of 64.
        ModelGeometry("gpt-oss-20b", 24, 2880, 2880, 32, 4, attn_params=_attn(2880, 64, 8, 64, 32),
                      head_params=201088 * 2880, default_quant="MXFP4"),
        ModelGeometry("gpt-oss-120b", 36, 2880, 2880, 128, 4, attn_params=_attn(2880, 64, 8, 64, 128),
                      head_params=201088 * 2880, default_quant="MXFP4"),
        # DeepSeek-V3: 61 layers, first 3 dense -> 58 MoE; 7168 hidden, 256 experts (2048) top-8, 1 shared.
        # MLA ≈ 187 M attention parameters per layer.
        ModelGeometry("deepseek-v3", 58, 7168, 2048, 256, 8, n_shared=1, shared_ffn=2048,
                      attn_params=187_000_000, head_params=129280 * 7168),
    ]
}


def get_geometry(name: str) -> ModelGeometry:
    key = name.lower()
    if key not in GEOMETRIES:
        raise MoecliError(f"unknown model geometry {name!r} (known: {', '.join(GEOMETRIES)})")
    return GEOMETRIES[key]
