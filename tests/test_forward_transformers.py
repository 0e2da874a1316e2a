"""Safetensors checkpoints in the Hugging Face layout: moecli's logits against transformers' (fp32, eager)."""
import numpy as np
import pytest

import moecli
from conftest import tiny_hf
from hf_fixtures import hf_logits

ARCHS = ["llama-dense", "mixtral", "qwen2moe", "qwen3moe", "olmoe", "deepseek2-lite", "deepseek3"]


@pytest.mark.parametrize("engine", ["torch", "ggml"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, engine):
    path = tiny_hf(arch)
    m = moecli.load(path, engine=engine)
    ids = m.tokenize("Safetensors experts: zero-copy, memory-mapped, never unpickled.")
    assert len(ids) > 8
    ref = hf_logits(path, ids)
    got = m.logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert rel < (1e-5 if engine == "torch" else 1e-4), rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["qwen3moe", "olmoe"])
def test_experts_in_name_order_run_through_mul_mat_id(arch, tmp_path):
    """Safetensors stores tensors in name order: with 10+ experts, expert 10 lies between 1 and 2. The experts
    still make one evenly spaced 3-D tensor, addressed through an id -> slot table, so mul_mat_id and the
    one-graph forward take them (prompt-sized and decode-sized batches alike)."""
    import dataclasses

    from conftest import tiny_dims
    from hf_fixtures import write_hf

    path = write_hf(tmp_path, arch, dataclasses.replace(tiny_dims(arch), n_expert=12, n_expert_used=3))
    m = moecli.load(path, engine="ggml")
    layer = m.transformer.experts.engine.layers[0]
    assert layer.stacked is not None and m.transformer.fused_forward is not None
    assert list(layer.slot) == [0, 1, 4, 5, 6, 7, 8, 9, 10, 11, 2, 3]  # 0 1 10 11 2 3 ... in the file
    text = m.tokenize("Safetensors experts: zero-copy, memory-mapped, never unpickled.")
    for ids, split in ((text, False), (text * 3, True)):  # mul_mat_id in the graph; the per-expert loop
        assert m.transformer.fused_forward._split(len(ids)) == split
        ref = hf_logits(path, ids)
        got = m.logits(ids)
        assert np.abs(got - ref).max() / ref.std() < 1e-4
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    x = np.random.default_rng(0).standard_normal((2, m.config.n_embd), dtype=np.float32)
    pairs = (np.array([0, 0, 0, 1, 1, 1]), np.array([10, 2, 11, 3, 7, 0]), np.full(6, 1 / 3, np.float32))
    engine = m.transformer.experts.engine
    id_out = engine.run(0, x, *pairs)
    engine.kernel = "loop"  # per-expert matmuls by id: no table involved
    assert np.abs(id_out - engine.run(0, x, *pairs)).max() < 1e-5


def test_chat_template_from_tokenizer_config():
    m = moecli.load(tiny_hf("qwen3moe"))
    text = m.chat_prompt([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
