"""llama4 safetensors in the Hugging Face layouts against transformers' fp32 eager logits: Meta's
Llama4ForConditionalGeneration (config.json text_config, the text model under language_model., a vision tower to
skip) and what save_pretrained writes for a text-only Llama4ForCausalLM (llama4_text); fused, transposed experts
split from gate_up_proj's halves; RoPE on adjacent pairs with llama3 factors; chunked attention with chunks shorter
than the prompt; the NoPE layer's temperature tuning; L2 q/k norms; decoding through the cache; the hybrid executor;
a bf16 checkpoint; Meta's released Scout / Maverick configs against the GGUF presets; hostile configs.

Fixture (tests/hf_fixtures.py "llama4" / "llama4-text", the tiny GGUF llama4's dims): 4 layers, 1 and 3 MoE (top-1
of 8 by the raw logits, sigmoid weight on the expert input, a shared expert), 3 NoPE with full attention, 0-2
chunked (16 tokens). Measured max |Δlogit| (logits std ~3): torch 1.4e-5, ggml 1.3e-5 (fp32 summation order).
"""
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import _lock, cache_dir, tiny_dims, tiny_hf
from hf_fixtures import LLAMA4_CHUNK, hf_logits, hf_model, write_hf
from llama_oracle import rel_diff

import moecli
from moecli.api import Session

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
LAYOUTS = ("llama4", "llama4-text")
_built = {}


def _path(layout: str):
    if layout == "llama4":
        return tiny_hf("llama4")
    with _lock:
        if layout not in _built:
            _built[layout] = write_hf(cache_dir() / f"hf-{layout}", layout, tiny_dims("llama4"), 0)
        return _built[layout]


def _edited(tmp_path, src, **changes):
    """`src` with config.json (its text part) changed, the tensors linked."""
    tmp_path.mkdir(exist_ok=True)
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (cfg.get("text_config") or cfg).update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _hf_logits_and_picks(path, ids, k: int):
    """transformers' logits and, per MoE layer (in order), the top-k experts of its router logits."""
    model, logits = hf_model(path), []
    for name, mod in model.named_modules():
        if name.endswith("feed_forward.router"):
            mod.register_forward_hook(lambda mod, i, out: logits.append(out[1]))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    return ref, [r.topk(k, -1).indices.sort(-1).values.numpy() for r in logits]


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_and_experts_match_transformers(layout, engine):
    m = moecli.load(_path(layout), engine=engine)
    ids = m.tokenize(TEXT)
    assert len(ids) > 3 * LLAMA4_CHUNK
    picks = {}
    m.transformer.on_router = lambda l, probs, i, w: picks.setdefault(l, i.clone())
    got = m.logits(ids)
    ref, hf_picks = _hf_logits_and_picks(_path(layout), ids, m.config.n_expert_used)
    assert sorted(picks) == [1, 3] and len(hf_picks) == 2
    for l, want in zip(sorted(picks), hf_picks):
        assert np.array_equal(np.sort(picks[l].numpy(), 1), want), l
    assert np.abs(got - ref).max() < 1e-4 and rel_diff(got, ref) < 2e-5, (np.abs(got - ref).max(), rel_diff(got, ref))
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_config_mapping():
    from moecli.models.loader import load_checkpoint

    cg, text = (load_checkpoint(_path(layout)) for layout in LAYOUTS)
    assert cg.config == text.config
    c = cg.config
    assert (c.arch, c.moe_step, c.swa_layers, c.nope_layers, c.attn_chunk, c.attn_temp_floor, c.attn_temp_scale) == \
        ("llama4", 2, (0, 1, 2), (3,), LLAMA4_CHUNK, 4, 0.1)
    assert (c.gating, c.select_logits, c.weight_input, c.norm_topk, c.qk_norm, c.rope_neox, c.n_ff, c.n_ff_shexp,
            c.n_ff_exp, c.tie_embeddings) == ("sigmoid", True, True, False, "l2", False, 512, 256, 256, False)
    assert sorted(k for k in cg.experts if k.endswith("gate_exps")) == ["blk.1.ffn_gate_exps", "blk.3.ffn_gate_exps"]
    # the llama3 factors: transformers' scaled inv_freq is the plain one over each pair's factor (all three bands)
    inv = hf_model(_path("llama4-text")).model.rotary_emb.inv_freq.numpy()
    plain = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)
    f = np.array(c.rope_factors)
    assert np.allclose(plain / f, inv, rtol=1e-5) and f.min() == 1.0 and f.max() == 8.0 and ((f > 1) & (f < 8)).any()


