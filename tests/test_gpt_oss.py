"""gpt-oss against llama.cpp (the oracle): logits, per-layer expert selection and expert outputs, greedy decoding
through sliding-window layers, MXFP4 experts, the hybrid executor, the harmony chat template.

Fixture (tests/conftest.py, "gpt-oss"): 3 layers (window 8 on layers 0 and 2), 8 q heads / 2 KV heads, sinks,
q/k/v/o/router/expert biases, 8 experts (3 used) whose gate/up weights are wide enough that the +-7 clamps of the
SwiGLU bite, YaRN x4. "MXFP4_MOE" is llama.cpp's mix for gpt-oss: MXFP4 experts, Q8_0 elsewhere.
"""
import numpy as np
import pytest
import torch
from conftest import tiny_gguf
from llama_oracle import greedy_tokens, run_llama

import moecli

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits) on F32 weights (measured ~1e-5)
LAYERS = range(3)


def _rel(got, ref):
    return float(np.abs(got - ref).max() / ref.std())


def _run(path, engine):
    m = moecli.load(path, engine=engine, flash_attn=False)  # llama.cpp's non-flash path, as the oracle runs
    ids = m.tokenize(TEXT)
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, i.clone())
    got = m.logits(ids)
    ref, cap = run_llama(path, ids, capture=[f"ffn_moe_topk-{l}" for l in LAYERS])
    same = np.ones(len(ids), dtype=bool)
    for l in LAYERS:  # as sets: equal logits may come out in another order
        same &= (np.sort(picks[l].numpy(), 1) == np.sort(cap[f"ffn_moe_topk-{l}"], 1)).all(1)
    return m, ids, got, ref, same


def test_f32_torch_reference_matches_llama_cpp():
    m, ids, got, ref, same = _run(tiny_gguf("gpt-oss", "F32"), "torch")
    assert len(ids) > 3 * m.config.sliding_window  # the window really cuts the context
    assert same.all(), np.flatnonzero(~same)
    assert _rel(got, ref) < TOL_F32, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("ftype", ["F32", "Q8_0", "MXFP4_MOE"])
def test_ggml_engine_bit_exact(ftype):
    """The CPU engine runs gpt-oss as llama.cpp's own graph (sinks via soft_max_add_sinks, the sliding-window mask,
    add_id biases, swiglu_oai; MXFP4 repacked as llama.cpp repacks it): identical logits and routing."""
    m, ids, got, ref, same = _run(tiny_gguf("gpt-oss", ftype), "ggml")
    assert m.transformer.fused_forward is not None
    assert same.all() and np.array_equal(got, ref), float(np.abs(got - ref).max())


@pytest.mark.parametrize("ftype", ["F32", "MXFP4_MOE"])
def test_expert_outputs_equal_llama_cpp_per_layer(ftype):
    """The CPU expert engine fed llama.cpp's own FFN input and routing reproduces its ffn_moe_out (biases via
    add_id, swiglu_oai, MXFP4 weights). llama.cpp repacks MXFP4 for its CPU kernel: another accumulation order."""
    path = tiny_gguf("gpt-oss", ftype)
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)
    names = ("attn_post_norm", "ffn_moe_topk", "ffn_moe_weights_softmax", "ffn_moe_out")
    _, cap = run_llama(path, ids, capture=[f"{n}-{l}" for n in names for l in LAYERS])
    for l in LAYERS:
        x = torch.from_numpy(cap[f"attn_post_norm-{l}"])
        top = torch.from_numpy(cap[f"ffn_moe_topk-{l}"].astype(np.int64))
        w = torch.from_numpy(cap[f"ffn_moe_weights_softmax-{l}"].reshape(top.shape))
        got = m.transformer.experts(l, x, top, w).numpy()
        want = cap[f"ffn_moe_out-{l}"]
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), (l, np.abs(got - want).max())


