"""Placement plan for one model on this host: what goes on the GPU, how many expert slots per layer fit, threads,
the closest llama.cpp flags, and the decode speed the cost model expects.

Memory on the device (what `HybridExperts` allocates):
- dense weights (attention, router, shared experts, norms, output head) as the file stores them: `TorchLinear`
  keeps GGUF bytes on the device for the Triton kernels; token embeddings stay on the host (rows fetched on use);
- the KV cache for `ctx` tokens: f16 on an accelerator (`layers.kv_dtype`, llama.cpp's default), float32 for
  DeepSeek's MLA cache (`MLACache`);
- expert slots: `DeviceExpertCache` keeps (slots + 1) quantized experts per MoE layer (the +1 is the scratch slot
  for one-off uses), plus one expert dequantized at a time;
- a safety margin for the CUDA context, allocator fragmentation and activations.

llama.cpp comparison: its dense weights stay quantized and its KV cache is F16, so for the same free VRAM it has a
different expert budget; `--n-cpu-moe N` keeps the experts of layers 0..N-1 on the CPU (whole layers), which is what
`-ot "blk\\.(0|...|N-1)\\.ffn_(up|down|gate)_exps=CPU"` says too.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from moecli.errors import MoecliError
from moecli.policy.geometry import ModelGeometry

GB = 1e9
MARGIN_MIN = 512 << 20      # bytes: CUDA context leftovers, cuBLAS workspace, activations of a prefill chunk
MARGIN_FRACTION = 0.05      # of total VRAM: allocator fragmentation grows with the pool
EXECUTOR_BYTES = 4          # one expert dequantized for a one-off use (the transient workspace) is float32
DEVICE_KV_BYTES = 2         # f16 KV cache on accelerators (layers.kv_dtype)
MLA_KV_BYTES = 4            # DeepSeek's MLACache stays float32
LLAMA_KV_BYTES = 2          # llama.cpp's default F16 KV cache

# KV elements per token per layer (K and V together) for the geometry table, which has no attention shapes:
# 2 · kv_heads · head_dim from each config.json; MLA models cache one latent (kv_lora 512 + rope 64) per layer.
KV_PER_TOKEN_LAYER = {
    "mixtral-8x7b": (32, 2 * 8 * 128),
    "qwen2-57b-a14b": (28, 2 * 4 * 128),
    "qwen3-30b-a3b": (48, 2 * 4 * 128),
    "qwen1.5-moe-a2.7b": (24, 2 * 16 * 128),
    "gpt-oss-20b": (24, 2 * 8 * 64),
    "gpt-oss-120b": (36, 2 * 8 * 64),
    "deepseek-v2-lite": (27, 576),
    "deepseek-v3": (61, 576),
}
MLA_GEOMETRIES = {"deepseek-v2-lite", "deepseek-v3"}


@dataclass
class ModelFacts:
    """What placement needs to know about a model, from a checkpoint or from a known geometry."""

    name: str
    moe_layers: list[int]          # layer indices that have routed experts
    n_expert: int
    top_k: int
    expert_bytes: int              # one expert, gate + up + down, quantized (a device slot)
    expert_dequant_bytes: int      # one expert dequantized at the executor's dtype (transient)
    dense_params: int              # weights that live on the device (not routed experts, not token embeddings)
    dense_file_bytes: int          # the same weights as stored (quantized): what llama.cpp puts on the GPU
    kv_elems_per_token: int        # K + V elements per token, all layers
    quant: str = ""
    geometry: ModelGeometry | None = None
    kv_device_bytes: int = DEVICE_KV_BYTES  # bytes per KV element in the executor's device cache

    @classmethod
    def from_checkpoint(cls, ckpt, name: str, geometry: ModelGeometry | None = None, quant: str = "") -> "ModelFacts":
        c = ckpt.config
        layers = [l for l in range(c.n_layer) if f"blk.{l}.ffn_gate_exps" in ckpt.experts]
        if not layers:
            raise MoecliError(f"{name}: no MoE layers (a dense model needs no expert placement)")
        l0 = layers[0]
        parts = [ckpt.experts[f"blk.{l0}.ffn_{p}_exps"].expert(0) for p in ("gate", "up", "down")]
        dense_params = dense_bytes = 0
        tied = "output.weight" not in ckpt.tensors
        for tname, t in ckpt.tensors.items():
            if "_exps" in tname or (tname.startswith("token_embd") and not tied):
                continue  # routed experts live on the host; embeddings too unless the head reuses them
            dense_params += t.n_elements
            dense_bytes += t.nbytes
        return cls(name, layers, c.n_expert, c.n_expert_used, sum(p.nbytes for p in parts),
                   sum(p.n_elements for p in parts) * EXECUTOR_BYTES, dense_params, dense_bytes,
                   _kv_elems_per_token(c), quant, geometry,
                   MLA_KV_BYTES if c.kv_lora_rank else DEVICE_KV_BYTES)

    @classmethod
    def from_geometry(cls, g: ModelGeometry, quant: str | None = None) -> "ModelFacts":
        q = (quant or g.default_quant).upper()
        n_layer, kv = KV_PER_TOKEN_LAYER.get(g.name, (g.n_layers, 0))
        dense = g.n_layers * g.dense_params_per_layer + g.head_params
        return cls(g.name, list(range(n_layer - g.n_layers, n_layer)), g.n_experts, g.top_k, g.expert_bytes(q),
                   g.expert_params * EXECUTOR_BYTES, dense, int(dense * 4.5 / 8), n_layer * kv, q, g,
                   MLA_KV_BYTES if g.name in MLA_GEOMETRIES else DEVICE_KV_BYTES)


def _kv_elems_per_token(c) -> int:
    """K + V elements one token takes over all layers, in the family's cache layout (MLA's latent or decompressed
    heads included)."""
    from moecli.models.loader import GGUF_ARCHS

    kv_heads, k_dims, v_dims = GGUF_ARCHS[c.arch].kv_shape(c)
    return c.n_layer * kv_heads * (k_dims + v_dims)


@dataclass
class Plan:
    model: str
    device: str                     # "cuda:0 (NAME)" or "cpu"
    ctx: int
    threads: int
    vram_free: int = 0
    vram_total: int = 0
    dense_bytes: int = 0            # on the device, as stored
    kv_bytes: int = 0
    margin_bytes: int = 0
    expert_budget: int = 0          # bytes left for expert slots
    slots_per_layer: int = 0
    n_expert: int = 0
    n_moe_layers: int = 0
    on_device: list[str] = field(default_factory=list)
    on_cpu: list[str] = field(default_factory=list)
    fits: bool = True               # the dense part and KV cache fit the device at all
    llama_n_cpu_moe: int = 0        # llama.cpp --n-cpu-moe N (layers 0..N-1 keep experts on the CPU)
    llama_flags: str = ""
    llama_ot: str = ""
    decode_tok_s: float | None = None
    decode_note: str = ""

    @property
    def device_expert_share(self) -> float:
        return self.slots_per_layer / self.n_expert if self.n_expert else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["device_expert_share"] = self.device_expert_share
        return d


def margin(vram_total: int) -> int:
    return max(MARGIN_MIN, int(MARGIN_FRACTION * vram_total))


def slot_bytes(facts: ModelFacts, slots: int, slot_layers: int | None = None) -> int:
    """Device expert storage (`DeviceExpertCache`): (slots + 1 scratch) quantized experts per layer that has slots
    (every MoE layer, or the device layers of a layer split), nothing without slots."""
    n = len(facts.moe_layers) if slot_layers is None else slot_layers
    return n * (slots + 1) * facts.expert_bytes if slots and n else 0


def device_bytes(facts: ModelFacts, ctx: int, slots: int, vram_total: int, slot_layers: int | None = None) -> dict:
    """Everything the executor puts on the device, by part: dense weights, KV for `ctx` tokens, expert slots, and
    the workspace (one expert dequantized at a time + the margin for the CUDA context, allocator, activations)."""
    d = {"dense": facts.dense_file_bytes, "kv": facts.kv_elems_per_token * ctx * facts.kv_device_bytes,
         "slots": slot_bytes(facts, slots, slot_layers),
         "workspace": margin(vram_total) + facts.expert_dequant_bytes}
    d["total"] = sum(d.values())
    return d


def placement_device_bytes(facts: ModelFacts, placement: str, slots: int, ctx: int, vram_total: int) -> dict:
    """`device_bytes` for a named placement: a layer split holds whole layers (all experts of its device layers),
    every other placement `slots` per MoE layer."""
    from moecli.policy.core import cpu_layer_count
    from moecli.policy.placement import get_placement

    p = get_placement(placement)
    L = len(facts.moe_layers)
    if p.mode == "layer-split":
        return device_bytes(facts, ctx, facts.n_expert, vram_total, L - cpu_layer_count(p, L, slots, facts.n_expert))
    return device_bytes(facts, ctx, min(slots, facts.n_expert), vram_total)


def check_fits(facts: ModelFacts, placement: str, slots: int, ctx: int, vram_free: int, vram_total: int,
               device: str = "the GPU") -> dict:
    """The placement's device bytes, or one clear error (before anything is loaded) when they exceed the free
    memory."""
    d = placement_device_bytes(facts, placement, slots, ctx, vram_total)
    if d["total"] > vram_free:
        parts = ", ".join(f"{k} {d[k] / GB:.2f}" for k in ("dense", "kv", "slots", "workspace"))
        raise MoecliError(f"placement {placement} with {slots} expert slots and {ctx} tokens of context needs "
                          f"{d['total'] / GB:.2f} GB on {device} ({parts} GB) but {vram_free / GB:.2f} GB is free: "
                          "use fewer --expert-slots, a larger --n-cpu-moe or a smaller --ctx")
    return d


def expert_slots(facts: ModelFacts, vram_free: int, vram_total: int, ctx: int) -> tuple[int, int, int, int, int]:
    """(slots per layer, expert budget, dense bytes, KV bytes, margin) for the executor on a device with `vram_free`
    bytes free. Storage is n_layers · (slots + 1) · expert_bytes, so slots = budget // (n_layers · bytes) - 1."""
    fixed = device_bytes(facts, ctx, 0, vram_total)
    dense, kv, m = fixed["dense"], fixed["kv"], fixed["workspace"]
    budget = vram_free - dense - kv - m
    per_slot_all_layers = len(facts.moe_layers) * facts.expert_bytes
    slots = budget // per_slot_all_layers - 1 if budget > 0 and per_slot_all_layers else 0
    return int(min(max(slots, 0), facts.n_expert)), int(budget), dense, kv, m


