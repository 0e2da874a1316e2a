"""DeepSeek-V2(-Lite) and V3 safetensors in the Hugging Face layout against transformers: MLA through kv_b_proj,
q LoRA or a plain q, YaRN with DeepSeek's mscale, a leading dense layer, shared experts, softmax (V2) or sigmoid +
e_score_correction_bias with grouped top-k and a routed scale (V3)."""
import json

import numpy as np
import pytest
import torch
from conftest import cache_dir
from hf_fixtures import hf_logits

import moecli
from moecli.synth import CHATML_TEMPLATE, tiny_tokenizer

TEXT = "Multi-head latent attention: one compressed KV per token, decompressed per head. Experts 2 of 8!"
COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=256, qk_nope_head_dim=64,
              qk_rope_head_dim=32, v_head_dim=64, first_k_dense_replace=1, max_position_embeddings=2048,
              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _config(kind: str):
    import transformers as T

    if kind == "v2-lite":  # plain q, softmax routing, 2 shared experts, YaRN x8
        return T.DeepseekV2Config(q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2,
                                  topk_method="greedy", routed_scaling_factor=1.0,
                                  rope_parameters={"rope_type": "yarn", "factor": 8.0, "rope_theta": 10000.0,
                                                   "original_max_position_embeddings": 256, "beta_fast": 32.0,
                                                   "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
                                  **COMMON)
    # V3: q LoRA, sigmoid + correction bias, 4 groups of 4 (2 used), top-4 renormalised x2.5, interleaved RoPE
    return T.DeepseekV3Config(q_lora_rank=256, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1,
                              n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                              rope_interleave=True, **COMMON)


def _write(kind: str, seed: int = 0):
    import transformers as T

    path = cache_dir() / f"hf-deepseek-{kind}"
    if path.exists():
        return path
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as moecli.synth: O(1) activations and a decisive router
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                scale = 3.0 if ("lm_head" in name or name.endswith("mlp.gate.weight")) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML_TEMPLATE}))
    return path


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("kind", ["v2-lite", "v3"])
def test_logits_match_transformers(kind, engine):
    path = _write(kind)
    m = moecli.load(path, engine=engine)
    c = m.config
    assert c.arch == "deepseek2" and c.n_dense_layers == 1 and (c.q_lora_rank > 0) == (kind == "v3")
    ids = m.tokenize(TEXT)
    ref = hf_logits(path, ids)
    got = m.logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert rel < (1e-5 if engine == "torch" else 1e-4), rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_config_mapping():
    from moecli.models.loader import load_checkpoint

    v2 = load_checkpoint(_write("v2-lite")).config
    assert (v2.gating, v2.norm_topk, v2.n_group, v2.rope_scaling, v2.rope_factor, v2.yarn_log_mul, v2.rope_neox) == \
        ("softmax", False, 1, "yarn", 8.0, 0.707, False)
    v3 = load_checkpoint(_write("v3")).config
    assert (v3.gating, v3.expert_bias, v3.n_group, v3.topk_group, v3.norm_topk, v3.routed_scale, v3.q_lora_rank) == \
        ("sigmoid", True, 4, 2, True, 2.5, 256)


def test_incremental_decode_equals_one_shot():
    m = moecli.load(_write("v3"), engine="torch")
    ids = m.tokenize(TEXT)
    full = m.logits(ids)
    cache = m.transformer.new_cache(len(ids))
    m.transformer.forward(ids[:6], cache)
    steps = [m.transformer.forward([t], cache).numpy()[0] for t in ids[6:]]
    assert np.abs(np.stack(steps) - full[6:]).max() < 1e-4