def test_greedy_16_tokens_identical():
    """Prefill then 16 decode steps: the sliding-window layers drop keys as llama.cpp's SWA cache does."""
    path = tiny_gguf("gpt-oss", "F32")
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)
    assert list(m.generate(ids, max_tokens=16, stop_at_eog=False)) == greedy_tokens(path, ids, 16)


def test_kv_cache_decode_equals_fresh_forward():
    m = moecli.load(tiny_gguf("gpt-oss", "F32"), engine="torch")
    ids = m.tokenize(TEXT)
    full = m.logits(ids)
    cache = m.transformer.new_cache(len(ids))
    m.transformer.forward(ids[:5], cache)
    m.transformer.forward(ids[5:9], cache)  # a small batch straddling the window
    steps = [m.transformer.forward([t], cache).numpy()[0] for t in ids[9:]]
    assert np.abs(np.stack(steps) - full[9:]).max() < 1e-4


@pytest.mark.parametrize("ftype", ["F32", "MXFP4_MOE"])
def test_hybrid_executor_equals_torch_reference(ftype):
    """Experts split between the ggml CPU engine and the device cache (biases and the clamped SwiGLU on both sides;
    MXFP4 dequantized on the device bit-identically)."""
    path = tiny_gguf("gpt-oss", ftype)
    ref_model = moecli.load(path, engine="torch")
    ids = ref_model.tokenize(TEXT)
    ref = ref_model.logits(ids)
    m = moecli.load(path, placement="hybrimoe", expert_slots=3)
    got = m.logits(ids)
    assert m.stats.cpu_experts > 0 and m.stats.device_experts > 0
    # the CPU side rounds activations to Q8 for quantized experts (as llama.cpp); the torch reference does not
    assert _rel(got, ref) < (TOL_F32 if ftype == "F32" else 0.2), _rel(got, ref)


def test_config_and_validation():
    from moecli.errors import MoecliError
    from moecli.models.loader import load_checkpoint

    c = load_checkpoint(tiny_gguf("gpt-oss", "F32")).config
    assert (c.sliding_window, c.swa_layers, c.attn_sinks, c.expert_act, c.gating) == \
        (8, (0, 2), True, "swiglu_oai", "softmax_weight")
    assert (c.rope_scaling, c.rope_factor, c.yarn_orig_ctx, c.n_ff_exp, c.n_expert_used) == ("yarn", 4.0, 256, 256, 3)
    ckpt = load_checkpoint(tiny_gguf("gpt-oss", "F32"))
    stack = ckpt.experts["blk.1.ffn_up_exps"]
    assert stack.bias_rows().shape == (8, 256)
    from moecli.models.loader import validate

    b = stack.bias  # the same bytes read as 16 experts of 128: a width the config does not give
    stack.bias = type(b)(b.name, b.type, (128, 16), b.raw)
    with pytest.raises(MoecliError, match="ffn_up_exps.bias has shape"):
        validate(ckpt)


def test_mxfp4_device_dequantization_is_bit_identical():
    from moecli.kernels import ggml, torch_dequant
    from moecli.models.loader import load_checkpoint

    t = load_checkpoint(tiny_gguf("gpt-oss", "MXFP4_MOE")).experts["blk.0.ffn_gate_exps"].expert(5)
    assert t.type.name == "MXFP4"
    got = torch_dequant.dequantize(torch.from_numpy(t.raw.copy()), t.type, t.shape).numpy()
    assert np.array_equal(got.view(np.uint32), ggml.to_float(t).view(np.uint32))


def test_geometry_presets():
    from moecli.synth import geometry, geometry_arch

    d = geometry("gpt-oss-20b", n_layer=2)
    assert geometry_arch("gpt-oss-20b") == "gpt-oss" and d.n_layer == 2 and d.n_expert == 32 and d.n_embd == 2880
    assert geometry("gpt-oss-120b", n_layer=4).n_expert == 128
