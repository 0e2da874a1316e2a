"""Exact mode (runtime/exact.py): llama.cpp's own kernel choices, so every tiny family in every type — Q4_K_M's
llama.cpp-quantized mix included — gives llama.cpp's logits bit for bit over a prompt and decode steps; the fast
default keeps its own choices on Q4_K_M (and differs); `--exact` on chat and bench. The table of these numbers:
tests/exact_table.py."""
import json

import numpy as np
import pytest

from conftest import TINY, tiny_gguf
from exact_table import TYPES, case
from llama_oracle import rel_diff

import moecli
from moecli.errors import MoecliError

@pytest.mark.parametrize("ftype", TYPES)
@pytest.mark.parametrize("family", list(TINY))
def test_bit_identical_to_llama_cpp(family, ftype):
    ref, (got,) = case(family, ftype)
    assert got.shape == ref.shape
    assert np.array_equal(got, ref), f"max |Δ|/std = {rel_diff(got, ref):.3g}"


def test_default_mode_keeps_its_kernels_on_q4_k_m():
    """The default reads the file's layout for prompts' dense weights and runs prompts' repacked experts per
    expert: on Q4_K_M it differs from llama.cpp within the spread of a kernel choice (measured 1.8e-2 on qwen3moe)."""
    ref, (exact, default) = case("qwen3moe", "Q4_K_M", (True, False))
    assert np.array_equal(exact, ref)
    assert 0 < rel_diff(default, ref) < 0.2


def test_exact_repacks_what_llama_cpp_repacks():
    """Every 2-D mul_mat weight of a type with an interleaved kernel here (the Q4_K ones of Q4_K_M), routers
    included, gets its repacked copy; the embeddings (get_rows) keep the file layout; the experts run as one
    mul_mat_id whatever the batch."""
    m = moecli.load(tiny_gguf("qwen3moe", "Q4_K_M"), exact=True)
    fwd = m.transformer.fused_forward
    q4k = [t for t in fwd._dense_weights() if t.type.name == "Q4_K"]
    assert q4k and all(t.repacked is not None for t in q4k)
    assert fwd.token_embd.repacked is None
    eng = m.transformer.experts.engine
    assert all(eng.choose_kernel(l, 512, 8) == "id" for l in eng.layers)
    assert not fwd._split(256) and not m.kernels.flash_attn


def test_exact_refuses_other_engines():
    with pytest.raises(MoecliError, match="exact mode"):
        moecli.load(tiny_gguf("qwen3moe", "F32"), exact=True, engine="torch")
    with pytest.raises(MoecliError, match="exact mode"):
        moecli.load(tiny_gguf("qwen3moe", "F32"), exact=True, placement="lru")


def _cli(capsys, *args) -> tuple[int, str, str]:
    """`moecli ARGS` in this process (its bench workers are processes of their own): (status, stdout, stderr)."""
    from moecli.cli.main import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        rc = 0
    except SystemExit as e:
        rc = e.code or 0
    out, err = capsys.readouterr()
    return rc, out, err


def test_chat_exact_answers_as_llama_cpp(capsys):
    from llama_oracle import greedy_tokens

    path = tiny_gguf("qwen3moe", "Q4_K_M")
    rc, out, err = _cli(capsys, "chat", path, "-p", "hello", "--exact", "-n", "6", "--temp", "0",
                        "--repeat-penalty", "1")
    assert rc == 0, err
    m = moecli.load(path, exact=True)
    prompt = m.tokenize(m.chat_prompt([{"role": "user", "content": "hello"}]))
    want = m.detokenize(greedy_tokens(path, prompt, 6, stop_at_eog=True), special=False)
    assert out.strip() == want.strip()
    rc, out, err = _cli(capsys, "chat", path, "-p", "hello", "--exact", "--placement", "lru")
    assert rc != 0 and err.count("\n") == 1 and "--exact" in err


def test_bench_exact_both_sides(capsys):
    rc, out, err = _cli(capsys, "bench", tiny_gguf("qwen3moe", "Q4_K_M"), "--exact", "-p", "16", "-n", "2", "-r", "1",
                        "-t", "1", "--vs-llama-cpp", "-o", "json")
    assert rc == 0, err
    out = json.loads(out)
    assert out["engine"].endswith("--exact") and out["ratio"]["pp16"] > 0 and out["ratio"]["tg2"] > 0
    s = out["llama_cpp"]["settings"]
    assert s["flash_attn_type"] == 0 and s["type_k"] == "F32"
