"""Qwen3-Next (`qwen3_next`) and Qwen3.5 / 3.6 MoE (`qwen3_5_moe`, the multimodal wrapper) safetensors in the Hugging
Face layout against transformers (fp32, eager): the zero-centred norms (1 + w), A_log -> -exp, the squeezed conv,
Qwen3-Next's fused in_proj_qkvz / in_proj_ba (grouped per k head), Qwen3.5's separate projections with the value
heads moved from transformers' grouped order to ggml's tiled broadcast, the vision tower and the MTP head skipped.

Fixtures (tests/hf_fixtures.py): the tiny GGUFs' dims, 2 k heads / 4 v heads, so the head order matters. transformers
writes per-expert tensors; the released Qwen3.5 checkpoints fuse them (mlp.experts.gate_up_proj / down_proj): both
spellings are run. Measured max |Δlogit| over prompt + decode steps (std of the logits ≈ 6): qwen3next torch 1.2e-4,
ggml 1.6e-4; qwen35moe torch 2.7e-4, ggml 4.4e-4 (relative 2e-5 .. 7.4e-5; the decode steps alone ≤ 1.1e-4).
transformers runs the prompt through its chunked delta rule (a WY form), moecli token by token: these sit above the
attention-only archs' 1e-5 relative.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_hf
from hf_fixtures import hf_logits

import moecli
from moecli.api import Session
from moecli.errors import MoecliError

ARCHS = ("qwen3next", "qwen35moe")
TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
N_DECODE = 4
TOL = 2e-4  # max |Δlogit| / std(logits), both engines (measured ≤ 7.3e-5)


def _rel(got, ref) -> float:
    return float(np.abs(got - ref).max() / ref.std())


def _moecli_run(path, engine: str):
    """(ids, logits of the prompt then N_DECODE single-token steps through the cache, expert picks per layer)."""
    m = moecli.load(path, engine=engine, flash_attn=False)
    ids = m.tokenize(TEXT)
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, []).append(i.clone().numpy())
    session = Session(m, len(ids) + N_DECODE)
    prompt = ids[:-N_DECODE]
    steps = [m.transformer.forward(prompt, session.cache).numpy()]
    steps += [m.transformer.forward([t], session.cache).numpy() for t in ids[-N_DECODE:]]
    return ids, np.concatenate(steps), {l: np.concatenate(p) for l, p in picks.items()}


def _hf_picks(path, ids) -> dict:
    """transformers' top-k expert ids per MoE layer for `ids` (one pass), from its routers' outputs."""
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    picks = {}
    for l, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(lambda mod, inp, out, l=l: picks.__setitem__(l, out[2].numpy()))
    with torch.no_grad():
        model(torch.tensor([ids]))
    return picks


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_experts_match_transformers(arch, engine):
    path = tiny_hf(arch)
    ids, got, picks = _moecli_run(path, engine)
    ref = hf_logits(path, ids)
    assert _rel(got, ref) < TOL, _rel(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    want = _hf_picks(path, ids)
    assert sorted(picks) == sorted(want) == list(range(moecli.load(path).config.n_layer))
    for l in want:  # as sets: equal scores may come out in another order
        assert (np.sort(picks[l], 1) == np.sort(want[l], 1)).all(), l


def test_greedy_generation_equals_transformers_cached():
    """moecli's generate against transformers' greedy generate, which decodes through its own cache (conv state +
    recurrent delta-rule kernel, not the chunked one of the prompt); the 7th token is a near tie (top-2 gap 0.008).
    qwen3next only: transformers' reference kernels make this slow (qwen35moe's decode is checked above)."""
    import transformers as T

    path = tiny_hf("qwen3next")
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)
    got = list(m.generate(ids, max_tokens=8, stop_at_eog=False))
    hf = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    hf.generation_config.eos_token_id = None  # no stop, and no min_new_tokens (it would forbid the eos id 0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert got == out[0, len(ids):].tolist()


def test_config_mapping():
    from moecli.models.loader import load_checkpoint

    nxt, q35 = (load_checkpoint(tiny_hf(a)).config for a in ARCHS)
    assert (nxt.arch, nxt.recurrent_layers, nxt.rope_dim, nxt.ssm_groups, nxt.ssm_heads, nxt.ssm_state,
            nxt.n_ff_shexp, nxt.norm_topk, nxt.rope_sections) == ("qwen3next", (0, 2), 16, 2, 4, 64, 256, True, ())
    assert (q35.arch, q35.recurrent_layers, q35.rope_dim, q35.rope_sections, q35.n_layer) == \
        ("qwen35moe", (0, 1, 2), 32, (6, 5, 5, 0), 4)


# config.json as released (the keys that decide the computation): Qwen/Qwen3-Next-80B-A3B-Instruct (written by
# transformers 4.57: rope at the top level, no layer_types) and Qwen/Qwen3.5-35B-A3B (the wrapper; Qwen3.6-35B-A3B
# has the same text_config)
QWEN3_NEXT_80B = dict(
    model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"], vocab_size=151936, hidden_size=2048,
    intermediate_size=5120, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
    hidden_act="silu", max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=False,
    rope_theta=10000000, rope_scaling=None, partial_rotary_factor=0.25, attention_bias=False,
    full_attention_interval=4, linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1, mlp_only_layers=[],
    moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10, num_experts=512,
    norm_topk_prob=True)
QWEN35_35B = dict(
    model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForConditionalGeneration"], tie_word_embeddings=False,
    image_token_id=248056, vision_config=dict(model_type="qwen3_5_moe", depth=27, hidden_size=1152),
    text_config=dict(
        model_type="qwen3_5_moe_text", vocab_size=248320, hidden_size=2048, num_hidden_layers=40,
        num_attention_heads=16, num_key_value_heads=2, head_dim=256, hidden_act="silu", attention_bias=False,
        attn_output_gate=True, max_position_embeddings=262144, rms_norm_eps=1e-6, full_attention_interval=4,
        layer_types=["full_attention" if (l + 1) % 4 == 0 else "linear_attention" for l in range(40)],
        linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128, linear_num_key_heads=16,
        linear_num_value_heads=32, moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts=256,
        num_experts_per_tok=8, mamba_ssm_dtype="float32", mtp_num_hidden_layers=1, mtp_use_dedicated_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": [11, 11, 10]}))


def test_released_configs():
    """The released config.json files map to what their GGUF conversions hold (llama.cpp's metadata)."""
    from moecli.errors import UnsupportedError
    from moecli.models.loader import _text_config
    from moecli.models.qwen3next import from_hf

    nxt = from_hf(QWEN3_NEXT_80B)
    assert (nxt.arch, len(nxt.recurrent_layers), nxt.recurrent_layers[:4], nxt.rope_dim, nxt.rope_theta,
            nxt.ssm_groups, nxt.ssm_heads, nxt.ssm_state, nxt.ssm_conv, nxt.n_expert, nxt.n_expert_used,
            nxt.n_ff_exp, nxt.n_ff_shexp, nxt.norm_topk, nxt.rope_sections) == \
        ("qwen3next", 36, (0, 1, 2, 4), 64, 1e7, 16, 32, 128, 4, 512, 10, 512, 512, True, ())
    q35 = from_hf(_text_config(QWEN35_35B, "qwen3_5_moe", "Qwen3.5-35B-A3B"))
    assert (q35.arch, len(q35.recurrent_layers), q35.n_layer, q35.rope_dim, q35.rope_sections, q35.n_expert,
            q35.n_expert_used, q35.n_vocab, q35.tie_embeddings) == \
        ("qwen35moe", 30, 40, 64, (11, 11, 10, 0), 256, 8, 248320, False)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}  # the 1M-context card
    text = QWEN35_35B["text_config"]
    with pytest.raises(UnsupportedError, match="yarn"):
        from_hf({**text, "rope_parameters": {**text["rope_parameters"], **yarn}})


