"""The real SmolLM2-135M-Instruct GGUF (Q4_1, llama arch, 30 layers): logits and greedy tokens against llama.cpp."""
import numpy as np
import pytest

import moecli
from llama_oracle import greedy_tokens, run_llama

PROMPT = "<|im_start|>user\nWhat is the capital of France? Answer in one sentence.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    return moecli.load(smollm2_gguf, engine="ggml", flash_attn=False)  # llama.cpp's non-flash path, as the oracle


def test_tokenizer_matches_llama_cpp(smol):
    ids = smol.tokenize(PROMPT)
    assert ids[:3] == [1, 4093, 198]  # <|im_start|> user \n
    assert smol.detokenize(ids[1:]) == PROMPT[len("<|im_start|>"):]


def test_logits_identical_to_llama_cpp(smol, smollm2_gguf):
    """The one-graph forward is llama.cpp's graph on the same bytes with the same kernels: identical logits."""
    ids = smol.tokenize(PROMPT)
    ref, _ = run_llama(smollm2_gguf, ids)
    got = smol.logits(ids)
    assert got.shape == ref.shape == (len(ids), 49152)
    assert np.array_equal(got, ref), float(np.abs(got - ref).max())


def test_flash_attention_within_q8_rounding_spread(smollm2_gguf):
    """Flash attention (the default for prompts) sums in another order (~1e-7); ggml rounds every matmul input to
    Q8, and 30 layers amplify that to a few 1e-2 relative, as with the fp32 torch path (next test)."""
    m = moecli.load(smollm2_gguf, engine="ggml")
    ids = m.tokenize(PROMPT)
    ref, _ = run_llama(smollm2_gguf, ids)
    got = m.logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert 0 < rel < 0.25, rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_torch_reference_within_quantization_spread(smollm2_gguf, smol):
    """The fp32-activation torch path differs from ggml's Q8 activations by FACTS §3's spread, no more."""
    ids = smol.tokenize(PROMPT)
    ref, _ = run_llama(smollm2_gguf, ids)
    got = moecli.load(smollm2_gguf, engine="torch").logits(ids)
    rel = np.abs(got - ref).max() / ref.std()
    assert rel < 0.35, rel
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_32_greedy_tokens_identical(smol, smollm2_gguf):
    """Greedy tokens equal llama.cpp's, prompt and decode steps alike (the attention runs in ggml as llama.cpp's
    non-flash path: no near-tie can go the other way, "why is the sky blue" included)."""
    ids = smol.tokenize(PROMPT)
    ours = list(smol.generate(ids, max_tokens=32))  # stops at <|im_end|>
    assert ours == greedy_tokens(smollm2_gguf, ids, len(ours) + 1)[:len(ours)]
    assert "Paris" in smol.detokenize(ours)
    for q in ("List five facts about the planet Mars.", "Why is the sky blue?"):
        ids = smol.tokenize(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
        assert list(smol.generate(ids, max_tokens=32, stop_at_eog=False)) == greedy_tokens(smollm2_gguf, ids, 32)
