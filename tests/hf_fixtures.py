"""Tiny random Hugging Face checkpoints (transformers is a test-only dependency), saved as safetensors.

Archs (same names as conftest): "llama-dense", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2-lite",
"deepseek3"; sizes from a `SynthDims` (`DeepSeekDims` for the deepseek ones). Weights are re-initialised like
moecli.synth (N(0, 1/fan_in), norms ≈ 1, decisive router) instead of transformers' std-0.02 init, so routing is
not a near-tie everywhere.

Routing semantics, made explicit in each config, versus llama.cpp's GGUF archs (FACTS §2):
- mixtral: HF always renormalises the top-k weights; llama.cpp (llama arch) too.
- qwen3moe: HF renormalises only if `norm_topk_prob` (set True here, as Qwen3-30B-A3B ships); llama.cpp
  ALWAYS renormalises and ignores the flag — a qwen3moe checkpoint with norm_topk_prob=False differs.
- qwen2moe: `norm_topk_prob=False` (Qwen2-57B-A14B); llama.cpp never renormalises and ignores the flag.
  Shared expert output × sigmoid(shared_expert_gate·x) in both. `qkv_bias=True` (HF's default) — the GGUF
  side's `attn_bias` should match when converting.
- olmoe: `norm_topk_prob=False` (OLMoE-1B-7B); llama.cpp never renormalises. q/k RMSNorm over the full
  width (not per head) in both; llama.cpp supports only num_key_value_heads == num_attention_heads.
- deepseek2-lite (`deepseek_v2`, V2-Lite-like): plain q_proj, kv_b_proj (llama.cpp's legacy attn_kv_b), softmax
  routing (`greedy`), never renormalised (transformers ignores norm_topk_prob for V2), 2 shared experts, 1 leading
  dense layer, YaRN x8 with mscale = mscale_all_dim = 0.707. RoPE on adjacent pairs, as llama.cpp's NORM.
- deepseek3 (`deepseek_v3`, V3-like): q LoRA, sigmoid + e_score_correction_bias (choice only; nonzero here), 4
  groups of 4 scored by their two best (2 kept), top-4 renormalised, x2.5, 1 shared expert, rope_interleave (pairs).
  transformers' V3 always routes so (scoring_func / topk_method ignored).
- llama4 (Llama4ForConditionalGeneration with a 1-layer vision tower: Meta's layout, text model under
  language_model., text_config) / llama4-text (Llama4ForCausalLM, llama4_text): every (moe_step)-th layer MoE
  with a shared expert, top-k by the raw router logits, sigmoid weight on the expert input (as llama.cpp); RoPE on
  adjacent pairs (llama.cpp's converter does not permute) with llama3 factors (original 64 positions: all three
  bands over head_dim 64); L2 q/k norms after RoPE; chunks of LLAMA4_CHUNK tokens on the RoPE layers, the NoPE
  layer (every 4th) full attention with temperature tuning from floor_scale 4 (llama.cpp fixes 8192 and 8192).
- qwen3next (`qwen3_next`, Qwen3-Next-80B-A3B-like) / qwen35moe (`qwen3_5_moe`: the multimodal wrapper users
  download, a one-block vision tower beside the text model under model.language_model.): the tiny GGUF's dims
  (conftest), layer_types from its full_attention_interval, partial rotary from its rope_dim, norm_topk_prob True
  (Qwen3.5 always renormalises). Zero-centred norms (1 + w) come out ≈ 2 here: the GGUF side's 1 + w is tested.
- llama-dense / mixtral: HF stores Q/K in the "half-split" (NEOX-like) order; GGUF's llama arch expects the
  HF converter's permuted order (NORM rope). A converter must permute.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moecli.synth import CHATML_TEMPLATE, SynthDims, tiny_tokenizer

LLAMA4_CHUNK = 16  # llama4's attention chunk: shorter than the test prompts, so chunks start mid-prompt

HF_ARCHS = ("llama-dense", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2-lite", "deepseek3", "glm4moe",
            "minimax-m2", "llama4", "llama4-text", "qwen3next", "qwen35moe")


def hf_config(arch: str, d: SynthDims, **overrides):
    """transformers config for `arch` with the sizes of `d` (bos = eos = <|endoftext|> = id 0); `overrides` are
    constructor arguments that replace the derived ones (deepseek archs)."""
    import transformers as T

    if arch.startswith("deepseek"):
        return _deepseek_config(arch, d, **overrides)

    common = dict(vocab_size=d.n_vocab, hidden_size=d.n_embd, num_hidden_layers=d.n_layer,
                  num_attention_heads=d.n_head, num_key_value_heads=d.n_head_kv, rms_norm_eps=d.rms_eps,
                  max_position_embeddings=d.context_length, tie_word_embeddings=d.tie_embeddings,
                  rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta},
                  bos_token_id=0, eos_token_id=0, pad_token_id=0)
    moe = dict(num_experts_per_tok=d.n_expert_used)
    if arch == "llama-dense":
        return T.LlamaConfig(intermediate_size=d.n_ff, head_dim=d.head_dim, **common)
    if arch == "mixtral":
        return T.MixtralConfig(intermediate_size=d.n_ff, head_dim=d.head_dim, num_local_experts=d.n_expert,
                               **moe, **common)
    if arch == "qwen2moe":
        assert d.head_dim * d.n_head == d.n_embd, "qwen2moe has no head_dim option"
        return T.Qwen2MoeConfig(moe_intermediate_size=d.n_ff, shared_expert_intermediate_size=d.n_ff_shexp,
                                intermediate_size=d.n_ff_shexp, num_experts=d.n_expert, norm_topk_prob=False,
                                decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, **moe, **common)
    if arch == "qwen3moe":
        cfg = T.Qwen3MoeConfig(moe_intermediate_size=d.n_ff, intermediate_size=d.n_ff, num_experts=d.n_expert,
                               norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **moe, **common)
        cfg.head_dim = d.head_dim  # read with getattr() by the model; not a constructor argument in 5.x
        return cfg
    if arch == "glm4moe":  # GLM-4.5-Air-like: attention biases, partial rotary, sigmoid + bias, 1 shared expert
        extra = dict(d.extra)
        return T.Glm4MoeConfig(intermediate_size=d.n_ff_dense, moe_intermediate_size=d.n_ff, head_dim=d.head_dim,
                               n_routed_experts=d.n_expert, n_shared_experts=d.n_ff_shexp // d.n_ff,
                               first_k_dense_replace=d.n_dense, n_group=1, topk_group=1, norm_topk_prob=True,
                               routed_scaling_factor=1.0, attention_bias=True, use_qk_norm=False,
                               num_nextn_predict_layers=0, **moe, **{**common, "rope_parameters": {
                                   **common["rope_parameters"],
                                   "partial_rotary_factor": extra.get("rope_dim", d.head_dim) / d.head_dim}})
    if arch == "minimax-m2":  # q/k norms over the projections, partial rotary, sigmoid + bias, renormalised
        extra = dict(d.extra)
        return T.MiniMaxM2Config(intermediate_size=d.n_ff, head_dim=d.head_dim, num_local_experts=d.n_expert, **moe,
                                 **{**common, "rope_parameters": {
                                     **common["rope_parameters"],
                                     "partial_rotary_factor": extra.get("rope_dim", d.head_dim) / d.head_dim}})
    if arch in ("llama4", "llama4-text"):
        text = T.Llama4TextConfig(
            intermediate_size=d.n_ff, intermediate_size_mlp=d.n_ff_dense, head_dim=d.head_dim,
            num_local_experts=d.n_expert, interleave_moe_layer_step=dict(d.extra).get("moe_step", 1),
            attention_chunk_size=LLAMA4_CHUNK, floor_scale=4, attn_scale=0.1, use_qk_norm=True, **moe,
            **{**common, "rope_parameters": {"rope_type": "llama3", "rope_theta": d.rope_theta, "factor": 8.0,
                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                             "original_max_position_embeddings": 64}})
        if arch == "llama4-text":
            return text
        return T.Llama4Config(text_config=text, tie_word_embeddings=d.tie_embeddings, vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32))
    if arch in ("qwen3next", "qwen35moe"):
        return _qwen3next_config(arch, d, common, moe)
    if arch == "olmoe":
        assert d.n_head_kv == d.n_head, "llama.cpp's olmoe supports only MHA"
        return T.OlmoeConfig(intermediate_size=d.n_ff, num_experts=d.n_expert, norm_topk_prob=False, **moe,
                             **common)
    raise ValueError(f"arch must be one of {HF_ARCHS}, got {arch!r}")


def _qwen3next_config(arch: str, d, common: dict, moe: dict):
    import transformers as T

    x = dict(d.extra)
    interval, rope_dim, state = x.get("interval", 4), x.get("rope_dim", d.head_dim), x.get("ssm_state", d.head_dim)
    rope = {**common["rope_parameters"], "partial_rotary_factor": rope_dim / d.head_dim}
    text = dict(common, **moe, head_dim=d.head_dim, num_experts=d.n_expert, moe_intermediate_size=d.n_ff,
                shared_expert_intermediate_size=d.n_ff_shexp, linear_conv_kernel_dim=x.get("ssm_conv", 4),
                linear_key_head_dim=state, linear_value_head_dim=state, linear_num_key_heads=x["ssm_groups"],
                linear_num_value_heads=x["ssm_heads"],
                layer_types=["full_attention" if (l + 1) % interval == 0 else "linear_attention"
                             for l in range(d.n_layer)])
    if arch == "qwen3next":
        return T.Qwen3NextConfig(**{**text, "rope_parameters": rope}, intermediate_size=d.n_ff, norm_topk_prob=True,
                                 decoder_sparse_step=1, mlp_only_layers=[])
    half = rope_dim // 2  # IMRoPE sections over the rotary pairs, split as the released [11, 11, 10]
    rope = {**rope, "mrope_section": [half - 2 * (half // 3), half // 3, half // 3], "mrope_interleaved": True}
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=d.n_embd, patch_size=4,
                  num_position_embeddings=16)
    return T.Qwen3_5MoeConfig(text_config={**text, "rope_parameters": rope}, vision_config=vision,
                              tie_word_embeddings=d.tie_embeddings)


def _deepseek_config(arch: str, d, **overrides):
    import transformers as T

    rope = {"rope_type": "default", "rope_theta": d.rope_theta}
    if d.yarn_factor:
        m = d.yarn_mscale_all_dim  # mscale == mscale_all_dim, as every DeepSeek release
        rope = {"rope_type": "yarn", "rope_theta": d.rope_theta, "factor": d.yarn_factor, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale": m, "mscale_all_dim": m, "original_max_position_embeddings": d.yarn_orig_ctx}
    kw = dict(vocab_size=d.n_vocab, hidden_size=d.n_embd, num_hidden_layers=d.n_layer, num_attention_heads=d.n_head,
              num_key_value_heads=d.n_head, intermediate_size=d.n_ff_dense, moe_intermediate_size=d.n_ff,
              n_routed_experts=d.n_expert, num_experts_per_tok=d.n_expert_used, n_shared_experts=d.n_shared,
              first_k_dense_replace=d.n_dense, q_lora_rank=d.q_lora_rank or None, kv_lora_rank=d.kv_lora_rank,
              qk_nope_head_dim=d.qk_nope, qk_rope_head_dim=d.qk_rope, v_head_dim=d.v_head_dim,
              routed_scaling_factor=d.weights_scale, rms_norm_eps=d.rms_eps, max_position_embeddings=d.context_length,
              tie_word_embeddings=d.tie_embeddings, rope_parameters=rope, bos_token_id=0, eos_token_id=0,
              pad_token_id=0)
    if arch == "deepseek2-lite":
        assert d.gating == "softmax" and not d.expert_bias and not d.weights_norm, "transformers' V2 router"
        kw.update(topk_method="group_limited_greedy" if d.n_group > 1 else "greedy", n_group=d.n_group or None,
                  topk_group=d.topk_group or None, norm_topk_prob=False)
        kw.update(overrides)
        return T.DeepseekV2Config(**kw)
    if arch == "deepseek3":
        assert d.gating == "sigmoid" and d.expert_bias, "transformers' V3 router"
        kw.update(n_group=d.n_group or 1, topk_group=d.topk_group or 1, norm_topk_prob=d.weights_norm,
                  rope_interleave=True)
        kw.update(overrides)
        return T.DeepseekV3Config(**kw)
    raise ValueError(f"arch must be one of {HF_ARCHS}, got {arch!r}")


def _reinit(model, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:  # biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:  # as moecli.synth: small only when tied (else the model echoes)
                p.copy_((0.1 if model.config.tie_word_embeddings else 1.0) * torch.randn(p.shape, generator=g))
            else:
                scale = 3.0 if ("lm_head" in name or name.endswith((".gate.weight", ".router.weight"))) else 1.0
                fan_in = p.shape[1] if ".feed_forward.experts." in name else p.shape[-1]  # llama4's x @ W [E, in, out]
                p.copy_(scale * torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's selection bias: zeros would test nothing
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def write_hf(path_dir, arch: str, dims: SynthDims, seed: int = 0, **overrides) -> Path:
    """Save a random `arch` model (safetensors, fp32) plus tokenizer.json / tokenizer_config.json; returns the dir.
    `overrides`: config arguments (see hf_config)."""
    import torch
    import transformers as T

    out = Path(path_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(arch, dims, **overrides)
    torch.manual_seed(seed)
    model = _auto(cfg).from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _reinit(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    tiny_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
        "model_max_length": dims.context_length, "chat_template": CHATML_TEMPLATE,
    }, indent=1))
    return out


def _auto(cfg):
    """The Auto class for a config: image-text-to-text where it has a vision tower (llama4), else causal LM."""
    import transformers as T

    return T.AutoModelForImageTextToText if getattr(cfg, "vision_config", None) is not None else T.AutoModelForCausalLM


def hf_model(model_dir):
    """transformers' fp32 eager-attention model of a saved `model_dir`, in eval mode."""
    import torch
    import transformers as T

    cls = _auto(T.AutoConfig.from_pretrained(model_dir))
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    # transformers 5.24's Llama4ForConditionalGeneration.forward fails building its output (image_outputs); with
    # no pixel values it is its language_model (a full causal LM, the same weights), which runs
    lm = getattr(model, "language_model", None)
    return lm if hasattr(lm, "lm_head") else model


def hf_logits(model_dir, token_ids) -> np.ndarray:
    """fp32 eager-attention logits of transformers for `token_ids`: float32 [n_tokens, n_vocab]."""
    import torch

    model = hf_model(model_dir)
    with torch.no_grad():
        out = model(torch.tensor([list(token_ids)], dtype=torch.long))
    return out.logits[0].float().numpy()
