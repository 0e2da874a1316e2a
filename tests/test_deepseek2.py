"""deepseek2 (DeepSeek-V2-Lite style and V3 style) against llama.cpp (the oracle): logits, per-layer expert
selection, greedy decoding through the MLA KV cache, and the hybrid executor.

Fixtures (tests/conftest.py): "deepseek2-lite" = plain attn_q, legacy attn_kv_b (decompressed MHA cache),
2 shared experts, softmax routing, YaRN x8; "deepseek3" = q LoRA, split attn_k_b/attn_v_b (absorbed MLA, latent
cache), sigmoid + exp_probs_b selection bias, 4 groups (2 used), top-4, normalised weights x2.5. Layer 0 is dense.
"""
import numpy as np
import pytest
from conftest import tiny_gguf
from llama_oracle import greedy_tokens, run_llama

import moecli

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
ARCHS = ("deepseek2-lite", "deepseek3")
TOL_F32 = 1e-4  # max |Δlogit| / std(logits) on F32 weights, both engines (measured ~4e-6)
REPORT: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _print_report():
    yield
    for (arch, ftype, engine), (diff, agree) in sorted(REPORT.items()):
        print(f"\n{arch:15s} {ftype:7s} {engine:6s} max|dlogit| {diff:.3e}  routing agreement {agree:.3f}")


def _moe_layers(m):
    return range(m.config.n_dense_layers, m.config.n_layer)


def _run(path, engine):
    """(model, ids, our logits, llama.cpp logits, per-token all-layers-agree mask)."""
    m = moecli.load(path, engine=engine, flash_attn=False)  # llama.cpp's non-flash path, as the oracle runs
    ids = m.tokenize(TEXT)
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, i.clone())
    got = m.logits(ids)
    ref, cap = run_llama(path, ids, capture=[f"ffn_moe_topk-{l}" for l in _moe_layers(m)])
    same = np.ones(len(ids), dtype=bool)
    for l in _moe_layers(m):  # compared as sets: equal scores may come out in another order
        same &= (np.sort(picks[l].numpy(), 1) == np.sort(cap[f"ffn_moe_topk-{l}"], 1)).all(1)
    assert sorted(picks) == list(_moe_layers(m))  # the dense layer routes nothing
    return m, ids, got, ref, same


def _rel(got, ref):
    return float(np.abs(got - ref).max() / ref.std())


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_logits_and_routing_match_llama_cpp(arch, engine):
    _, _, got, ref, same = _run(tiny_gguf(arch, "F32"), engine)
    REPORT[(arch, "F32", engine)] = (float(np.abs(got - ref).max()), float(same.mean()))
    assert got.shape == ref.shape
    assert same.all(), np.flatnonzero(~same)
    assert _rel(got, ref) < TOL_F32, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_ggml_engine(arch, ftype):
    """As test_forward_llama_cpp: ggml rounds every matmul input to Q8, so a near-tie in a router can go the other
    way; tight up to the first token whose routing differs, nearly all decisions equal overall."""
    _, ids, got, ref, same = _run(tiny_gguf(arch, ftype), "ggml")
    REPORT[(arch, ftype, "ggml")] = (float(np.abs(got - ref).max()), float(same.mean()))
    first_flip = int(np.argmin(same)) if not same.all() else len(ids)
    assert same.mean() >= 0.9, same.mean()
    assert first_flip and _rel(got[:first_flip], ref[:first_flip]) < 0.1, _rel(got[:first_flip], ref[:first_flip])
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_16_tokens_identical(arch):
    """Prefill then 16 single-token decode steps through the MLA cache, as llama.cpp decodes."""
    path = tiny_gguf(arch, "F32")
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)
    assert list(m.generate(ids, max_tokens=16, stop_at_eog=False)) == greedy_tokens(path, ids, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_decode_equals_fresh_forward(arch):
    m = moecli.load(tiny_gguf(arch, "F32"), engine="torch")
    ids = m.tokenize(TEXT)
    full = m.logits(ids)
    cache = m.transformer.new_cache(len(ids))
    m.transformer.forward(ids[:5], cache)
    steps = [m.transformer.forward([t], cache).numpy()[0] for t in ids[5:]]
    assert np.abs(np.stack(steps) - full[5:]).max() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_hybrid_executor_equals_torch_reference(arch):
    path = tiny_gguf(arch, "F32")
    ref_model = moecli.load(path, engine="torch")
    ids = ref_model.tokenize(TEXT)
    ref = ref_model.logits(ids)
    m = moecli.load(path, placement="hybrimoe", expert_slots=2)
    got = m.logits(ids)
    assert _rel(got, ref) < TOL_F32, _rel(got, ref)
    assert m.stats.active > 0 and m.stats.cpu_experts + m.stats.device_experts == m.stats.active


def test_config_and_validation():
    from moecli.models.loader import load_checkpoint

    lite = load_checkpoint(tiny_gguf("deepseek2-lite", "F32")).config
    assert (lite.q_lora_rank, lite.mla_split, lite.gating, lite.n_dense_layers, lite.n_shared) == \
        (0, False, "softmax", 1, 2)
    assert lite.rope_scaling == "yarn" and lite.rope_factor == 8.0 and abs(lite.yarn_log_mul - 0.707) < 1e-6
    v3 = load_checkpoint(tiny_gguf("deepseek3", "F32")).config
    assert (v3.q_lora_rank, v3.mla_split, v3.gating, v3.expert_bias, v3.n_group, v3.topk_group, v3.norm_topk,
            v3.routed_scale) == (256, True, "sigmoid", True, 4, 2, True, 2.5)


def test_geometry_presets():
    from moecli.synth import geometry, geometry_arch

    d = geometry("deepseek-v2-lite", n_layer=2)
    assert geometry_arch("deepseek-v2-lite") == "deepseek2" and d.n_layer == 2 and d.n_dense == 1
    assert d.n_embd == 2048 and d.n_expert == 64 and d.n_expert_used == 6 and d.kv_lora_rank == 512
    v3 = geometry("deepseek-v3", n_layer=4)
    assert v3.n_dense == 3 and v3.n_group == 8 and v3.gating == "sigmoid"
    assert geometry_arch("qwen3-30b-a3b") == "qwen3moe"  # the other presets are untouched
