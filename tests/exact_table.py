"""max |Δlogit| / std per (family, type) against llama.cpp (F32 KV, flash attention off), in exact mode and in the
fast default: `PYTHONPATH=. python3 tests/exact_table.py [FAMILY ...]`. tests/test_exact_mode.py asserts the exact
column is 0 (bit-identical) on the same cases.

The run: a 67-token prompt (big enough for the default's per-expert kernels, and not a multiple of the repacked
gemm's 4-row blocks: the remainder goes through its gemv), then decode steps of 1, 1 and 3 tokens, every token's
logits compared.
"""
from __future__ import annotations

import sys

import numpy as np

from conftest import TINY, tiny_gguf
from llama_oracle import rel_diff, run_llama_chunks

TYPES = ("F32", "Q8_0", "Q4_K_M")
PROMPT_TOKENS, STEPS = 67, (1, 1, 3)


def chunks(n_vocab: int) -> list[list[int]]:
    ids = np.random.default_rng(0).integers(1, n_vocab, PROMPT_TOKENS + sum(STEPS)).tolist()
    out, i = [ids[:PROMPT_TOKENS]], PROMPT_TOKENS
    for n in STEPS:
        out.append(ids[i:i + n])
        i += n
    return out


def moecli_logits(path, parts, exact: bool) -> np.ndarray:
    import moecli

    m = moecli.load(path, exact=exact, flash_attn=False, n_ctx=sum(map(len, parts)))
    cache = m.transformer.new_cache(sum(map(len, parts)))
    return np.concatenate([m.transformer.forward(p, cache, all_logits=True).numpy() for p in parts])


def case(family: str, ftype: str, modes=(True,)) -> tuple[np.ndarray, list[np.ndarray]]:
    """llama.cpp's logits and moecli's in each mode (exact: True) on the tiny `family` GGUF in `ftype`."""
    path = tiny_gguf(family, ftype)
    parts = chunks(TINY[family][1].n_vocab)
    return run_llama_chunks(path, parts), [moecli_logits(path, parts, exact) for exact in modes]


def main(families) -> None:
    print(f"| family | type | exact max|Δ|/std | default max|Δ|/std |")
    print("|---|---|---:|---:|")
    for fam in families:
        for ftype in TYPES:
            try:
                ref, (exact, default) = case(fam, ftype, (True, False))
                cells = [f"{rel_diff(exact, ref):.3g}", f"{rel_diff(default, ref):.3g}"]
            except Exception as e:  # one line per case, whatever went wrong
                cells = [f"error: {str(e).splitlines()[0][:60]}", ""]
            print(f"| {fam} | {ftype} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or list(TINY))