def test_show_counts_as_the_gguf():
    """`moecli show`: the tiny GGUF llama4's geometry gives the same counts (the vision tower is not counted); the
    GGUF has rope_freqs.weight besides (head_dim / 2 factors, config here)."""
    from conftest import tiny_gguf

    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    hf, gg = summarize(load_checkpoint(_path("llama4"))), summarize(load_checkpoint(tiny_gguf("llama4", "F32")))
    n = tiny_dims("llama4").head_dim // 2
    assert (hf["params_total"] + n, hf["params_active"] + n, hf["expert_params"], hf["layers"]) == \
        (gg["params_total"], gg["params_active"], gg["expert_params"], gg["layers"])


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_decode_steps_match_transformers(engine):
    """A prompt prefilled through a Session's cache (across a chunk boundary), then token by token over the next
    chunks: transformers' one-shot logits of the whole sequence."""
    path = _path("llama4")
    m = moecli.load(path, engine=engine)
    ids = m.tokenize(TEXT)[:2 * LLAMA4_CHUNK + 4]
    session = Session(m, len(ids))
    n0 = LLAMA4_CHUNK + 5
    steps = [m.transformer.forward(ids[:n0], session.cache).numpy()]
    steps += [m.transformer.forward([t], session.cache).numpy() for t in ids[n0:]]
    got, ref = np.concatenate(steps), hf_logits(path, ids)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_hybrid_executor_matches_transformers():
    """The hybrid executor on the CPU device (2 of 8 experts per layer cached) runs the fused HF experts too."""
    path = _path("llama4")
    m = moecli.load(path, placement="hybrimoe", expert_slots=2)
    ids = m.tokenize(TEXT)
    got, ref = m.logits(ids), hf_logits(path, ids)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()
    assert m.stats.cpu_experts > 0 and m.stats.device_experts > 0