def test_show_counts_match_the_gguf():
    """`moecli show`: the vision tower and MTP head are not counted; the same geometry as the tiny GGUF."""
    from conftest import tiny_gguf

    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    for arch in ARCHS:
        hf, gg = summarize(load_checkpoint(tiny_hf(arch))), summarize(load_checkpoint(tiny_gguf(arch, "F32")))
        assert (hf["params_total"], hf["params_active"], hf["expert_params"]) == \
            (gg["params_total"], gg["params_active"], gg["expert_params"])


def _released_qwen35(src, dst):
    """The tiny Qwen3.5 checkpoint as Qwen/Qwen3.5-35B-A3B ships: experts fused per layer (gate_up_proj [E, 2 ff, d],
    gate rows first; down_proj [E, d, ff]) and an MTP head (mtp.*) beside the text model."""
    from safetensors.numpy import load_file, save_file

    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    t = {}
    for f in src.glob("*.safetensors"):
        t.update(load_file(str(f)))
    out = {k: v for k, v in t.items() if ".mlp.experts." not in k}
    n_layer, n_expert = (json.loads((src / "config.json").read_text())["text_config"][k]
                         for k in ("num_hidden_layers", "num_experts"))
    for l in range(n_layer):
        p = f"model.language_model.layers.{l}.mlp.experts."
        e = lambda i, k: t[f"{p}{i}.{k}_proj.weight"]  # noqa: E731
        out[p + "gate_up_proj"] = np.stack([np.concatenate([e(i, "gate"), e(i, "up")]) for i in range(n_expert)])
        out[p + "down_proj"] = np.stack([e(i, "down") for i in range(n_expert)])
    out["mtp.fc.weight"] = np.ones((8, 16), np.float32)
    out["mtp.layers.0.mlp.experts.0.gate_proj.weight"] = np.ones((4, 16), np.float32)
    save_file(out, str(dst / "model.safetensors"))
    return dst


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_released_fused_experts_spelling(tmp_path, engine):
    """Fused experts read as zero-copy per-expert views give the logits of the per-expert file, exactly."""
    src = tiny_hf("qwen35moe")
    fused = _released_qwen35(src, tmp_path)
    a, b = moecli.load(src, engine=engine), moecli.load(fused, engine=engine)
    ids = a.tokenize(TEXT)
    assert np.array_equal(a.logits(ids), b.logits(ids))
    if engine == "torch":  # transformers reads the fused spelling as it is
        assert _rel(b.logits(ids), hf_logits(fused, ids)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_checkpoint(tmp_path, arch):
    """The released checkpoints are bf16: the torch engine (bf16 weights, fp32 arithmetic) matches transformers'
    fp32 run of the same weights; the CPU engine runs them with its small tensors in float32 (ggml_ssm_conv and the
    norms' binary ops take no bf16). Its bf16 matmuls round activations to bf16, as llama.cpp's: on this fixture
    that flips routing on some tokens (the torch engine with only ssm_in's input so rounded moves as far), so its
    values are not compared here."""
    import transformers as T

    src = tiny_hf(arch)
    auto = T.AutoModelForImageTextToText if arch == "qwen35moe" else T.AutoModelForCausalLM
    auto.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    m = moecli.load(tmp_path, engine="torch")
    ids = m.tokenize(TEXT)
    assert _rel(m.logits(ids), hf_logits(tmp_path, ids)) < TOL
    g = moecli.load(tmp_path, engine="ggml")
    types = {k: t.type.name for k, t in g.checkpoint.tensors.items() if k.startswith("blk.0.")}
    assert {types[k] for k in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.attn_norm.weight",
                               "blk.0.ssm_norm.weight")} == {"F32"} and types["blk.0.ssm_out.weight"] == "BF16"
    assert np.isfinite(g.logits(ids)).all()


