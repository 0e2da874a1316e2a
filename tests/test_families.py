"""The checks every architecture added for issue #14 passes against llama.cpp, written once: logits and per-layer
expert selection on both engines (F32; the ggml graph bit for bit), Q8_0 bit for bit, llama.cpp's own Q4_K_M mix
near (other kernel choices: exact mode is bit-identical, tests/test_exact_mode.py), greedy decoding through the
cache (or the recurrent state), the hybrid executor on the CPU device with no, some and every expert cached, and
hostile metadata as one clear error. What is particular to a family stays in its own test file.

Fixtures: tests/conftest.py tiny_gguf (each family's layers are described in its test file).
"""
import numpy as np
import pytest
from conftest import tiny_gguf
from llama_oracle import greedy_tokens, logits_and_routing, rel_diff

import moecli

FAMILIES = ("glm4moe", "smallthinker", "llama4", "minimax-m2", "qwen3next", "qwen35moe")
TEXT = "Experts route tokens; the router picks two of eight. The quick brown fox jumps over 13 lazy dogs!"
TOL_F32 = 1e-4  # max |Δlogit| / std(logits), F32 weights, torch engine (measured 3e-6 … 8e-6)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_f32_logits_and_routing_match_llama_cpp(arch, engine):
    _, got, ref, same = logits_and_routing(tiny_gguf(arch, "F32"), TEXT, engine)
    assert same.all(), np.flatnonzero(~same)
    assert rel_diff(got, ref) < TOL_F32, rel_diff(got, ref)
    if engine == "ggml":  # same graph, shapes and kernels as llama.cpp's builder
        assert np.array_equal(got, ref), float(np.abs(got - ref).max())


@pytest.mark.parametrize("arch", FAMILIES)
def test_q8_0_graph_bit_exact(arch):
    _, got, ref, same = logits_and_routing(tiny_gguf(arch, "Q8_0"), TEXT, "ggml")
    assert same.all() and np.array_equal(got, ref), float(np.abs(got - ref).max())


@pytest.mark.parametrize("arch", FAMILIES)
def test_q4_k_m_near_llama_cpp(arch):
    """Close up to the first token whose experts differ, and the same argmax almost everywhere."""
    ids, got, ref, same = logits_and_routing(tiny_gguf(arch, "Q4_K_M"), TEXT, "ggml")
    first_flip = int(np.argmin(same)) if not same.all() else len(ids)
    assert same.mean() >= 0.9 and first_flip and rel_diff(got[:first_flip], ref[:first_flip]) < 0.1
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("engine", ["ggml", "torch"])
def test_greedy_decode_identical(arch, engine):
    """The prompt, then one token per step through the KV cache (and the conv and delta states)."""
    path = tiny_gguf(arch, "F32")
    m = moecli.load(path, engine=engine)
    ids = m.tokenize(TEXT)
    assert list(m.generate(ids, max_tokens=12, stop_at_eog=False)) == greedy_tokens(path, ids, 12)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("slots", [0, 2, 8])
def test_every_placement_equals_the_reference(arch, slots):
    """The hybrid executor on the CPU device (no, some, every expert cached) against the torch reference."""
    path = tiny_gguf(arch, "F32")
    ref_model = moecli.load(path, engine="torch")
    ids = ref_model.tokenize(TEXT)
    ref = ref_model.logits(ids)
    m = moecli.load(path, placement="hybrimoe", expert_slots=slots)
    assert rel_diff(m.logits(ids), ref) < TOL_F32
    assert m.stats.active > 0 and m.stats.cpu_experts + m.stats.device_experts == m.stats.active


@pytest.mark.parametrize("arch, key, value, message", [  # value None: the key removed
    ("glm4moe", "expert_gating_func", 3, "expert_gating_func 3 is not supported"),
    ("smallthinker", "expert_gating_func", 3, "expert_gating_func 3 is not supported"),
    ("smallthinker", "rope.dimension_count", 32, "rope.dimension_count 32 != head dim 64"),
    ("smallthinker", "attention.sliding_window_pattern", 2, "sliding_window_pattern 2 is not supported"),
    ("llama4", "interleave_moe_layer_step", 0, "interleave_moe_layer_step 0 is not supported"),
    ("llama4", "attention.sliding_window", 0, "sliding_window 0 .* not supported"),
    ("llama4", "attention.sliding_window_pattern", 2, "sliding_window_pattern 2 is not supported"),
    ("llama4", "rope.dimension_count", 32, "rope.dimension_count 32 != head dim 64"),
    ("minimax-m2", "expert_gating_func", 3, "expert_gating_func 3 is not supported"),
    ("minimax-m2", "expert_gating_func", None, "expert_gating_func"),  # llama.cpp aborts without it
    ("minimax-m2", "feed_forward_length", 512, "feed_forward_length 512 != expert_feed_forward_length 256"),
    ("qwen3next", "ssm.state_size", None, "lacks qwen3next.ssm.state_size"),
    ("qwen3next", "ssm.group_count", 3, "time_step_rank 4 is not a multiple of ssm.group_count 3"),
    ("qwen35moe", "rope.dimension_sections", None, "lacks qwen35moe.rope.dimension_sections"),
    ("qwen35moe", "ssm.inner_size", 200, "inner_size 200 != state_size x time_step_rank"),
])
def test_hostile_metadata_is_one_clear_error(tmp_path, arch, key, value, message):
    from gguf import GGUFValueType
    from test_bad_input import rewrite_gguf

    from moecli.errors import MoecliError

    def edit(meta):
        meta = {k: v for k, v in meta.items() if k != f"{arch}.{key}"}
        return meta if value is None else {**meta, f"{arch}.{key}": ([GGUFValueType.UINT32], value)}
    path = tmp_path / "bad.gguf"
    rewrite_gguf(tiny_gguf(arch, "F32"), path, edit_metadata=edit)
    with pytest.raises(MoecliError, match=message):
        moecli.load(path)
