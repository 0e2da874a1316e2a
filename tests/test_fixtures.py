"""The fixtures and oracles the correctness tests stand on are real: llama.cpp loads and runs them sanely."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from conftest import MOE_ARCHS, TINY, TINY_ARCHS, TINY_FTYPES, tiny_dims, tiny_f32_twin, tiny_gguf, tiny_hf
from llama_oracle import greedy_tokens, llama_tokenize, run_llama
from moecli.synth import SPECIAL_TOKENS, tiny_tokenizer

TEXT = ("<|im_start|>user\nHello, world! Which expert answers the question about the sea, "
        "the moon and 42 stars?<|im_end|>\n<|im_start|>assistant\n")


def _types(path) -> dict[str, Q]:
    return {t.name: t.tensor_type for t in GGUFReader(path).tensors}


def _expected_type(name: str, ndim: int, ftype: str, n_layer: int) -> set[Q]:
    """What write_gguf puts in each tensor (measured with llama.cpp 0.3.36's quantizer for Q4_K_M)."""
    if ndim == 1 or "ffn_gate_inp" in name or ftype == "F32":
        return {Q.F32}
    if ftype in ("Q8_0", "Q4_K"):
        return {Q[ftype]}
    # Q4_K_M mix, as llama.cpp chooses it for these tiny models:
    if name == "output.weight":
        return {Q.Q6_K}
    if name == "token_embd.weight":  # Q6_K when tied (it is the output too)
        return {Q.Q4_K, Q.Q6_K}
    if name.endswith(("attn_k.weight", "attn_v.weight")):  # attn_v: Q6_K in "more bits" layers; Q8_0 if 8 experts
        return {Q.Q4_K, Q.Q6_K, Q.Q8_0}
    if name.endswith("attn_output.weight"):  # Q5_K for MoE models
        return {Q.Q4_K, Q.Q5_K}
    if "ffn_down" in name:  # Q6_K in "more bits" layers
        return {Q.Q4_K, Q.Q6_K}
    return {Q.Q4_K}


def test_tiny_tokenizer_is_deterministic_bpe():
    tok = tiny_tokenizer()
    assert tok.get_vocab_size() == 384
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2]
    ids = tok.encode(TEXT).ids
    assert tok.decode(ids, skip_special_tokens=False) == TEXT
    assert ids[0] == 1 and 2 in ids  # specials split out of the text
    assert len(ids) < len(TEXT.encode()) * 0.7  # merges were learned


@pytest.mark.parametrize("ftype", TINY_FTYPES)
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_gguf_loads_tokenizes_and_runs(arch, ftype):
    path = tiny_gguf(arch, ftype)
    dims = tiny_dims(arch)
    # tensor types really are what the ftype promises
    reader = GGUFReader(path)
    for t in reader.tensors:
        assert t.tensor_type in _expected_type(t.name, len(t.shape), ftype, dims.n_layer), (t.name, t.tensor_type)
    types = _types(path)
    if ftype == "Q4_K_M":
        assert Q.Q6_K in types.values() and Q.Q4_K in types.values()
    if dims.n_expert:
        assert types["blk.0.ffn_gate_inp.weight"] == Q.F32

    ids = tiny_tokenizer().encode(TEXT).ids
    assert llama_tokenize(path, TEXT) == ids

    capture = ["result_norm"] + ([f"ffn_moe_topk-{l}" for l in range(dims.n_layer)] if dims.n_expert else [])
    logits, cap = run_llama(path, ids, capture)
    assert logits.shape == (len(ids), dims.n_vocab) and logits.dtype == np.float32
    assert np.isfinite(logits).all() and 1.0 < logits.std() < 10.0
    assert cap["result_norm"].shape == (len(ids), dims.n_embd)
    for l in range(dims.n_layer if dims.n_expert else 0):
        topk = cap[f"ffn_moe_topk-{l}"]
        assert topk.dtype == np.int32 and topk.shape == (len(ids), dims.n_expert_used)
        assert ((0 <= topk) & (topk < dims.n_expert)).all()
        assert all(len(set(row)) == dims.n_expert_used for row in topk.tolist())  # distinct per token
        # non-degenerate routing: most experts get tokens, none takes nearly all of them
        counts = np.bincount(topk.ravel(), minlength=dims.n_expert)
        assert (counts > 0).sum() >= dims.n_expert * 3 // 4 and counts.max() < 0.6 * len(ids), counts


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_capture_shapes_and_greedy(arch):
    path = tiny_gguf(arch, "F32")
    d = tiny_dims(arch)
    ids = tiny_tokenizer().encode(TEXT).ids
    names = ["ffn_moe_probs-0", "ffn_moe_weights-1", "ffn_moe_out-1", "Kcur-0", "l_out-1"]
    logits, cap = run_llama(path, ids, names)
    n = len(ids)
    assert cap["ffn_moe_probs-0"].shape == (n, d.n_expert)
    np.testing.assert_allclose(cap["ffn_moe_probs-0"].sum(-1), 1.0, rtol=1e-5)  # softmax over all experts
    assert cap["ffn_moe_weights-1"].shape == (n, d.n_expert_used, 1)
    assert cap["ffn_moe_out-1"].shape == (n, d.n_embd) and cap["l_out-1"].shape == (n, d.n_embd)
    assert cap["Kcur-0"].shape == (n, d.n_head_kv, d.head_dim)
    gen = greedy_tokens(path, ids, 6)
    assert len(gen) == 6 and gen[0] == int(logits[-1].argmax())
    # greedy decode one token at a time == one batched pass over prompt + generated tokens
    full, _ = run_llama(path, ids + gen[:-1])
    assert full[n - 1:].argmax(-1).tolist() == gen


