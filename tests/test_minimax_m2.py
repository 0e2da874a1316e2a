"""minimax-m2 (MiniMax-M2 230B-A10B style), what is particular to it (the checks every family passes are in
tests/test_families.py): its layout, a missing output head, the minimax-m2 preset, safetensors against transformers.

Fixture (tests/conftest.py "minimax-m2"): 3 MoE layers, 8 q heads / 2 KV heads of 64, q/k RMSNorm over the whole
projections (512 and 128 wide), NEOX RoPE on 32 of 64 head dims, sigmoid + exp_probs_b, renormalised top-2 of 8.
"""
import numpy as np
import pytest
from conftest import tiny_gguf
from llama_oracle import rel_diff

import moecli

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits), F32 weights (torch measured ~3e-6)


def test_layout_as_llama_cpp():
    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    ckpt = load_checkpoint(tiny_gguf("minimax-m2", "F32"))
    c = ckpt.config
    assert (c.qk_norm, c.rope_dim, c.head_dim, c.rope_neox, c.gating, c.expert_bias, c.norm_topk, c.routed_scale) == \
        ("full", 32, 64, True, "sigmoid", True, True, 0.0)
    assert tuple(ckpt.tensors["blk.0.attn_q_norm.weight"].ne[:1]) == (512,)
    assert tuple(ckpt.tensors["blk.0.attn_k_norm.weight"].ne[:1]) == (128,)
    s = summarize(ckpt)
    assert s["layers"] == "3 MoE"
    assert s["params_active"] == s["params_total"] - s["expert_params"] + s["expert_params"] * 2 // 8


def test_missing_output_head_is_one_clear_error(tmp_path):
    """llama.cpp refuses a minimax-m2 file without output.weight (no tied embeddings)."""
    from moecli.errors import MoecliError

    src, path2 = tiny_gguf("minimax-m2", "F32"), tmp_path / "bad2.gguf"
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(path2, "minimax-m2")
    for k, f in r.fields.items():
        if not k.startswith("GGUF.") and k != "general.architecture":
            w.add_key_value(k, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
    for t in r.tensors:
        if t.name != "output.weight":
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(MoecliError, match="lacks tensor output.weight"):
        moecli.load(path2)


def test_minimax_m2_preset():
    from moecli.policy.geometry import GEOMETRIES
    from moecli.synth import config, geometry, geometry_arch

    c = config(geometry_arch("minimax-m2"), geometry("minimax-m2", n_layer=2))
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.rope_dim, c.n_expert, c.n_expert_used) == \
        ("minimax-m2", 3072, 48, 8, 128, 64, 256, 8)
    assert (c.n_ff_exp, c.qk_norm, c.gating, c.expert_bias, c.tie_embeddings) == (1536, "full", "sigmoid", True, False)
    g = GEOMETRIES["minimax-m2"]
    assert (g.n_layers, g.expert_ffn, g.n_experts, g.top_k, g.n_shared) == (62, 1536, 256, 8, 0)


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_safetensors_match_transformers(engine):
    from conftest import tiny_hf
    from hf_fixtures import hf_logits

    path = tiny_hf("minimax-m2")
    m = moecli.load(path, engine=engine)
    assert (m.config.arch, m.config.rope_dim, m.config.qk_norm, m.config.expert_bias) == ("minimax-m2", 32, "full",
                                                                                        True)
    ids = m.tokenize(TEXT)
    ref = hf_logits(path, ids)
    assert rel_diff(m.logits(ids), ref) < 1e-4, rel_diff(m.logits(ids), ref)