def test_greedy_generation_equals_transformers():
    path = _path("llama4-text")
    m = moecli.load(path, engine="ggml")
    ids = m.tokenize(TEXT)[:LLAMA4_CHUNK - 3]  # generation crosses the chunk boundary
    got = list(m.generate(ids, max_tokens=8, stop_at_eog=False))
    hf, seq = hf_model(path), list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(ids):]


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_maverick_style_switches(tmp_path, engine):
    """use_qk_norm off (as the 128-expert Maverick), attn_temperature_tuning off, plain RoPE (no llama3 factors):
    still transformers' logits."""
    path = _edited(tmp_path, _path("llama4"), use_qk_norm=False, attn_temperature_tuning=False,
                   rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    m = moecli.load(path, engine=engine)
    assert (m.config.qk_norm, m.config.attn_temp_scale, m.config.rope_factors) == (None, 0.0, ())
    ids = m.tokenize(TEXT)
    got, ref = m.logits(ids), hf_logits(path, ids)
    assert np.abs(got - ref).max() < 1e-4, np.abs(got - ref).max()


def test_hostile_configs_name_the_key(tmp_path):
    from moecli.errors import MoecliError, UnsupportedError
    from moecli.models.llama4 import from_hf

    text = json.loads((_path("llama4-text") / "config.json").read_text())
    for bad, err, match in (
            ({"moe_layers": [0, 3]}, UnsupportedError, "moe_layers"),
            ({"no_rope_layers": [1, 0]}, MoecliError, "no_rope_layers must list an integer for each of the 4"),
            ({"layer_types": ["sliding_attention"] * 4}, UnsupportedError, "layer_types"),
            ({"attention_chunk_size": 0}, MoecliError, "attention_chunk_size 0"),
            ({"no_rope_layers": None, "no_rope_layer_interval": 0}, MoecliError, "no_rope_layer_interval 0"),
            ({"attn_temperature_tuning": "yes"}, MoecliError, "attn_temperature_tuning is 'yes', expected"),
            ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedError, "'yarn'"),
            ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act")):
        with pytest.raises(err, match=match):
            from_hf({**text, **bad})
    # through the loader: one error naming the file's key
    path = _edited(tmp_path / "a", _path("llama4"), floor_scale=0)
    with pytest.raises(MoecliError, match="floor_scale 0"):
        moecli.load(path, engine="torch")
    path = _edited(tmp_path / "b", _path("llama4-text"), model_type="llama4")  # a wrapper config without its text
    with pytest.raises(MoecliError, match="needs text_config"):
        moecli.load(path, engine="torch")


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_bf16_checkpoint(tmp_path, engine):
    """Released checkpoints are bf16: the fused experts are copied as 16-bit patterns, the norms become F32 (ggml's
    binary ops take no bf16). The torch engine computes in fp32 like transformers' upcast; ggml's bf16 matmuls round
    the activations to bf16 (as llama.cpp on a BF16 GGUF): ~2 % of the logits' std."""
    import transformers as T

    src = _path("llama4")
    T.AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp_path / f)
    m = moecli.load(tmp_path, engine=engine)
    assert m.checkpoint.experts["blk.1.ffn_gate_exps"].type.name == "BF16"
    ids = m.tokenize(TEXT)
    got, ref = m.logits(ids), hf_logits(tmp_path, ids)
    assert rel_diff(got, ref) < (2e-5 if engine == "torch" else 0.05), rel_diff(got, ref)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


# meta-llama/Llama-4-Scout-17B-16E-Instruct's config.json text_config (what the loader hands from_hf), and
# Maverick-17B-128E's differences: the released files map to what llama.cpp's GGUF of them loads as (the presets)
SCOUT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attn_scale": 0.1, "attn_temperature_tuning": 4,
    "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760, "model_type": "llama4_text",
    "moe_layers": list(range(48)), "no_rope_layers": [1, 1, 1, 0] * 12, "num_attention_heads": 40,
    "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8, "num_local_experts": 16,
    "pad_token_id": 200018, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "use_qk_norm": True, "vocab_size": 202048,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
MAVERICK = {**SCOUT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "moe_layers": list(range(1, 48, 2)),
            "use_qk_norm": False, "rope_scaling": None, "max_position_embeddings": 1048576}


@pytest.mark.parametrize("name, text", [("llama4-scout", SCOUT), ("llama4-maverick", MAVERICK)])
def test_released_configs_map_as_their_gguf(name, text):
    import dataclasses

    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from moecli.models.llama4 import from_hf
    from moecli.synth import config, geometry, geometry_arch

    got, gguf = from_hf(text), config(geometry_arch(name), geometry(name, n_layer=48))
    fields = [f.name for f in dataclasses.fields(got) if f.name not in ("rope_factors", "n_ctx_train")]
    assert {f: getattr(got, f) for f in fields} == {f: getattr(gguf, f) for f in fields}
    if text["rope_scaling"] is None:
        assert got.rope_factors == ()
        return
    # transformers 5.24's strict Llama4TextConfig refuses Meta's own `attn_temperature_tuning: 4` (bool only)
    kw = {k: v for k, v in text.items() if k != "rope_scaling"} | {"attn_temperature_tuning": True}
    cfg = T.Llama4TextConfig(**kw, rope_parameters={**text["rope_scaling"], "rope_theta": text["rope_theta"]})
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    plain = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    assert np.allclose(plain / np.array(got.rope_factors), inv.numpy(), rtol=1e-5)