def _prefix_before_routing_flip(a: dict, b: dict, n_layer: int) -> int:
    """Tokens before the first whose top-k set differs between two runs (a flip moves all later tokens)."""
    same = np.ones(len(a["ffn_moe_topk-0"]), bool)
    for l in range(n_layer):
        same &= (np.sort(a[f"ffn_moe_topk-{l}"], -1) == np.sort(b[f"ffn_moe_topk-{l}"], -1)).all(-1)
    return len(same) if same.all() else int(np.argmin(same))


@pytest.mark.parametrize("ftype", ["Q8_0", "Q4_K", "Q4_K_M"])
@pytest.mark.parametrize("arch", ["llama-dense", *MOE_ARCHS])
def test_f32_twin_within_quantization_spread(arch, ftype):
    q, twin = tiny_gguf(arch, ftype), tiny_f32_twin(arch, ftype)
    assert set(_types(twin).values()) == {Q.F32}
    assert GGUFReader(twin).fields.keys() == GGUFReader(q).fields.keys()
    d = tiny_dims(arch)
    ids = tiny_tokenizer().encode(TEXT).ids
    cap = [f"ffn_moe_topk-{l}" for l in range(d.n_layer)] if d.n_expert else []
    lq, cq = run_llama(q, ids, cap)
    lt, ct = run_llama(twin, ids, cap)
    # Same weights, but ggml quantizes activations to Q8 before quantized matmuls (FACTS §3). A near-tie in the
    # router can flip an expert choice, after which a token (and, through attention, all later ones) legitimately
    # differs: compare tightly only before the first flip.
    n = _prefix_before_routing_flip(cq, ct, d.n_layer) if d.n_expert else len(ids)
    per_token = np.abs(lq - lt).max(-1) / lt.std()
    # measured: before any flip <= 0.15, median 0.03-0.10; FACTS §3 reports 0.03-0.31 by type
    assert (per_token[:n] < 0.2).all(), per_token[:n]
    assert np.median(per_token) < 0.15 and (per_token < 0.35).mean() >= 0.9, per_token
    assert (lq.argmax(-1) == lt.argmax(-1)).mean() >= 0.85


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_hf_fixture_round_trips(arch):
    import transformers as T
    from hf_fixtures import hf_logits

    path = tiny_hf(arch)
    cfg = T.AutoConfig.from_pretrained(path)
    d = tiny_dims(arch)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (d.n_embd, d.n_layer, d.n_vocab)
    tok = T.AutoTokenizer.from_pretrained(path)
    ids = tok(TEXT).input_ids
    assert ids == tiny_tokenizer().encode(TEXT).ids
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    logits = hf_logits(path, ids)
    assert logits.shape == (len(ids), d.n_vocab) and np.isfinite(logits).all() and logits.std() > 1.0
    again = hf_logits(path, ids[:5])  # causal: a prefix gives the same logits
    np.testing.assert_allclose(again, logits[:5], rtol=1e-4, atol=1e-4)


def test_smollm2_fixture(smollm2_gguf):
    ids = llama_tokenize(smollm2_gguf, "The capital of France is", add_special=False)
    logits, _ = run_llama(smollm2_gguf, ids)
    assert logits.shape == (len(ids), 49152) and np.isfinite(logits).all()
    assert greedy_tokens(smollm2_gguf, ids, 3)[0] == int(logits[-1].argmax())


def test_tiny_table_matches_brief():
    base = {"llama-dense", "mixtral", "qwen2moe", "qwen3moe", "olmoe"}
    assert set(TINY) >= base and set(TINY_ARCHS) == base  # deepseek fixtures are added but not in the generic sweep
    for arch in base:
        garch, d = TINY[arch]
        assert d.n_embd % 256 == 0 and d.n_ff % 256 == 0  # K-quants need ne0 % 256 == 0
        assert (d.n_expert, d.n_expert_used) == ((0, 0) if arch == "llama-dense" else (8, 2))
