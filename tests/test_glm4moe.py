"""glm4moe (GLM-4.5 / 4.5-Air style), what is particular to it (the checks every family passes are in
tests/test_families.py): the NextN layer the file holds and both engines skip, the 355B variant's q/k norms against
llama.cpp, safetensors against transformers, the glm-4.5-air preset.

Fixture (tests/conftest.py "glm4moe"): 1 dense + 2 MoE layers + 1 NextN layer, q/k/v biases, NEOX rope on 32 of
64 head dims, sigmoid + exp_probs_b, renormalised top-2 of 8, one shared expert.
"""
import dataclasses

import pytest
from conftest import tiny_dims, tiny_gguf, tiny_hf
from hf_fixtures import hf_logits
from llama_oracle import logits_and_routing, rel_diff

import moecli
from moecli.synth import write_gguf

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits), F32 weights (measured ~3e-6)


def test_config_skips_the_nextn_layer():
    from moecli.models.loader import load_checkpoint

    ckpt = load_checkpoint(tiny_gguf("glm4moe", "F32"))
    c = ckpt.config
    assert (c.n_layer, c.n_nextn_layers, c.n_dense_layers, c.head_dim, c.rope_dim, c.rope_neox) == \
        (3, 1, 1, 64, 32, True)
    assert (c.gating, c.expert_bias, c.norm_topk, c.n_shared, c.n_ff_shexp, c.attn_bias, c.qk_norm) == \
        ("sigmoid", True, True, 1, 256, True, None)
    assert "blk.3.nextn.eh_proj.weight" in ckpt.tensors and "blk.3.ffn_gate_exps" not in ckpt.experts
    from moecli.cli.pull import summarize  # `moecli show`: the layer kinds; the NextN layer is not active

    s = summarize(ckpt)
    nextn = sum(t.n_elements for name, t in ckpt.tensors.items() if name.startswith("blk.3."))
    assert s["layers"] == "1 dense + 2 MoE, + 1 NextN (held, skipped)"
    assert s["params_active"] == s["params_total"] - nextn - s["expert_params"] + s["expert_params"] * 2 // 8


def test_qk_norm_variant_matches_llama_cpp(tmp_path):
    """GLM-4.5 (355B) has per-head q/k RMSNorms: found in the file, applied by both engines."""
    d = dataclasses.replace(tiny_dims("glm4moe"), extra=(("rope_dim", 32), ("qk_norm", "head")))
    path = write_gguf(tmp_path / "glm-qk.gguf", "glm4moe", d, 1, "F32")
    assert moecli.load(path).config.qk_norm == "head"
    for engine in ("ggml", "torch"):
        _, got, ref, same = logits_and_routing(path, TEXT, engine)
        assert same.all() and rel_diff(got, ref) < TOL_F32


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_safetensors_match_transformers(engine):
    path = tiny_hf("glm4moe")
    m = moecli.load(path, engine=engine)
    assert (m.config.arch, m.config.rope_dim, m.config.n_dense_layers) == ("glm4moe", 32, 1)
    ids = m.tokenize(TEXT)
    ref = hf_logits(path, ids)
    assert rel_diff(m.logits(ids), ref) < 1e-4, rel_diff(m.logits(ids), ref)


def test_glm_4_5_air_preset():
    from moecli.policy.geometry import GEOMETRIES
    from moecli.synth import config, geometry, geometry_arch

    d = geometry("glm-4.5-air", n_layer=3)
    c = config(geometry_arch("glm-4.5-air"), d)
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.rope_dim, c.n_expert, c.n_expert_used) == \
        ("glm4moe", 4096, 96, 8, 128, 64, 128, 8)
    assert (c.n_layer, c.n_dense_layers, c.n_ff, c.n_ff_exp, c.n_ff_shexp, c.n_nextn_layers) == \
        (3, 1, 10944, 1408, 1408, 1)
    g = GEOMETRIES["glm-4.5-air"]
    assert (g.n_layers, g.expert_ffn, g.n_experts, g.top_k, g.n_shared, g.shared_ffn) == (45, 1408, 128, 8, 1, 1408)
