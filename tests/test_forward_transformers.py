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


def test_chat_template_from_tokenizer_config():
    m = moecli.load(tiny_hf("qwen3moe"))
    text = m.chat_prompt([{"role": "user", "content": "hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
