"""smallthinker (SmallThinker-21B-A3B / 4B-A0.6B style), what is particular to it (the checks every family passes are
in tests/test_families.py): its layout, the sigmoid / no-window variant against llama.cpp, the sliding window
(torch against the graph), the smallthinker-21b preset. GGUF only: transformers has no SmallThinker.

Fixture (tests/conftest.py "smallthinker"): 5 layers (0 and 4 full attention without RoPE, 1-3 sliding window with
NEOX RoPE), the router on the layer input, softmax top-2 of 8 renormalised, ReGLU experts.
"""
import dataclasses

import numpy as np
from conftest import tiny_dims, tiny_gguf
from llama_oracle import logits_and_routing, rel_diff

import moecli
from moecli.synth import write_gguf

TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits), F32 weights (torch measured ~8e-6)


def test_layout_as_llama_cpp():
    """NoPE on l % 4 == 0 and the 4096-key window elsewhere (whatever the file says), ReGLU, router on the input."""
    c = moecli.load(tiny_gguf("smallthinker", "F32")).config
    assert (c.nope_layers, c.swa_layers, c.sliding_window) == ((0, 4), (1, 2, 3), 4096)
    assert (c.gating, c.norm_topk, c.routed_scale, c.expert_act, c.router_input, c.tie_embeddings) == \
        ("softmax", True, 0.0, "reglu", "layer", False)


def test_sigmoid_without_window_matches_llama_cpp(tmp_path):
    """The 4B-style file: sigmoid scores, no sliding_window key (so RoPE and full attention on every layer), no
    output.weight (tied)."""
    d = dataclasses.replace(tiny_dims("smallthinker"), extra=(("gating", "sigmoid"), ("swa", False)),
                            tie_embeddings=True)
    path = write_gguf(tmp_path / "st-sigmoid.gguf", "smallthinker", d, 1, "F32")
    c = moecli.load(path).config
    assert (c.gating, c.nope_layers, c.swa_layers, c.tie_embeddings) == ("sigmoid", (), (), True)
    for engine in ("ggml", "torch"):
        _, got, ref, same = logits_and_routing(path, TEXT, engine)
        assert same.all() and rel_diff(got, ref) < TOL_F32


def test_smallthinker_21b_preset():
    from moecli.policy.geometry import GEOMETRIES
    from moecli.synth import config, geometry, geometry_arch

    c = config(geometry_arch("smallthinker-21b"), geometry("smallthinker-21b", n_layer=6))
    assert (c.arch, c.n_embd, c.n_head, c.n_head_kv, c.head_dim, c.n_expert, c.n_expert_used, c.n_ff_exp) == \
        ("smallthinker", 2560, 28, 4, 128, 64, 6, 768)
    assert (c.gating, c.nope_layers, c.swa_layers, c.expert_act) == ("softmax", (0, 4), (1, 2, 3, 5), "reglu")
    g = GEOMETRIES["smallthinker-21b"]
    assert (g.n_layers, g.expert_ffn, g.n_experts, g.top_k, g.n_shared) == (52, 768, 64, 6, 0)


def test_sliding_window_torch_equals_graph():
    """The window bites only past 4096 keys in a real file; narrowed to 8 here (both engines read the config at
    run time), the torch engine's masked attention against the graph's SWA mask, in prefill and in decode."""
    path = tiny_gguf("smallthinker", "F32")
    models = [moecli.load(path, engine=e, flash_attn=False) for e in ("torch", "ggml")]
    ids = models[0].tokenize(TEXT)
    outs = []
    for m in models:
        m.config.sliding_window = 8
        cache = m.transformer.new_cache(len(ids))
        pre = m.transformer.forward(ids[:14], cache).numpy()
        outs.append(np.concatenate([pre] + [m.transformer.forward([t], cache).numpy() for t in ids[14:]]))
    full = moecli.load(path, engine="torch").logits(ids)
    assert rel_diff(outs[0], outs[1]) < TOL_F32, rel_diff(outs[0], outs[1])
    assert rel_diff(outs[0], full) > 1e-2  # the window changed the result: the test can fail