def llama_cpp_flags(facts: ModelFacts, vram_free: int | None, vram_total: int, ctx: int) -> tuple[int, str, str]:
    """(N, flags, -ot) for llama.cpp with the same free VRAM: whole layers of experts on the GPU while they fit
    after its quantized dense weights and F16 KV cache; the first N MoE layers' experts stay on the CPU."""
    L = len(facts.moe_layers)
    if not vram_free:  # nothing to offload: -ngl, --cpu-moe and -ot would only say "the CPU" again
        return L, "no GPU: llama.cpp's CPU-only defaults, nothing to offload", ""
    budget = vram_free - facts.dense_file_bytes - facts.kv_elems_per_token * ctx * LLAMA_KV_BYTES - margin(vram_total)
    gpu_layers = min(max(budget // (facts.n_expert * facts.expert_bytes), 0), L) if budget > 0 else 0
    n_cpu = L - int(gpu_layers)
    if n_cpu == 0:
        return 0, "-ngl 999  (every expert fits on the GPU: no --n-cpu-moe needed)", ""
    cpu_layers = facts.moe_layers[:n_cpu]
    N = cpu_layers[-1] + 1  # llama.cpp counts layer indices, dense layers included
    if n_cpu == L:
        return N, "-ngl 999 --cpu-moe", r'-ot "\.ffn_(up|down|gate)_exps=CPU"'
    ot = r'-ot "blk\.(' + "|".join(map(str, cpu_layers)) + r')\.ffn_(up|down|gate)_exps=CPU"'
    return N, f"-ngl 999 --n-cpu-moe {N}", ot


def decode_estimate(costs, facts: ModelFacts, slots: int, gpu: bool) -> tuple[float, str]:
    """Tokens per second in decode from the cost model: per MoE layer, the device runs the dense part and the
    cached share of the top-k experts while the CPU runs the rest (HybriMoE overlaps them); hit rate = slots / E
    (uniform routing, no prefetch: a floor, MRS caching does better)."""
    k = facts.top_k
    hit = slots / facts.n_expert if facts.n_expert else 0.0
    k_dev, k_cpu = k * hit, k * (1 - hit)
    cpu = (costs.cpu_first + k_cpu * costs.cpu(1)) if k_cpu > 1e-9 else 0.0
    dev = k_dev * costs.dev(1)
    layer = costs.dense(1) + (max(cpu, dev) if gpu else cpu + dev)
    ms = len(facts.moe_layers) * layer + costs.head_ms
    note = (f"hit rate {hit:.0%} (slots/experts, uniform routing), CPU {cpu:.2f} ms + device {dev:.2f} ms per layer"
            if gpu else f"CPU only: {cpu:.2f} ms experts + {costs.dense(1):.2f} ms dense per layer")
    return (1000.0 / ms if ms > 0 else 0.0), note


def make_plan(facts: ModelFacts, gpu, ctx: int, threads: int, costs=None) -> Plan:
    """`gpu`: a probe.GpuInfo or None. `costs`: a CostModel for the decode estimate (None: no estimate)."""
    if ctx <= 0:
        raise MoecliError(f"--ctx must be positive, got {ctx}")
    L = len(facts.moe_layers)
    p = Plan(facts.name, "cpu", ctx, threads, n_expert=facts.n_expert, n_moe_layers=L)
    if gpu is None:
        p.on_cpu = ["everything: no GPU (dense weights, KV cache and all routed experts run through ggml)"]
        p.fits = False
    else:
        p.device = f"cuda:{gpu.index} ({gpu.name})"
        p.vram_free, p.vram_total = gpu.free_bytes, gpu.total_bytes
        p.slots_per_layer, p.expert_budget, p.dense_bytes, p.kv_bytes, p.margin_bytes = expert_slots(
            facts, gpu.free_bytes, gpu.total_bytes, ctx)
        p.fits = p.expert_budget >= 0
        if p.fits:
            p.on_device = [f"dense weights (attention, router, shared experts, head): {p.dense_bytes / GB:.2f} GB",
                           f"KV cache for {ctx} tokens: {p.kv_bytes / GB:.2f} GB",
                           f"{p.slots_per_layer} of {facts.n_expert} experts per layer x {L} layers "
                           f"({p.slots_per_layer * L * facts.expert_bytes / GB:.2f} GB, quantized)"]
            p.on_cpu = [f"{facts.n_expert - p.slots_per_layer} experts per layer (host RAM, ggml)"]
        else:
            p.on_cpu = [f"everything: the dense weights and KV cache need {(p.dense_bytes + p.kv_bytes) / GB:.2f} GB "
                        f"but {gpu.free_bytes / GB:.2f} GB is free (try a smaller --ctx)"]
            p.slots_per_layer = 0
    p.llama_n_cpu_moe, p.llama_flags, p.llama_ot = llama_cpp_flags(
        facts, gpu.free_bytes if gpu else None, gpu.total_bytes if gpu else 0, ctx)
    if costs is not None:
        p.decode_tok_s, p.decode_note = decode_estimate(costs, facts, p.slots_per_layer, gpu is not None and p.fits)
    return p
