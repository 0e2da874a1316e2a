"""llama4 (Llama 4 Scout / Maverick style), what is particular to it (the checks every family passes are in
tests/test_families.py): its layout, the Maverick-style variant against llama.cpp (128 experts: no q/k norm; top-2,
every layer MoE, no rope_freqs), chunked attention and temperature tuning (torch against the graph with a narrowed
chunk), a bad rope_freqs tensor, the llama4 presets. GGUF (safetensors:
tests/test_llama4_hf.py).

Fixture (tests/conftest.py "llama4"): 4 layers (0 and 2 dense, 1 and 3 MoE; layer 3 full attention without RoPE,
0-2 chunked with NORM RoPE times rope_freqs factors and L2 q/k norms), top-1 of 8 picked by the logits, the
sigmoid weight on the expert's input, one shared expert.
"""
import dataclasses

import numpy as np
import pytest
from conftest import tiny_dims, tiny_gguf
from llama_oracle import logits_and_routing, rel_diff

import moecli
from moecli.synth import write_gguf

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits), F32 weights (torch measured ~3e-6)


def test_layout_as_llama_cpp():
    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    ckpt = load_checkpoint(tiny_gguf("llama4", "F32"))
    c = ckpt.config
    assert (c.moe_step, c.nope_layers, c.swa_layers, c.attn_chunk, c.attn_temp_floor, c.attn_temp_scale) == \
        (2, (3,), (0, 1, 2), 8192, 8192, 0.1)
    assert (c.gating, c.select_logits, c.weight_input, c.norm_topk, c.qk_norm, c.rope_neox, c.n_ff, c.n_ff_shexp) == \
        ("sigmoid", True, True, False, "l2", False, 512, 256)
    assert len(c.rope_factors) == 32 and min(c.rope_factors) >= 1.0 and max(c.rope_factors) > 1.0
    assert sorted(k for k in ckpt.experts if k.endswith("gate_exps")) == ["blk.1.ffn_gate_exps", "blk.3.ffn_gate_exps"]
    s = summarize(ckpt)
    assert s["layers"] == "2 dense + 2 MoE (3 with chunked attention)"
    assert s["params_active"] == s["params_total"] - s["expert_params"] + s["expert_params"] // 8


def test_maverick_variant_matches_llama_cpp(tmp_path):
    """128 experts (llama.cpp's 17B-128E: no q/k norm), top-2 (weights on the inputs of two experts), every layer
    MoE, no rope_freqs."""
    d = dataclasses.replace(tiny_dims("llama4"), n_expert=128, n_expert_used=2, n_ff=32, extra=())
    path = write_gguf(tmp_path / "maverick.gguf", "llama4", d, 1, "F32")
    c = moecli.load(path).config
    assert (c.qk_norm, c.moe_step, c.rope_factors, c.n_expert_used) == (None, 1, (), 2)
    for engine in ("ggml", "torch"):
        _, got, ref, same = logits_and_routing(path, TEXT, engine)
        assert same.all() and rel_diff(got, ref) < TOL_F32, (engine, rel_diff(got, ref))


def test_chunks_and_temperature_torch_equal_graph():
    """The chunk (8192 keys) and the temperature floor (8192) bite only in long contexts; narrowed to 8 and 6 here
    (both engines read the config at run time), the torch engine against the graph, in prefill and decode."""
    path = tiny_gguf("llama4", "F32")
    models = [moecli.load(path, engine=e, flash_attn=False) for e in ("torch", "ggml")]
    ids = models[0].tokenize(TEXT)
    outs = []
    for m in models:
        m.config.attn_chunk, m.config.attn_temp_floor = 8, 6
        cache = m.transformer.new_cache(len(ids))
        pre = m.transformer.forward(ids[:14], cache).numpy()
        outs.append(np.concatenate([pre] + [m.transformer.forward([t], cache).numpy() for t in ids[14:]]))
    full = moecli.load(path, engine="torch").logits(ids)
    assert rel_diff(outs[0], outs[1]) < TOL_F32, rel_diff(outs[0], outs[1])
    assert rel_diff(outs[0], full) > 1e-2  # the chunks and the temperature changed the result: the test can fail


def test_attention_temperature_as_llama_cpp():
    """llama.cpp's formula at its real floor: 1 below position 8191, then log(floor((p + 1) / 8192) + 1) * 0.1 + 1."""
    from moecli.models.rope import attn_temperature

    c = moecli.load(tiny_gguf("llama4", "F32")).config
    t = attn_temperature(c, [0, 8190, 8191, 16383, 100000])
    assert t.dtype == np.float32 and list(t[:2]) == [1.0, 1.0]
    assert np.allclose(t[2:], [1 + 0.1 * np.log(2), 1 + 0.1 * np.log(3), 1 + 0.1 * np.log(13)], rtol=1e-6)


def test_bad_rope_freqs_is_one_clear_error(tmp_path):
    from test_bad_input import rewrite_gguf

    from moecli.errors import MoecliError

    path = tmp_path / "bad.gguf"
    rewrite_gguf(tiny_gguf("llama4", "F32"), path,
                 edit_tensor=lambda name, a: -a if name == "rope_freqs.weight" else a)
    with pytest.raises(MoecliError, match="rope_freqs.weight must hold finite positive factors"):
        moecli.load(path)


@pytest.mark.parametrize("name, moe_step, n_expert, qk_norm", [("llama4-scout", 1, 16, "l2"),
                                                                ("llama4-maverick", 2, 128, None)])
def test_llama4_presets(name, moe_step, n_expert, qk_norm):
    from moecli.policy.geometry import GEOMETRIES
    from moecli.synth import config, geometry, geometry_arch

    c = config(geometry_arch(name), geometry(name, n_layer=4))
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.n_ff_exp) == \
        ("llama4", 5120, 40, 8, 128, n_expert, 1, 8192)
    assert (c.moe_step, c.n_ff_shexp, c.qk_norm, c.nope_layers, c.n_ff) == (moe_step, 8192, qk_norm, (3,), 16384)
    g = GEOMETRIES[name]
    assert (g.n_layers, g.expert_ffn, g.n_experts, g.top_k, g.n_shared, g.shared_ffn) == \
        (48 // moe_step, 8192, n_expert, 1, 1, 8192)
