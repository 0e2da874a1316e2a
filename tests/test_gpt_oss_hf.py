"""gpt-oss safetensors in the Hugging Face layout against transformers: fused, interleaved gate_up experts and their
biases read into ggml's layout, YaRN without truncation (transformers' gpt-oss), sinks and the sliding window; and
OpenAI's MXFP4 expert blocks repacked to ggml's block_mxfp4 value for value."""
import json

import numpy as np
import pytest
import torch
from conftest import cache_dir
from hf_fixtures import hf_logits

import moecli
from moecli.synth import CHATML_TEMPLATE, tiny_tokenizer

TEXT = "Safetensors experts: fused gate_up, interleaved columns, sinks and a sliding window of eight keys!"


def _write(path, seed=0):
    import transformers as T

    cfg = T.GptOssConfig(vocab_size=512, hidden_size=256, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=64, intermediate_size=256, num_local_experts=8,
                         num_experts_per_tok=3, sliding_window=8, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                          "truncate": False, "original_max_position_embeddings": 256,
                                          "rope_theta": 150000.0},
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # as moecli.synth: O(1) activations, a decisive router, clamps that bite
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("sinks") or "embed" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "bias" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "experts" in name:  # [E, in, out]: fan-in is the middle dim
                scale = 4.0 if "gate_up" in name else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                scale = 3.0 if ("lm_head" in name or "router" in name) else 1.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    model.save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": CHATML_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def hf_dir():
    return _write(cache_dir() / "hf-gpt-oss")


@pytest.mark.parametrize("engine", ["torch", "ggml"])
def test_logits_match_transformers(hf_dir, engine):
    m = moecli.load(hf_dir, engine=engine)
    c = m.config
    assert (c.arch, c.swa_layers, c.yarn_truncate, c.n_expert_used) == ("gpt-oss", (0, 2), False, 3)
    ids = m.tokenize(TEXT)
    assert len(ids) > 3 * c.sliding_window
    ref = hf_logits(hf_dir, ids)
    got = m.logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    # ~1.1e-5 from the first token on (position 0: not RoPE): fp32 summation order on the wide expert gates that
    # make the clamps bite; the other architectures stay under 1e-5 with narrower activations
    assert rel < (3e-5 if engine == "torch" else 1e-4), rel
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_mxfp4_blocks_repack_value_for_value():
    """transformers' MXFP4 layout (byte i holds values 2i / 2i+1, an E8M0 exponent per 32) -> ggml block_mxfp4."""
    from moecli.formats.tensor import TensorData
    from moecli.kernels import ggml
    from moecli.models.gpt_oss import _hf_expert_weights
    from moecli.models.loader import load_checkpoint

    c = load_checkpoint(_write(cache_dir() / "hf-gpt-oss-cfg")).config
    rng = np.random.default_rng(0)
    E, out, n_in = 3, 16, 64
    blocks = rng.integers(0, 256, (E, out, n_in // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 131, (E, out, n_in // 32), dtype=np.uint8)
    lut = np.array([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6], dtype=np.float32)
    vals = np.empty((E, out, n_in // 32, 32), dtype=np.float32)  # transformers' convert_moe_packed_tensors
    vals[..., 0::2], vals[..., 1::2] = lut[blocks & 0x0F], lut[blocks >> 4]
    want = (vals * np.exp2(scales.astype(np.float32) - 127)[..., None]).reshape(E, out, n_in)
    I8 = ggml.T.I8
    tensors = {"x.gate_up_proj_blocks": TensorData("b", I8, (16, n_in // 32, out, E), blocks.reshape(-1)),
               "x.gate_up_proj_scales": TensorData("s", I8, (n_in // 32, out, E), scales.reshape(-1))}
    gate, up = _hf_expert_weights(tensors, "x.gate_up_proj", c)
    assert gate.type.name == "MXFP4" and gate.ne == (n_in, out // 2, E)
    for e in range(E):
        assert np.array_equal(ggml.to_float(gate.expert(e)), want[e, 0::2])
        assert np.array_equal(ggml.to_float(up.expert(e)), want[e, 1::2])


def test_show_counts_the_fused_experts(hf_dir):
    """`moecli show`: the same geometry as the tiny GGUF gives the same parameter counts, fused experts included."""
    from conftest import tiny_gguf

    from moecli.cli.pull import summarize
    from moecli.models.loader import load_checkpoint

    hf, gg = summarize(load_checkpoint(hf_dir)), summarize(load_checkpoint(tiny_gguf("gpt-oss", "F32")))
    assert (hf["params_total"], hf["params_active"], hf["expert_params"]) == \
        (gg["params_total"], gg["params_active"], gg["expert_params"])