def _edit(tmp_path, arch, change):
    src = tiny_hf(arch)
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    change(cfg.get("text_config", cfg))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


@pytest.mark.parametrize("arch, key, value, match", [
    ("qwen3next", "linear_value_head_dim", 32, "linear_key_head_dim 64 != linear_value_head_dim 32"),
    ("qwen35moe", "linear_num_value_heads", 3, "not a multiple"),
    ("qwen35moe", "layer_types", ["linear_attention", "sliding_attention", "linear_attention", "full_attention"],
     "layer_types must be 4 of"),
    ("qwen3next", "hidden_act", "gelu", "hidden_act"),
    ("qwen3next", "mlp_only_layers", [1], "dense layers"),
    ("qwen35moe", "linear_num_key_heads", "2", "linear_num_key_heads is '2', expected an integer"),
    ("qwen3next", "num_experts", 16, r"blk\.0\.ffn_\w+_exps"),
    ("qwen35moe", "linear_num_key_heads", -2, "linear_num_key_heads = -2 is out of range"),
])
def test_hostile_config_is_one_clear_error(tmp_path, arch, key, value, match):
    path = _edit(tmp_path, arch, lambda c: c.__setitem__(key, value))
    with pytest.raises(MoecliError, match=match):
        moecli.load(path, engine="torch")


def test_wrapper_without_text_config_is_refused(tmp_path):
    path = _edit(tmp_path, "qwen35moe", lambda c: None)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["text_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MoecliError, match="needs text_config"):
        moecli.load(path)
